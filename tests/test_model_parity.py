"""fastune logits against transformers' for the same tiny random checkpoints.

Each checkpoint is written by ``transformers`` ``save_pretrained`` and loaded by
``fastune.from_pretrained``; fp32 must agree to 1e-5 (max abs), bf16 within
twice transformers' own bf16 error against an fp64 truth.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_hf import LLAMA3_SCALING, VARIANTS, build_hf_model, hf_logits, random_tokens, save_hf_model

import fastune
from fastune.models import transformer

FP32_ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(variant, sharded=False) -> (HF model, checkpoint dir), built once per module."""
    cache = {}

    def get(variant: str, sharded: bool = False):
        if (variant, sharded) not in cache:
            model = build_hf_model(variant)
            out = tmp_path_factory.mktemp(f"{variant}_sharded" if sharded else variant)
            save_hf_model(model, out, max_shard_size="40KB" if sharded else None)
            cache[variant, sharded] = (model, out)
        return cache[variant, sharded]

    return get


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def fastune_logits(model, tokens, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, **kwargs)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fp32_logits_match_transformers(tiny, variant):
    hf, path = tiny(variant)
    model = fastune.from_pretrained(path)
    tokens = random_tokens(2, 45)
    assert max_abs(fastune_logits(model, tokens), hf_logits(hf, tokens)) <= FP32_ATOL


def test_sharded_checkpoint_matches(tiny):
    hf, path = tiny("llama_gqa_llama3", sharded=True)
    assert len(list(path.glob("model-*-of-*.safetensors"))) >= 3
    model = fastune.from_pretrained(path)
    tokens = random_tokens(2, 45)
    assert max_abs(fastune_logits(model, tokens), hf_logits(hf, tokens)) <= FP32_ATOL


def test_tied_checkpoint_has_no_lm_head_and_ties(tiny):
    _, path = tiny("llama_tied")
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # the case the loader must accept
    model = fastune.from_pretrained(path)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_qwen2_biases_are_loaded(tiny):
    hf, path = tiny("qwen2_bias")
    model = fastune.from_pretrained(path)
    ours, theirs = model.layers[1].self_attn.k_proj.bias, hf.model.layers[1].self_attn.k_proj.bias
    assert torch.equal(ours, theirs) and ours.abs().sum() > 0


def _write_4x_config(path, rope_theta: float, rope_scaling: dict) -> None:
    """Rewrite a transformers 5 config.json in the 4.x dialect: top-level rope_theta
    and rope_scaling, torch_dtype, and no head_dim."""
    cfg = json.loads((path / "config.json").read_text())
    for key in ("rope_parameters", "head_dim", "dtype"):
        cfg.pop(key, None)
    cfg.update(rope_theta=rope_theta, rope_scaling=rope_scaling, torch_dtype="float32")
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "variant,rope_theta,rope_scaling",
    [
        ("llama_linear_rope", 50000.0, {"type": "linear", "factor": 4.0}),
        ("llama_gqa_llama3", 500000.0, LLAMA3_SCALING),
    ],
    ids=["linear_via_type", "llama3_via_rope_type"],
)
def test_transformers_4x_config_dialect(tiny, tmp_path, variant, rope_theta, rope_scaling):
    hf, _ = tiny(variant)
    path = save_hf_model(hf, tmp_path / "ckpt")
    _write_4x_config(path, rope_theta, rope_scaling)
    model = fastune.from_pretrained(path)
    assert model.config.head_dim == 16
    tokens = random_tokens(2, 45)
    assert max_abs(fastune_logits(model, tokens), hf_logits(hf, tokens)) <= FP32_ATOL


def test_explicit_position_ids_match(tiny):
    """Restarting position ids, as a packed batch has, without a document mask on either side."""
    hf, path = tiny("llama_gqa_llama3")
    model = fastune.from_pretrained(path)
    tokens = random_tokens(2, 40)
    pos = torch.cat([torch.arange(15), torch.arange(25)]).expand(2, -1)
    ours = fastune_logits(model, tokens, position_ids=pos)
    assert max_abs(ours, hf_logits(hf, tokens, position_ids=pos)) <= FP32_ATOL


def test_packed_documents_match_separate_forwards(tiny):
    """A packed row with document_ids gives each document the logits HF gives it alone."""
    hf, path = tiny("llama_gqa_llama3")
    model = fastune.from_pretrained(path)
    lengths = [11, 20, 7]
    tokens = random_tokens(1, sum(lengths))
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    ours = fastune_logits(model, tokens, position_ids=pos, document_ids=doc_ids)
    separate = torch.cat([hf_logits(hf, doc) for doc in tokens.split(lengths, dim=1)], dim=1)
    assert max_abs(ours, separate) <= FP32_ATOL


def _bf16_cos_sin(inv_freq, position_ids, dtype, scale=1.0):
    """A classic bf16 bug, for the negative control: RoPE angles computed in bf16."""
    freqs = position_ids.to(torch.bfloat16)[..., None] * inv_freq.to(torch.bfloat16)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def test_bf16_error_within_twice_transformers_bf16(tiny, monkeypatch):
    """fastune-bf16 error <= 2 x transformers-bf16 error (both against HF in fp64) + 1e-6,
    and the same bound rejects bf16 RoPE angles (so it can fail). Positions start
    at 1000, as a late chunk of a long sequence, where bf16 angles go wrong."""
    from transformers import AutoModelForCausalLM

    hf, path = tiny("llama_gqa_llama3")
    tokens = random_tokens(2, 64)
    pos = (torch.arange(64) + 1000).expand(2, -1)

    def hf_at(dtype):
        return hf_logits(AutoModelForCausalLM.from_pretrained(path, dtype=dtype), tokens, pos)

    def ours_at(dtype):
        model = fastune.from_pretrained(path, dtype=dtype)
        assert model.embed_tokens.weight.dtype == dtype
        return fastune_logits(model, tokens, position_ids=pos)

    truth = hf_at(torch.float64)
    assert max_abs(ours_at(torch.float64), truth) <= 1e-10
    bound = 2 * max_abs(hf_at(torch.bfloat16), truth) + 1e-6
    assert max_abs(ours_at(torch.bfloat16), truth) <= bound

    monkeypatch.setattr(transformer, "rope_cos_sin", _bf16_cos_sin)
    assert max_abs(ours_at(torch.bfloat16), truth) > bound
