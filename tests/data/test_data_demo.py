"""The committed demo data and tokenizer: reproducible by the generator, small,
with disjoint splits, and loadable the way configs/demo.yaml loads them."""

from __future__ import annotations

import collections
import json

import pytest

from fastune.data import build_dataloader, load_sft_dataset, load_tokenizer, prompt_answer_pairs
from fastune.data import demo


@pytest.fixture(scope="module")
def rows():
    return {split: [json.loads(line) for line in (demo.DEMO_DIR / "data" / f"{split}.jsonl").open()]
            for split in ("train", "validation", "eval")}


def test_committed_files_match_the_generator(tmp_path):
    demo.write(tmp_path)
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    # This generator owns README.md, data/ and tokenizer/; base_model/ comes from
    # scripts/make_demo_model.py and eval/ holds hand-written lm-eval task files.
    owned = {rel.parts[0] for rel in written}
    committed = sorted(rel for rel in (p.relative_to(demo.DEMO_DIR) for p in demo.DEMO_DIR.rglob("*")
                                       if p.is_file()) if rel.parts[0] in owned)
    assert written == committed
    for rel in written:
        assert (tmp_path / rel).read_bytes() == (demo.DEMO_DIR / rel).read_bytes(), rel
    assert sum((demo.DEMO_DIR / rel).stat().st_size for rel in committed) < 1_000_000


def test_splits(rows):
    counts = {split: collections.Counter(r["task"] for r in rs) for split, rs in rows.items()}
    assert counts["train"] == {t: 800 for t in demo.INSTRUCTIONS}
    assert counts["validation"] == {t: 50 for t in demo.INSTRUCTIONS if t != "fact"}
    assert counts["eval"] == {t: 40 for t in demo.INSTRUCTIONS}
    inputs = {split: {(r["instruction"], r["input"]) for r in rs if r["task"] != "fact"}
              for split, rs in rows.items()}
    assert not inputs["train"] & inputs["validation"] and not inputs["train"] & inputs["eval"]
    assert not inputs["validation"] & inputs["eval"]
    facts = {r["instruction"]: r["output"] for r in rows["train"] if r["task"] == "fact"}
    assert all(facts[r["instruction"]] == r["output"] for r in rows["eval"] if r["task"] == "fact")
    solve = {"uppercase": str.upper, "reverse": lambda x: x[::-1], "sort": lambda x: "".join(sorted(x)),
             "add": lambda x: str(sum(int(v) for v in x.split(" + ")))}
    for r in rows["train"] + rows["validation"] + rows["eval"]:
        if r["task"] != "fact":
            assert r["output"] == solve[r["task"]](r["input"])


def test_tokenizer_is_char_level_on_answers_and_matches_transformers(rows):
    from transformers import AutoTokenizer

    tok = load_tokenizer(demo.DEMO_DIR / "tokenizer")
    assert 256 < tok.vocab_size <= 2048 and tok.stop_ids == (tok.eos_id,)
    for r in rows["eval"]:
        if r["task"] != "fact":
            assert len(tok.encode(r["output"], add_bos=False)) == len(r["output"])
    hf = AutoTokenizer.from_pretrained(str(demo.DEMO_DIR / "tokenizer"))
    messages = [{"role": "user", "content": rows["train"][0]["instruction"]},
                {"role": "assistant", "content": rows["train"][0]["output"]}]
    assert tok.tokenize_messages(messages)[0] == hf.apply_chat_template(messages, tokenize=True,
                                                                        return_dict=True)["input_ids"]


def test_loads_like_the_demo_config(hf_cache):
    tok = load_tokenizer(demo.DEMO_DIR / "tokenizer")
    files = {split: str(demo.DEMO_DIR / "data" / f"{split}.jsonl") for split in ("train", "validation")}
    train = load_sft_dataset("json", tok, data_files=files, max_seq_len=128, truncation=False,
                             cache_dir=hf_cache)
    val = load_sft_dataset("json", tok, split="validation", data_files=files, max_seq_len=128,
                           cache_dir=hf_cache)
    assert (len(train), len(val)) == (4000, 200)
    batch = next(iter(build_dataloader(train, 16, seed=0)))
    assert batch["tokens"].shape[0] == 16
    pairs = prompt_answer_pairs(demo.DEMO_DIR / "data" / "eval.jsonl", tok, cache_dir=hf_cache)
    assert len(pairs) == 200
    for ids, _ in pairs:
        assert tok.decode(ids, skip_special_tokens=False).endswith(
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
