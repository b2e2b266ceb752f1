"""Exact-match evaluation during training decodes with the KV-cache generator: traced on
fake tensors for Llama-3.1-8B at the shape of the GPU-path review (32 prompts of 1024
tokens), its memory is the weights, the cache, and one layer's prefill temporaries,
never [batch, sequence, vocab] logits (8.4 GB per token in bf16 without a cache), and
it fits the H100 profile (the 24 GiB of an RTX 4090 hold it only without the CUDA
context: 23.5 GiB with bf16 weights)."""

import importlib.resources
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from fastune.bench.plan import CUDA_BLOCK, CUDA_CONTEXT_GIB, GIB
from fastune.bench.profiles import load_profile
from fastune.models import ModelConfig, Transformer
from fastune.training.exact_match import exact_match_accuracy
from fastune.training.memory_tracker import MemoryTracker

BATCH, PROMPT, NEW = 32, 1024, 4


@pytest.mark.slow
def test_exact_match_decoding_of_an_8b_model_fits_the_profile(monkeypatch):
    path = importlib.resources.files("fastune") / "assets" / "model_configs" / "llama3_1_8b"
    config = ModelConfig.from_json(str(path))
    # Fake tensors have no values: every token read back is 0 (no stop id, so every
    # step runs).
    monkeypatch.setattr(FakeTensor, "tolist", lambda t: [0] * t.shape[0])
    tokenizer = types.SimpleNamespace(stop_ids=[], decode=lambda ids: "")
    examples = [([1] * PROMPT, "answer")] * BATCH
    with FakeTensorMode():
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = Transformer(config)
        finally:
            torch.set_default_dtype(previous)
        tracker = MemoryTracker(round_to=CUDA_BLOCK)
        tracker.track_existing([*model.parameters(), *model.buffers()], "parameters")
        with tracker:
            exact_match_accuracy(model, tokenizer, examples, max_new_tokens=NEW)
        report = tracker.finish(model)

    head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    cache = 2 * config.num_hidden_layers * BATCH * config.num_key_value_heads * (PROMPT + NEW) * head_dim * 2
    mlp = BATCH * PROMPT * config.intermediate_size * 2  # one [B, P, I] bf16 tensor
    activations = report.by_category["activations"] + report.by_category["temporary"]
    h100 = load_profile("h100_sxm").memory_gib
    print(f"\n8B exact match, {BATCH} x {PROMPT} tokens: peak {report.peak_bytes / GIB:.1f} GiB "
          f"(weights {report.by_category['parameters'] / GIB:.1f}, cache {cache / GIB:.1f}, "
          f"other activations {(activations - cache) / GIB:.1f})")
    # The cache, then one layer's prefill temporaries (gate, up, silu, product: 4 [B, P, I];
    # the residual stream and the norm's fp32 copies): no [B, S, V] logits (8.4 GB a token).
    assert cache <= activations <= cache + 6 * mlp < cache + BATCH * PROMPT * config.vocab_size * 2
    assert report.peak_bytes / GIB + CUDA_CONTEXT_GIB <= h100
