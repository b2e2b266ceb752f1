"""Does llama.cpp run fastune's GGUF export as fastune runs the checkpoint?

Exports a checkpoint (default: the demo model shipped with fastune) with
``fastune export gguf``, loads the file in llama.cpp through ``llama-cpp-python``
(``pip install llama-cpp-python``; it compiles llama.cpp on CPU), and for a few
demo prompts, as plain text and in the chat format, checks that

1. llama.cpp tokenizes the prompt text into the same ids as fastune (so the
   tokenizer metadata and pre-tokenizer name are right),
2. llama.cpp's greedy continuation (from those ids, up to an end-of-turn token)
   equals fastune's ``generate`` greedy output, token for token,
3. llama.cpp's chat mode (``create_chat_completion``, which formats the messages
   with the chat template stored in the file) answers with the same text as
   fastune's chat-format generation;

and reports the largest difference between llama.cpp's and fastune's (fp32)
next-token logits over the prompt positions. ``check_ids`` does the same from prompt
ids for any checkpoint (tests/test_export_gguf_llamacpp.py runs it on a tiny random
model of each family).

    python benchmarks/check_gguf_llamacpp.py                     # demo model, f16
    python benchmarks/check_gguf_llamacpp.py --type f32 --type q8_0
    python benchmarks/check_gguf_llamacpp.py --checkpoint fastune_demo   # a trained run

Exit status 0 when every check passes. Results: benchmarks/results/gguf_llamacpp.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
DEMO_MODEL = Path(__file__).resolve().parent.parent / "fastune" / "assets" / "demo" / "base_model"
DEMO_EVAL = DEMO_MODEL.parent / "data" / "eval.jsonl"


def demo_prompts(n: int) -> list[str]:
    """The first row of each task in the demo's eval set, as the instruct format writes it."""
    rows, seen = [], set()
    for line in DEMO_EVAL.read_text().splitlines():
        row = json.loads(line)
        if row["task"] not in seen:
            seen.add(row["task"])
            rows.append(f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"])
    return rows[:n]


def check(checkpoint, out_type: str, prompts: list[str], max_new_tokens: int, workdir: Path) -> dict:
    """One export type: per prompt and format, fastune's and llama.cpp's ids and text."""
    import llama_cpp

    from fastune.export.gguf import export_gguf
    from fastune.generation import generate, load_for_inference, prompt_ids

    model, tokenizer, ckpt = load_for_inference(checkpoint, dtype="fp32", use_kernels=False)
    path = export_gguf(ckpt, workdir / f"model-{out_type}.gguf", out_type, force=True).path
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False, seed=0)
    cases = []
    for text in prompts:
        for chat in (False, True):
            ids = prompt_ids(tokenizer, text, chat=chat)
            ours = generate(model, [ids], max_new_tokens, stop_ids=tokenizer.stop_ids).tokens[0]
            if chat:  # the rendered template holds bos and the header tokens as text
                rendered = tokenizer.render([{"role": "user", "content": text}], add_generation_prompt=True)
                theirs_ids = llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True)
            else:
                theirs_ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
            llm.reset()
            llm.eval(ids)
            logits = torch.tensor(llm.scores[: len(ids)])
            with torch.no_grad():
                ours_logits = model(torch.tensor([ids]))[0]
            theirs = _greedy(llm, ids, max_new_tokens, set(tokenizer.stop_ids))
            case = {
                "prompt": text, "chat": chat, "prompt_ids_equal": theirs_ids == ids,
                "fastune": ours, "llama_cpp": theirs, "greedy_equal": ours == theirs,
                "fastune_text": tokenizer.decode(ours), "llama_cpp_text": tokenizer.decode(theirs),
                "max_abs_logit_diff": (logits - ours_logits).abs().max().item(),
            }
            if chat:
                reply = llm.create_chat_completion([{"role": "user", "content": text}], temperature=0.0,
                                                   max_tokens=max_new_tokens, repeat_penalty=1.0)
                case["llama_cpp_chat_text"] = reply["choices"][0]["message"]["content"]
                case["chat_mode_equal"] = case["llama_cpp_chat_text"] == case["fastune_text"]
            cases.append(case)
    llm.close()
    passed = all(c["prompt_ids_equal"] and c["greedy_equal"] and c.get("chat_mode_equal", True) for c in cases)
    return {"type": out_type, "checkpoint": str(ckpt), "llama_cpp_version": llama_cpp.__version__,
            "passed": passed, "cases": cases}


def check_ids(checkpoint, ids: list[int], max_new_tokens: int, workdir: Path, n_ctx: int) -> dict:
    """The f32 export of a (tiny) checkpoint, from prompt ids: llama.cpp's next-token logits
    over the prompt and greedy continuation against fastune's fp32 ones. llama.cpp rounds
    its context up (to 256 tokens) and, for LongRoPE, takes the long factors when that
    exceeds the original context; fastune does when the sequence does, so the prompt of
    such a model should be longer than the original context."""
    import llama_cpp

    from fastune.export.gguf import export_gguf
    from fastune.generation import generate, load_for_inference

    model, tokenizer, ckpt = load_for_inference(checkpoint, dtype="fp32", use_kernels=False)
    path = export_gguf(ckpt, workdir / "model-f32.gguf", "f32", force=True).path
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=1, logits_all=True, verbose=False, seed=0)
    try:
        llm.eval(ids)
        theirs_logits = torch.tensor(llm.scores[: len(ids)])
        theirs = _greedy(llm, ids, max_new_tokens, set(tokenizer.stop_ids))
    finally:
        llm.close()
    with torch.no_grad():
        ours_logits = model(torch.tensor([ids]))[0]
    ours = generate(model, [ids], max_new_tokens, stop_ids=tokenizer.stop_ids).tokens[0]
    return {"checkpoint": str(ckpt), "fastune": ours, "llama_cpp": theirs, "greedy_equal": ours == theirs,
            "max_abs_logit_diff": (theirs_logits - ours_logits).abs().max().item(),
            "max_abs_logit": ours_logits.abs().max().item()}


def _greedy(llm, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """llama.cpp's greedy continuation of ``ids``, cut before the first stop id (as fastune's)."""
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        if token in stop_ids or llm.token_eos() == token or len(out) == max_new_tokens:
            break
        out.append(token)
    return out


def markdown(results: list[dict]) -> str:
    lines = ["# fastune GGUF export in llama.cpp", "",
             "`python benchmarks/check_gguf_llamacpp.py`: each prompt as plain text and in the chat format.", "",
             "| type | prompt | chat | same prompt ids | same greedy ids | chat mode same text | "
             "max abs logit diff | fastune | llama.cpp |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for c in r["cases"]:
            prompt = c["prompt"].replace("\n", "\\n")
            lines.append(f"| {r['type']} | {prompt} | {c['chat']} | {c['prompt_ids_equal']} | {c['greedy_equal']} | "
                         f"{c.get('chat_mode_equal', '')} | {c['max_abs_logit_diff']:.2e} | "
                         f"{c['fastune_text']!r} | {c['llama_cpp_text']!r} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(DEMO_MODEL))
    parser.add_argument("--type", dest="types", action="append", help="GGUF type (repeatable; default f16)")
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--no-save", action="store_true", help="Do not write benchmarks/results/.")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        results = [check(args.checkpoint, t, demo_prompts(args.prompts), args.max_new_tokens, Path(tmp))
                   for t in args.types or ["f16"]]
    report = markdown(results)
    print(report)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "gguf_llamacpp.json").write_text(json.dumps(results, indent=2) + "\n")
        (RESULTS / "gguf_llamacpp.md").write_text(report)
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
