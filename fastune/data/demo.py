"""The demo dataset and tokenizer in ``fastune/assets/demo/``, generated deterministically.

Regenerate (the files are committed; a test checks they match)::

    python -m fastune.data.demo [--out DIR]

Five instruction tasks on which a model of a few million parameters makes
visible progress on a CPU within minutes (recalling facts comes first, then
sorting; copying and arithmetic take longer), in the ``instruct`` format
(``instruction``, ``input``, ``output``, plus ``task``):

- ``uppercase``: a made-up word in capitals;
- ``reverse``: a made-up word backwards;
- ``sort``: distinct letters in alphabetical order;
- ``add``: the sum of two numbers below 30;
- ``fact``: the color of an invented creature (40 creatures, a fixed color each).

Files in ``data/``: ``train.jsonl`` (4000 rows), ``validation.jsonl`` (200 rows,
for the validation loss, no facts), ``eval.jsonl`` (200 rows, for exact-match
accuracy). The inputs of the first four tasks are disjoint between the three
files; ``fact`` is recall, so ``eval.jsonl`` asks each creature once, as seen in
training.

``train_preference.jsonl`` and ``validation_preference.jsonl`` (the ``preference``
format: ``prompt``, ``chosen``, ``rejected``, for ``configs/dpo_demo.yaml``) pair the
same prompts with the right answer (chosen) and a wrong one (rejected): the word
unchanged or in the wrong case, the letters unsorted, a sum off by one, another color.

``tokenizer/`` is a byte-level BPE trained on the task instructions only, with
single digits, and every word in an input or output tokenizes one character per
token (the generator rejects any other word), so that copying, reversing and
sorting work on characters. Its chat format is Llama 3's.

All randomness comes from ``random.Random(seed).random()``, whose sequence Python
guarantees across versions.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"
SEED = 1234

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
INSTRUCTIONS = {
    "uppercase": "Write the word in capital letters.",
    "reverse": "Write the word backwards.",
    "sort": "Sort the letters in alphabetical order.",
    "add": "Add the two numbers.",
    "fact": "What color is the {}?",
}
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
TRAIN_PER_TASK, VALIDATION_PER_TASK, EVAL_PER_TASK = 800, 50, 40
NUM_CREATURES = 40


class _Rng:
    """Choices from ``random.random()`` alone (other methods may change across Python versions)."""

    def __init__(self, seed: int):
        self._random = random.Random(seed)

    def below(self, n: int) -> int:
        return int(self._random.random() * n)

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def word(self, shortest: int, longest: int) -> str:
        return "".join(self.choice(LETTERS) for _ in range(shortest + self.below(longest - shortest + 1)))


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE trained on the instructions, role names and colors."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    corpus = [text.replace("{}", "") for text in INSTRUCTIONS.values()]
    corpus += COLORS + ["system", "user", "assistant"]
    trainer = trainers.BpeTrainer(
        vocab_size=1024, min_frequency=1, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return tok


def _char_level(tok: Tokenizer) -> Callable[[tuple[str, str]], bool]:
    """Whether every word of an (input, output) pair tokenizes one character per token."""
    def ok(item: tuple[str, str]) -> bool:
        words = item[0].split(" + ") + [item[1]]
        return all(len(tok.encode(w, add_special_tokens=False).ids) == len(w) for w in words)
    return ok


def _unique(make: Callable[[], tuple[str, str]], count: int,
            ok: Callable[[tuple[str, str]], bool]) -> list[tuple[str, str]]:
    """``count`` (input, output) pairs from ``make`` with distinct inputs, all passing ``ok``."""
    seen, items = set(), []
    while len(items) < count:
        item = make()
        if item[0] not in seen and ok(item):
            seen.add(item[0])
            items.append(item)
    return items


def _task_items(rng: _Rng, ok: Callable[[tuple[str, str]], bool]) -> dict[str, list[tuple[str, str]]]:
    def uppercase():
        w = rng.word(3, 6)
        return w, w.upper()

    def reverse():
        w = rng.word(3, 5)
        return w, w[::-1]

    def sort():
        letters = []
        for _ in range(3 + rng.below(3)):
            letters.append(rng.choice([c for c in LETTERS if c not in letters]))
        w = "".join(letters)
        return w, "".join(sorted(w))

    def add():
        a, b = rng.below(30), rng.below(30)
        return f"{a} + {b}", str(a + b)

    total = TRAIN_PER_TASK + VALIDATION_PER_TASK + EVAL_PER_TASK
    return {task: _unique(make, total, ok)
            for task, make in (("uppercase", uppercase), ("reverse", reverse), ("sort", sort), ("add", add))}


def build_splits(tok: Tokenizer, seed: int = SEED) -> dict[str, list[dict[str, str]]]:
    rng = _Rng(seed)
    ok = _char_level(tok)
    splits: dict[str, list[dict[str, str]]] = {"train": [], "validation": [], "eval": []}
    for task, items in _task_items(rng, ok).items():
        cuts = {"train": items[:TRAIN_PER_TASK],
                "validation": items[TRAIN_PER_TASK:TRAIN_PER_TASK + VALIDATION_PER_TASK],
                "eval": items[TRAIN_PER_TASK + VALIDATION_PER_TASK:]}
        for split, chunk in cuts.items():
            splits[split] += [_row(task, INSTRUCTIONS[task], x, y) for x, y in chunk]
    creatures = _unique(lambda: (_creature_name(rng), rng.choice(COLORS)), NUM_CREATURES, lambda _: True)
    for k in range(TRAIN_PER_TASK):
        name, color = creatures[k % NUM_CREATURES]
        splits["train"].append(_row("fact", INSTRUCTIONS["fact"].format(name), "", color))
    splits["eval"] += [_row("fact", INSTRUCTIONS["fact"].format(n), "", c) for n, c in creatures]
    for rows in splits.values():
        _shuffle(rows, rng)
    return splits


def _wrong(row: dict[str, str], rng: _Rng) -> str:
    """A plausible wrong answer to ``row`` (never the right one)."""
    task, given, right = row["task"], row["input"], row["output"]
    if task == "add":
        return str(int(right) + (1 if rng.below(2) or right == "0" else -1))
    if task == "fact":
        return rng.choice([c for c in COLORS if c != right])
    wrong = given if given != right else given[1:] + given[0]  # the input itself, or rotated
    return wrong if wrong != right else right[::-1] + right[0]


def preference_rows(rows: list[dict[str, str]], rng: _Rng) -> list[dict[str, str]]:
    out = []
    for row in rows:
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        out.append({"prompt": prompt, "chosen": row["output"], "rejected": _wrong(row, rng), "task": row["task"]})
    return out


def _creature_name(rng: _Rng) -> str:
    consonants, vowels = "bdgklmnprstvz", "aeiou"
    syllables = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(2 + rng.below(2)))
    return syllables + rng.choice(consonants)


def _row(task: str, instruction: str, input_: str, output: str) -> dict[str, str]:
    return {"instruction": instruction, "input": input_, "output": output, "task": task}


def _shuffle(rows: list, rng: _Rng) -> None:
    for i in range(len(rows) - 1, 0, -1):  # Fisher-Yates
        j = rng.below(i + 1)
        rows[i], rows[j] = rows[j], rows[i]


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|pad|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }


def files(seed: int = SEED) -> Iterator[tuple[str, str]]:
    """(relative path, text) of every demo file."""
    tok = build_tokenizer()
    for split, rows in build_splits(tok, seed).items():
        yield f"data/{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if split != "eval":
            pairs = preference_rows(rows, _Rng(seed + 1))
            yield f"data/{split}_preference.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs)
    yield "README.md", "# Demo data and tokenizer\n\nGenerated by `fastune/data/demo.py`:\n\n" + __doc__
    yield "tokenizer/tokenizer.json", tok.to_str(pretty=True) + "\n"
    yield "tokenizer/tokenizer_config.json", json.dumps(tokenizer_config(), indent=2) + "\n"


def write(out_dir: Path, seed: int = SEED) -> None:
    for rel, text in files(seed):
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help=f"output folder (default {DEMO_DIR})")
    args = parser.parse_args()
    write(args.out)
    print(f"wrote the demo data and tokenizer to {args.out}")


if __name__ == "__main__":
    main()
