"""The planner for the low-memory options: each checked against a real step on this
CPU (within 10%), the chunked MLP's effect on a CUDA plan, and ``--max-context``."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from fastune.bench.context import max_context
from fastune.bench.plan import Candidate, Target, evaluate, trace_step, verify
from fastune.bench.profiles import Profile
from fastune.cli import main
from fastune.config import load_config
from fastune.models.config import ModelConfig

# A model whose MLP dominates its activations, NF4-sized projections (QLoRA).
TINY_MODEL = {"model_type": "llama", "vocab_size": 128, "hidden_size": 128, "intermediate_size": 512,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "rms_norm_eps": 1e-5}
CONFIG = """\
output_dir: {tmp}/out
method: lora
model:
  checkpoint_dir: {tmp}/model
  dtype: fp32
lora:
  rank: 4
  targets: [q_proj, v_proj, gate_proj, up_proj, down_proj]
dataset:
  source: json
  data_files: {tmp}/unused.jsonl
  max_seq_len: 256
batch_size: 2
device: cpu
"""


@pytest.fixture
def tiny(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(TINY_MODEL))
    path = tmp_path / "tiny.yaml"
    path.write_text(CONFIG.format(tmp=tmp_path))
    return path


def config(path, *overrides):
    cfg = load_config(path, overrides, check_paths=False)
    return cfg, ModelConfig.from_json(cfg.model.checkpoint_dir)


@pytest.mark.parametrize("overrides", [
    ("chunked_mlp=64",),
    ("chunked_mlp=64", "activation_checkpointing=true"),
    ("chunked_mlp=100", "method=qlora", "activation_checkpointing=true"),
    ("lora.use_rslora=true", "lora.lora_plus_lr_ratio=16"),
    ("lora.init=pissa",),
    ("lora.init=olora", "method=qlora"),
    ("lora.init=loftq", "method=qlora", "lora.alpha=8"),
])
def test_cpu_estimate_of_each_new_option_is_within_10_percent_of_a_real_step(tiny, overrides):
    check = verify(*config(tiny, *overrides))
    assert abs(check["relative_error"]) < 0.10, check
    assert check["measured"]["peak_bytes"] > 0


def test_chunked_mlp_lowers_the_cuda_estimate(tiny):
    plain = trace_step(*config(tiny, "activation_checkpointing=true"), Target("cuda"))
    chunked = trace_step(*config(tiny, "activation_checkpointing=true", "chunked_mlp=64"), Target("cuda"))
    assert chunked.peak_bytes < plain.peak_bytes
    assert chunked.by_category["parameters"] == plain.by_category["parameters"]


def test_max_context_is_the_longest_multiple_that_fits(tiny):
    cfg, model_config = config(tiny, "activation_checkpointing=true")
    roomy = Profile(key="x", name="x", kind="cuda", memory_gib=1000.0)
    at = lambda tokens, profile: evaluate(  # noqa: E731
        cfg, model_config, profile, Candidate({"batch_size": 1, "dataset.max_seq_len": tokens}, []))
    # a device that holds exactly 1 x 1000 tokens' plan
    need = at(1000, roomy).device_total_gib
    device = dataclasses.replace(roomy, memory_gib=need)
    result = max_context(cfg, model_config, device, step=128)
    best = result["max_seq_len"]
    assert best % 128 == 0 and best >= 896  # 896 = 7 x 128 < 1000
    assert at(best, device).fits and not at(best + 128, device).fits
    assert result["device_total_gib"] <= need


def test_max_context_command_prints_the_result(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("fastune.bench.context.MAX_TOKENS", 1024)  # a tiny model fits 8 GiB at any length here
    out = tmp_path / "reports"
    result = CliRunner().invoke(main, ["plan", str(tiny), "activation_checkpointing=true", "--profile", "rtx4060",
                                       "--max-context", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(next(out.glob("context_*.json")).read_text())
    assert report["max_seq_len"] == report["capped_at"] == 1024 and report["settings"]["batch_size"] == 1
    assert "Longest context" in result.output and "ESTIMATE" in result.output
