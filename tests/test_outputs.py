"""What a finished run hands its user: the loading code printed at the end (and shown
in the README) runs verbatim on a demo output folder, and gives the fine-tuned model."""

import json
import logging
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fastune.training.outputs import loading_code

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_loading_code() -> str:
    text = README.read_text()
    match = re.search(r"<!-- loading-code:[^\n]*-->\n```python\n(.*?)```", text, re.S)
    assert match, "README: the loading-code block is missing"
    return match.group(1).rstrip("\n")


def fake_vllm(seen: dict) -> dict[str, types.ModuleType]:
    """vLLM needs a GPU; this stand-in does what its LoRA loader checks of an adapter
    folder (vllm.lora.peft_helper.PEFTHelper and LoRAModel.from_local_checkpoint): the
    config and weights at the path given, rank within max_lora_rank, no DoRA, no bias,
    no modules_to_save, PEFT's key names."""
    vllm, lora, request = (types.ModuleType(n) for n in ("vllm", "vllm.lora", "vllm.lora.request"))

    class LoRARequest:
        def __init__(self, name, lora_int_id, lora_path):
            self.lora_path = lora_path

    class LLM:
        def __init__(self, model, enable_lora=False, max_lora_rank=16):
            assert (Path(model) / "config.json").is_file() and enable_lora
            self.max_lora_rank = max_lora_rank

        def generate(self, prompts, lora_request=None):
            path = Path(lora_request.lora_path)
            config = json.loads((path / "adapter_config.json").read_text())
            assert config["r"] <= self.max_lora_rank and not config["use_dora"]
            assert config["bias"] == "none" and config["modules_to_save"] is None
            with safe_open(path / "adapter_model.safetensors", "pt") as f:
                keys = list(f.keys())
            assert keys and all(k.startswith("base_model.model.") for k in keys)
            seen["adapter"] = path
            return []

    vllm.LLM, request.LoRARequest = LLM, LoRARequest
    vllm.lora, lora.request = lora, request
    return {"vllm": vllm, "vllm.lora": lora, "vllm.lora.request": request}


@pytest.mark.slow
def test_the_printed_loading_code_runs_on_a_demo_run(tmp_path, monkeypatch, caplog):
    import transformers

    from fastune.config import load_config
    from fastune.training.recipe import train

    monkeypatch.chdir(tmp_path)
    cfg = load_config("demo", ["epochs=2", "max_steps_per_epoch=1", "eval_exact_match.source=null",
                               "dataset.val_split=null", "metric_logger=stdout"])
    with caplog.at_level(logging.INFO, logger="fastune"):
        train(cfg)
    ckpt = Path("fastune_demo/epoch_1")
    code = loading_code(ckpt)
    assert code == readme_loading_code()
    assert f"load the latest:\n{code}" in caplog.text
    assert "checkpoints: fastune_demo/epoch_0, fastune_demo/epoch_1" in caplog.text
    assert "metrics chart: fastune_demo/logs/training.png" in caplog.text
    assert Path("fastune_demo/logs/training.png").read_bytes()[:4] == b"\x89PNG"

    seen = {}
    for name, module in fake_vllm(seen).items():
        monkeypatch.setitem(sys.modules, name, module)
    namespace = {}
    exec(readme_loading_code(), namespace)  # verbatim, as a user pastes it
    assert seen["adapter"] == ckpt

    # What each view gives: the fine-tune (the adapter applied once), equal to fastune's
    # (compared in fp32; the snippets load in the dtype config.json names).
    import fastune
    import peft

    def load(path):
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    tokens = torch.tensor([[1, 5, 9, 13, 200, 7, 42]])
    with torch.no_grad():
        ours = fastune.from_pretrained(ckpt, dtype="float32", kernels="none")(tokens)
        assert (load(namespace["base_path"])(input_ids=tokens).logits - ours).abs().max() > 1e-2
        adapted = peft.PeftModel.from_pretrained(load(namespace["base_path"]), str(ckpt)).eval()
        for model in (load(ckpt), load(ckpt / "merged"), adapted):
            torch.testing.assert_close(model(input_ids=tokens).logits, ours, rtol=1e-4, atol=1e-4)


def test_full_fine_tuning_and_dora_get_their_own_lines(tmp_path):
    full = tmp_path / "full" / "epoch_0"
    full.mkdir(parents=True)
    (full / "config.json").write_text("{}")
    assert loading_code(full) == "\n".join([
        "from transformers import AutoModelForCausalLM",
        f'model = AutoModelForCausalLM.from_pretrained("{full}")',
        "# vLLM",
        "from vllm import LLM",
        f'llm = LLM(model="{full}")',
    ])
    dora = tmp_path / "dora" / "epoch_0"
    dora.mkdir(parents=True)
    (dora / "adapter_config.json").write_text(json.dumps({"r": 8, "use_dora": True}))
    code = loading_code(dora)
    assert "vllm" not in code and code.endswith("serve the merged weights with LLM(model=...)")
    assert "merged" not in code.splitlines()[4]  # no merged/ folder: no line loading it
