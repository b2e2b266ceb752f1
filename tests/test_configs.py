"""Every shipped model config validates as `fastune validate` would, against the
config.json of the model it names (no weights), and says how to get that model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import fastune
from fastune.cli import main
from fastune.config import load_config, shipped_config, shipped_config_names
from fastune.models.config import ModelConfig
from fastune.models.spec import get_spec
from fastune.modules.lora import NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
LLAMA3 = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, rms_norm_eps=1e-5,
              rope_theta=500000.0, rope_scaling=LLAMA3_SCALING, max_position_embeddings=131072)
PHI = dict(model_type="phi3", architectures=["Phi3ForCausalLM"], hidden_size=3072, intermediate_size=8192,
           num_hidden_layers=32, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=131072,
           original_max_position_embeddings=4096, sliding_window=262144, hidden_act="silu")
PHI_LONGROPE = {"type": "longrope"}
QWEN3 = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936, num_key_value_heads=8,
             head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
             attention_bias=False, use_sliding_window=False, sliding_window=None, max_window_layers=28)
GEMMA2 = dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], vocab_size=256000, head_dim=256,
              rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=4096, query_pre_attn_scalar=256,
              attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_act="gelu_pytorch_tanh",
              hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192)
# The shape keys of each model's config.json on the Hub, and its parameter count as published
# (tied embeddings counted once).
MODELS = {
    "meta-llama/Llama-3.2-1B-Instruct": (dict(
        LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, tie_word_embeddings=True), 1_235_814_400),
    "meta-llama/Llama-3.2-3B-Instruct": (dict(
        LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=True), 3_212_749_824),
    "meta-llama/Llama-3.1-8B-Instruct": (dict(
        LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, tie_word_embeddings=False), 8_030_261_248),
    "meta-llama/Llama-2-7b-hf": (dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=4096,
        intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False), 6_738_415_616),
    "mistralai/Mistral-7B-Instruct-v0.3": (dict(
        model_type="mistral", architectures=["MistralForCausalLM"], vocab_size=32768, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=32768,
        sliding_window=None, tie_word_embeddings=False), 7_248_023_552),
    "Qwen/Qwen2.5-7B-Instruct": (dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=3584,
        intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
        tie_word_embeddings=False), 7_615_616_512),
    # Phi: LongRoPE over the rotated dims (Phi-4-mini rotates 96 of 128), fused checkpoint tensors.
    "microsoft/Phi-4-mini-instruct": (dict(
        PHI, vocab_size=200064, num_attention_heads=24, num_key_value_heads=8, partial_rotary_factor=0.75,
        tie_word_embeddings=True, rope_scaling=dict(PHI_LONGROPE, short_factor=[1.0] * 48,
                                                    long_factor=[1.5] * 48)), 3_836_021_760),
    "microsoft/Phi-3.5-mini-instruct": (dict(
        PHI, vocab_size=32064, num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
        rope_scaling=dict(PHI_LONGROPE, short_factor=[1.0] * 48, long_factor=[1.5] * 48)), 3_821_079_552),
    # Qwen3: the model cards' non-embedding counts (0.44B, 1.4B, 3.6B, 6.95B) plus embeddings.
    "Qwen/Qwen3-0.6B": (dict(QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                             num_attention_heads=16, tie_word_embeddings=True), 596_049_920),
    "Qwen/Qwen3-1.7B": (dict(QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                             num_attention_heads=16, tie_word_embeddings=True), 1_720_574_976),
    "Qwen/Qwen3-4B": (dict(QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                           num_attention_heads=32, tie_word_embeddings=True), 4_022_468_096),
    "Qwen/Qwen3-8B": (dict(QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                           num_attention_heads=32, tie_word_embeddings=False), 8_190_735_360),
    "google/gemma-3-1b-it": (dict(
        model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], vocab_size=262144, hidden_size=1152,
        intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
        head_dim=256, rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
        rope_scaling=None, sliding_window=512, sliding_window_pattern=6, query_pre_attn_scalar=256,
        hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None, attn_logit_softcapping=None,
        max_position_embeddings=32768, tie_word_embeddings=True), 999_885_952),
    # Gemma 2: config.json on the Hub leaves layer_types out (sliding, full alternate) and ties.
    "google/gemma-2-2b": (dict(GEMMA2, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                               num_attention_heads=8, num_key_value_heads=4), 2_614_341_888),
    "google/gemma-2-9b": (dict(GEMMA2, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                               num_attention_heads=16, num_key_value_heads=8), 9_241_705_984),
    # Multimodal: text_config names only what differs from Gemma3TextConfig. The count is the
    # language model's (what fastune loads), from transformers' Gemma3ForCausalLM of that config.
    "google/gemma-3-4b-it": (dict(
        model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"], mm_tokens_per_image=256,
        text_config=dict(hidden_size=2560, intermediate_size=10240, model_type="gemma3_text", num_hidden_layers=34,
                         rope_scaling={"factor": 8.0, "rope_type": "linear"}, sliding_window=1024),
        vision_config=dict(hidden_size=1152, image_size=896, intermediate_size=4304,
                           model_type="siglip_vision_model", num_attention_heads=16, num_hidden_layers=27,
                           patch_size=14, vision_use_head=False)), 3_880_263_168),
}
MODEL_CONFIGS = [n for n in shipped_config_names() if n not in ("demo", "dpo_demo")]
DOWNLOAD = re.compile(r"^#\s+fastune download (\S+) --output-dir (\S+)", re.MULTILINE)


def header(name: str) -> str:
    return shipped_config(name).read_text(encoding="utf-8")


def download_line(name: str) -> tuple[str, str]:
    match = DOWNLOAD.search(header(name))
    assert match, f"{name}: no `fastune download REPO --output-dir DIR` line in the header"
    return match.group(1), match.group(2)


def fake_checkpoint(name: str, folder) -> ModelConfig:
    """A folder with the named model's config.json (and an empty tokenizer file where the
    config points at one), as `fastune download` would leave it minus the weights."""
    repo, _ = download_line(name)
    config, _ = MODELS[repo]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = load_config(name, [f"model.checkpoint_dir={folder}"], check_paths=False).tokenizer
    if tokenizer != str(folder):
        (folder / tokenizer.rsplit("/", 1)[-1]).write_bytes(b"")
    return ModelConfig.from_json(folder)


def test_the_issue_s_model_configs_ship():
    assert set(MODEL_CONFIGS) >= {
        "llama3_2/1B_full", "llama3_2/1B_lora", "llama3_2/1B_qlora",
        "llama3_2/3B_full", "llama3_2/3B_lora", "llama3_2/3B_qlora",
        "llama3_1/8B_lora", "llama3_1/8B_qlora", "llama3_1/8B_full",
        "llama2/7B_lora", "llama2/7B_qlora", "mistral/7B_lora", "qwen2_5/7B_lora",
        "phi4/mini_lora", "phi4/mini_qlora", "phi3_5/mini_lora", "phi3_5/mini_qlora",
        "qwen3/0.6B_lora", "qwen3/0.6B_qlora", "qwen3/0.6B_full", "qwen3/1.7B_lora", "qwen3/1.7B_qlora",
        "qwen3/1.7B_full", "qwen3/4B_lora", "qwen3/4B_qlora", "qwen3/8B_lora", "qwen3/8B_qlora",
        "gemma3/1B_lora", "gemma3/1B_qlora", "gemma3/1B_full", "gemma3/4B_lora", "gemma3/4B_qlora",
        "gemma2/2B_lora", "gemma2/2B_qlora", "gemma2/9B_lora", "gemma2/9B_qlora",
    }


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_shipped_config_validates_against_its_model(name, tmp_path):
    repo, output_dir = download_line(name)
    assert repo in MODELS, f"{name}: add {repo}'s config.json to this test"
    cfg = load_config(name, check_paths=False)
    assert cfg.model.checkpoint_dir == output_dir  # the download lands where the config looks
    assert f"fastune train {name}" in header(name)
    assert cfg.method == name.rsplit("_", 1)[-1]  # 8B_qlora is qlora, 1B_full is full
    # As `fastune validate NAME model.checkpoint_dir=...` checks it (paths included).
    model_config = fake_checkpoint(name, tmp_path / "model")
    cfg = load_config(name, [f"model.checkpoint_dir={tmp_path / 'model'}"])
    with torch.device("meta"):
        model = get_spec(model_config.model_type).build(model_config)
    assert sum(p.numel() for p in model.parameters()) == MODELS[repo][1]
    if cfg.method == "qlora":  # NF4 stores every decoder projection in blocks
        for module_name, module in model.named_modules():
            if isinstance(module, nn.Linear) and module_name != "lm_head":
                assert module.weight.numel() % (NF4_BLOCK_SIZE * NF4_SCALER_BLOCK_SIZE) == 0, module_name


def test_fastune_validate_accepts_a_shipped_config(tmp_path):
    fake_checkpoint("llama3_1/8B_full", tmp_path / "model")
    result = CliRunner().invoke(main, ["validate", "llama3_1/8B_full", f"model.checkpoint_dir={tmp_path / 'model'}"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("config OK: llama3_1/8B_full")
    assert "32 layers" in result.stdout and "full" in result.stdout


def test_ls_lists_every_model_config_with_its_method():
    result = CliRunner().invoke(main, ["ls"])
    assert result.exit_code == 0
    rows = {line.split()[2]: line.split()[:2] for line in result.stdout.splitlines()[1:]}
    for name in MODEL_CONFIGS:
        model, method = name.split("/")[0], load_config(name, check_paths=False).method
        assert rows[name] == [model, method]


# The config.json files fastune plan reads for the shipped configs (fastune/assets/model_configs).
ASSETS = {
    "qwen3_0_6b": "Qwen/Qwen3-0.6B", "qwen3_1_7b": "Qwen/Qwen3-1.7B", "qwen3_4b": "Qwen/Qwen3-4B",
    "qwen3_8b": "Qwen/Qwen3-8B", "phi3_5_mini": "microsoft/Phi-3.5-mini-instruct",
    "phi4_mini": "microsoft/Phi-4-mini-instruct", "gemma3_1b": "google/gemma-3-1b-it",
    "gemma3_4b": "google/gemma-3-4b-it", "gemma2_2b": "google/gemma-2-2b", "gemma2_9b": "google/gemma-2-9b",
}  # the Llama ones: tests/test_plan.py


@pytest.mark.parametrize("asset", sorted(ASSETS))
def test_model_config_asset_is_the_model_s_config(asset):
    """Each committed config.json builds the model of the Hub config above: the same
    config (LongRoPE factor values and token ids aside) and the published parameter count."""
    ours = ModelConfig.from_json(Path(fastune.__file__).parent / "assets" / "model_configs" / asset)
    config, count = MODELS[ASSETS[asset]]
    theirs = ModelConfig.from_hf_dict(config)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "tie_word_embeddings", "qk_norm", "sliding_window",
                  "layer_types", "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
                  "rope_theta", "layer_rope", "partial_rotary_factor", "model_type"):
        assert getattr(ours, field) == getattr(theirs, field), field
    with torch.device("meta"):
        model = get_spec(ours.model_type).build(ours)
    assert sum(p.numel() for p in model.parameters()) == count
