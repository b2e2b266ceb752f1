"""The demo model's GGUF export in llama.cpp: same prompt tokens, same greedy output
and same chat-mode answer as fastune (benchmarks/check_gguf_llamacpp.py, on fewer
prompts). Needs ``llama-cpp-python``, which compiles llama.cpp on install: CI skips."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
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
