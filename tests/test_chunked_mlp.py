"""Chunked MLP (fastune.modules.chunked): the same outputs and gradients as the plain
MLP, with LoRA (and its dropout) and activation checkpointing, and no [T, I] tensor
saved for backward at full length."""

from __future__ import annotations

import pytest
import torch
from tiny_hf import build_hf_model, random_tokens, save_hf_model

import fastune
from fastune.modules.chunked import apply_chunked_mlp
from fastune.modules.peft import apply_lora
from fastune.training.memory import apply_activation_checkpointing

B, T, CHUNK = 2, 24, 7  # 48 tokens in chunks of 7: the last chunk is short
HIDDEN = 64  # tiny_hf's hidden size


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return save_hf_model(build_hf_model("llama_gqa_llama3"), tmp_path_factory.mktemp("chunked"))


def naive_chunks(model, chunk):
    """The reference: the same chunks through plain autograd (same dropout draws, in the
    same order, as the chunked forward; a full-length MLP draws its masks differently)."""
    for layer in model.layers:
        def forward(x, mlp_forward=layer.mlp.forward):
            flat = x.reshape(-1, x.shape[-1])
            return torch.cat([mlp_forward(c) for c in flat.split(chunk)]).view(*x.shape[:-1], -1)
        layer.mlp.forward = forward


def build(path, chunk, ac, lora, kernels="all", naive=False):
    model = fastune.from_pretrained(path, kernels=kernels)
    if lora:
        torch.manual_seed(0)  # the same A in every model
        apply_lora(model, ["q_proj", "gate_proj", "up_proj", "down_proj"], rank=4, alpha=8, dropout=0.1)
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    if naive:
        naive_chunks(model, chunk)
    else:
        apply_chunked_mlp(model, chunk)
    apply_activation_checkpointing(model, ac)
    return model.train()


def run(model, tokens, labels):
    """Loss, logits and every gradient (the parameters' and the embeddings' output)."""
    torch.manual_seed(7)  # same dropout masks for every model
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kernels", ["all", "none"])
@pytest.mark.parametrize("ac", [False, "full", "selective"])
@pytest.mark.parametrize("lora", [False, True])
def test_chunked_mlp_gives_the_same_outputs_and_gradients(path, ac, lora, kernels):
    tokens, labels = random_tokens(B, T), random_tokens(B, T, seed=3)
    plain_logits, plain_grads = run(build(path, CHUNK, ac, lora, kernels, naive=True), tokens, labels)
    logits, grads = run(build(path, CHUNK, ac, lora, kernels), tokens, labels)
    torch.testing.assert_close(logits, plain_logits, atol=1e-5, rtol=0)
    assert set(grads) == set(plain_grads) and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("ac", [False, "full"])
def test_no_intermediate_tensor_exists_at_full_length(path, ac):
    """The largest tensor of the MLP's intermediate size I that any op creates, in
    forward and backward (recomputations included): [B*T, I] for the plain MLP, at most
    [CHUNK, I] chunked; so none is saved for backward at full length either."""
    from torch.utils._python_dispatch import TorchDispatchMode

    inter = build_hf_model("llama_gqa_llama3").config.intermediate_size

    class Largest(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                # activations only: the down projection's weight (and its grad) is [H, I] too
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == inter and t.shape[0] != HIDDEN:
                    Largest.rows = max(Largest.rows, t.shape[:-1].numel())
            return out

    def largest(chunk):
        model = build(path, chunk, ac, lora=True)
        Largest.rows = 0
        with Largest():
            run(model, random_tokens(B, T), random_tokens(B, T, seed=3))
        return Largest.rows

    assert largest(None) == B * T
    assert 0 < largest(CHUNK) <= CHUNK


def test_inference_and_bad_chunk(path):
    model = build(path, CHUNK, False, lora=True).eval()
    plain = build(path, None, False, lora=True).eval()  # eval: no dropout, so no chunks needed
    tokens = random_tokens(B, T)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), plain(tokens), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="chunked_mlp: expected a positive number of tokens"):
        apply_chunked_mlp(model, -3)
