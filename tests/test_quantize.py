"""`fastune quantize`: torchao int8/int4 weight-only and int8 dynamic quantization of the
demo model, saved in torchao's own safetensors serialization, loaded back for
generation and by transformers' AutoModelForCausalLM."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from train_helpers import single_thread  # noqa: F401 (autouse fixture)

import fastune
from fastune.checkpoint import CheckpointError
from fastune.cli import main
from fastune.data import load_tokenizer
from fastune.generation import generate, load_for_inference
from fastune.checkpoint.layout import HF_WEIGHTS
from fastune.checkpoint.quantized import load_quantized
from fastune.quantize import QuantizationError, QuantizationRecipe, disk_size, quantize_checkpoint, quantize_model

DEMO = Path(fastune.__file__).parent / "assets" / "demo" / "base_model"
EVAL = Path(fastune.__file__).parent / "assets" / "demo" / "data" / "eval.jsonl"


@pytest.fixture(scope="module")
def demo_batches():
    """Held-out demo conversations as the model saw them in training, one per row."""
    tok = load_tokenizer(DEMO)
    rows = [json.loads(line) for line in EVAL.read_text().splitlines()[:12]]
    return [torch.tensor([tok.tokenize_messages([
        {"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"},
        {"role": "assistant", "content": r["output"]},
    ])[0]]) for r in rows]


def _logits(model, batches):
    with torch.no_grad():
        return [model(tokens).float().flatten() for tokens in batches]


@pytest.fixture(scope="module")
def bf16_logits(demo_batches):
    return _logits(fastune.from_pretrained(DEMO, dtype="bf16").eval(), demo_batches)


@pytest.mark.parametrize("scheme, group_size, min_cosine", [
    ("int8wo", None, 0.99),  # the bar
    ("int8dq", None, 0.99),
    ("int4wo", 64, 0.98),  # measured 0.994 at worst over these prompts
])
def test_quantized_logits_stay_close_to_bf16(tmp_path, demo_batches, bf16_logits, scheme, group_size, min_cosine):
    out = quantize_checkpoint(DEMO, tmp_path / "q", QuantizationRecipe(scheme, group_size=group_size))
    model, _, _ = load_for_inference(out)  # the loader `fastune generate` uses
    cosines = [F.cosine_similarity(a, b, dim=0).item() for a, b in zip(_logits(model, demo_batches), bf16_logits)]
    assert min(cosines) >= min_cosine
    # On disk: the decoder's linear weights shrink to 1 byte per parameter plus scales;
    # the tied embedding stays bf16. int4wo too: torchao's int4 layout that runs and
    # serializes on CPU (IntxUnpackedToInt8Tensor) keeps one value per byte, with a
    # scale and zero point per group.
    ratio = disk_size(out) / disk_size(DEMO)
    assert ratio < {"int8wo": 0.56, "int8dq": 0.56, "int4wo": 0.6}[scheme]


@pytest.mark.parametrize("scheme, group_size", [("int8wo", None), ("int4wo", 32), ("int8dq", None)])
def test_saved_checkpoint_reloads_exactly(tmp_path, demo_batches, scheme, group_size):
    recipe = QuantizationRecipe(scheme, group_size=group_size)
    in_memory = quantize_model(fastune.from_pretrained(DEMO, dtype="bf16").eval(), recipe)
    reloaded = load_quantized(quantize_checkpoint(DEMO, tmp_path / "q", recipe))
    for a, b in zip(_logits(in_memory, demo_batches[:3]), _logits(reloaded, demo_batches[:3])):
        assert torch.equal(a, b)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert config["quantization_config"]["quant_type"]["default"]["_type"] == TORCHAO_CONFIGS[scheme]
    assert (tmp_path / "q" / "tokenizer.json").is_file()


TORCHAO_CONFIGS = {"int8wo": "Int8WeightOnlyConfig", "int4wo": "IntxWeightOnlyConfig",
                   "int8dq": "Int8DynamicActivationInt8WeightConfig"}


def test_generate_from_a_quantized_checkpoint(tmp_path):
    out = quantize_checkpoint(DEMO, tmp_path / "q", QuantizationRecipe("int8wo"))
    model, tok, _ = load_for_inference(out)
    expected = tok.decode(generate(model, [tok.encode("Write the word backwards.")], 6).tokens[0])
    result = CliRunner().invoke(main, ["generate", str(out), "Write the word backwards.", "--no-chat",
                                       "--max-new-tokens", "6", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"


@pytest.mark.parametrize("scheme, group_size", [("int8wo", None), ("int4wo", 32), ("int8dq", None)])
def test_transformers_loads_the_quantized_folder_with_fastunes_logits(tmp_path, demo_batches, scheme, group_size):
    """The folder is torchao's serialization with transformers' TorchAoConfig: from_pretrained
    loads it as it is, quantized (not dequantized), and computes fastune's logits."""
    import transformers

    out = quantize_checkpoint(DEMO, tmp_path / "q", QuantizationRecipe(scheme, group_size=group_size))
    ours = load_quantized(out, kernels="none")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    weight = theirs.model.layers[0].mlp.down_proj.weight
    assert type(weight).__name__ == type(ours.layers[0].mlp.down_proj.weight).__name__ != "Parameter"
    with torch.no_grad():
        for tokens in demo_batches[:3]:
            assert torch.equal(theirs(input_ids=tokens).logits, ours(tokens))


def test_cli_quantize_reports_the_size_and_keeps_existing_output(tmp_path):
    out = tmp_path / "q"
    result = CliRunner().invoke(main, ["quantize", str(DEMO), str(out), "--scheme", "int4wo", "--group-size", "32"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: int4wo, weights" in result.stdout and "smaller than" in result.stdout
    assert f'loads in fastune and in transformers: AutoModelForCausalLM.from_pretrained("{out}")' in result.stdout
    again = CliRunner().invoke(main, ["quantize", str(DEMO), str(out)])
    assert again.exit_code == 2 and again.stderr.strip() == f"error: {out} exists; pass --force to replace it"


def test_bad_group_size_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["quantize", str(DEMO), str(tmp_path / "q"), "--scheme", "int4wo",
                                       "--group-size", "48"])
    assert result.exit_code == 2
    config = fastune.ModelConfig.from_json(DEMO)
    common = math.gcd(config.hidden_size, config.intermediate_size, config.num_attention_heads * config.head_dim)
    assert re.fullmatch(rf"error: group_size: 48 does not divide the \d+ input features of layers\.0\.\S+; "
                        rf"use {common & -common} or another divisor of {common}\n", result.stderr)
    assert not (tmp_path / "q").exists()


def test_requantizing_and_corrupt_files_are_clear_errors(tmp_path):
    out = quantize_checkpoint(DEMO, tmp_path / "q", QuantizationRecipe("int8wo"))
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "qq", QuantizationRecipe("int8wo"))
    from safetensors.torch import load_file, save_file

    from safetensors import safe_open

    with safe_open(out / HF_WEIGHTS, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(out / HF_WEIGHTS)
    del tensors["model.layers.1.mlp.up_proj._weight_scale"]
    save_file(tensors, out / HF_WEIGHTS, metadata=metadata)
    with pytest.raises(CheckpointError, match="the tensors of 'model.layers.1.mlp.up_proj.weight' are missing"):
        load_quantized(out)
    save_file(tensors, out / HF_WEIGHTS)  # no torchao metadata
    with pytest.raises(CheckpointError, match="no torchao metadata"):
        load_quantized(out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fastune-torchao", "scheme": "int8wo"}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationError, match="earlier fastune in its own format; quantize the original"):
        load_quantized(out)


def test_recipe_checks_its_settings():
    with pytest.raises(QuantizationError, match="unknown 'int3wo'"):
        QuantizationRecipe("int3wo")
    with pytest.raises(QuantizationError, match="group_size"):
        QuantizationRecipe("int8wo", group_size=32)
