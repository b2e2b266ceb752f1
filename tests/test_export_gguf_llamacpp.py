"""The demo model's GGUF export in llama.cpp: same prompt tokens, same greedy output
and same chat-mode answer as fastune (benchmarks/check_gguf_llamacpp.py, on fewer
prompts); and a tiny random model of each other family: same greedy ids, next-token
logits within llama.cpp's f16 KV cache error. Needs ``llama-cpp-python``, which compiles
llama.cpp on install: CI skips."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from test_export_gguf_families import build_checkpoint
from train_helpers import single_thread  # noqa: F401 (autouse fixture)

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python "
                                        "compiles llama.cpp); benchmarks/check_gguf_llamacpp.py is the same check")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "check_gguf_llamacpp.py"


def _script():
    spec = importlib.util.spec_from_file_location("check_gguf_llamacpp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_llama_cpp_greedy_equals_fastune_on_the_demo_model(tmp_path):
    script = _script()
    result = script.check(script.DEMO_MODEL, "f16", script.demo_prompts(2), 8, tmp_path)
    for case in result["cases"]:
        assert case["prompt_ids_equal"], case
        assert case["greedy_equal"], case
        assert case.get("chat_mode_equal", True), case
    assert result["passed"]


# 40 prompt tokens: past the tiny models' sliding windows (12) and LongRoPE's original context (32).
PROMPT = ([0, 17, 5, 230, 99, 3, 41, 300, 8, 150, 64, 2] * 4)[:40]


@pytest.mark.parametrize("case", ["qwen3_tied", "phi3", "phi3_longrope", "phi4_mini", "gemma2", "gemma3",
                                  "llama_yarn", "qwen2_yarn"])
def test_llama_cpp_runs_each_family_as_fastune(tmp_path, case):
    """The tiny qwen3 with sliding layers is left out: llama.cpp's qwen3 has no window (the export warns)."""
    result = _script().check_ids(build_checkpoint(case, tmp_path / "ckpt"), PROMPT, 8, tmp_path, n_ctx=64)
    print(case, result)
    assert result["greedy_equal"], result
    # llama.cpp keeps K and V in f16 (and its GELU through an f16 table); logits are O(3).
    assert result["max_abs_logit_diff"] < 5e-2, result
