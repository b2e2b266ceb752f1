"""The attention seam (fastune/models/attention.py): each path against a dense
reference (the CPU document path forward and backward, in fp32 and bf16), sliding
windows and Qwen3 against transformers (logits, packing, greedy generation past the
window, round trip), the per-layer RoPE mechanism, and a fake-tensor trace of a packed
training step with no [S, S] tensor."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tiny_hf import build_hf_model, hf_logits, random_tokens, save_hf_model
from torch.utils._python_dispatch import TorchDispatchMode

import fastune
from fastune.generation import generate
from fastune.models import attention
from fastune.models.attention import AttentionMasks, LayerAttention, attend, blocked_attention
from fastune.models.config import ModelConfig
from fastune.models.document_attention import _document_attention, document_attention, document_first, key_ranges
from fastune.models.transformer import Transformer

FP32_ATOL = 1e-5
WINDOWED = ["mistral_window", "qwen2_window", "qwen3", "gemma3", "gemma2"]


def dense_reference(q, k, v, document_ids=None, window=None, softcap=None, return_mask=False):
    """Attention with an explicit [B, 1, S, S] mask, in float64 (or that boolean mask)."""
    q, k, v = (t.double() for t in (q, k, v))
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    seqlen = q.shape[2]
    i, j = torch.arange(seqlen)[:, None], torch.arange(seqlen)[None, :]
    keep = (j <= i) & ((i - j < window) if window else True)
    keep = keep[None, None]
    if document_ids is not None:
        keep = keep & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    if return_mask:
        return keep
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    return scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def qkv(batch=2, heads=4, kv_heads=2, seqlen=37, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, h, seqlen, dim, generator=gen) for h in (heads, kv_heads, kv_heads))


DOCS = torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [0] * 37])


@pytest.mark.parametrize("window,softcap,docs", [(None, None, True), (5, None, False), (5, 3.0, True),
                                                 (None, 2.0, False), (40, None, True)])
def test_blocked_path_matches_dense_reference(window, softcap, docs):
    q, k, v = qkv()
    doc = DOCS if docs else None
    out = blocked_attention(q, k, v, doc, window, softcap, block=8)
    assert (out.double() - dense_reference(q, k, v, doc, window, softcap)).abs().max() < 1e-5


# Document 1 comes back after document 2 in row 0: ids need not be contiguous runs.
SCATTERED = torch.tensor([[0, 0, 1, 1, 1, 0, 2, 2, 1, 0] + [3] * 27, DOCS[0].tolist()])


@pytest.mark.parametrize("window,docs", [(None, DOCS), (5, None), (40, DOCS), (7, SCATTERED), (None, SCATTERED)])
def test_document_path_matches_dense_reference_forward_and_backward(window, docs):
    q, k, v = (t.requires_grad_() for t in qkv())
    out = document_attention(q, k, v, docs, window, block=8)
    ref = dense_reference(q, k, v, docs, window)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(ref, (q, k, v), grad.double())
    assert (out.double() - ref).abs().max() < 1e-5
    for got, want in zip(ours, theirs):
        assert (got.double() - want).abs().max() < 1e-5
    # float64 in, float64 through (the models' float64 truth runs take this path too)
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = document_attention(q, k, v, docs, window, block=8)
    ref = dense_reference(q, k, v, docs, window)
    assert (out - ref).abs().max() < 1e-12
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad.double()),
                         torch.autograd.grad(ref, (q, k, v), grad.double())):
        assert (got - want).abs().max() < 1e-12


def test_document_path_in_bf16_is_as_close_as_eager_sdpa_with_a_dense_mask():
    """Error against the float64 reference, output and gradients, at most that of eager
    bf16 SDPA over the whole [S, S] mask (DESIGN.md: bf16 judged against eager bf16)."""
    q, k, v = qkv(seqlen=37, dim=16)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    keep = dense_reference(q, k, v, DOCS, 9, return_mask=True)

    def run(fn, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*inputs)
        return [out.double(), *(g.double() for g in torch.autograd.grad(out, inputs, grad.to(dtype)))]

    exact = run(lambda q, k, v: dense_reference(q, k, v, DOCS, 9), torch.float64)
    ours = run(lambda q, k, v: document_attention(q, k, v, DOCS, 9, block=8), torch.bfloat16)
    eager = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True),
                torch.bfloat16)
    for mine, theirs, want in zip(ours, eager, exact):
        assert (mine - want).abs().max() <= 1.5 * (theirs - want).abs().max()


def test_document_key_ranges_start_at_the_first_key_a_block_can_see():
    assert document_first(SCATTERED)[0, :10].tolist() == [0, 0, 2, 2, 2, 0, 6, 6, 2, 0]
    # Documents start at 0, 10, 30 in row 0 and at 0, 12 in row 1: a block starts at the
    # earliest first key of any of its queries in any row.
    docs = torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [0] * 12 + [1] * 25])
    assert key_ranges(docs, 37, 8, None) == [(0, 8, 0), (8, 16, 0), (16, 24, 10), (24, 32, 10), (32, 37, 12)]
    assert key_ranges(docs, 37, 8, 5) == [(0, 8, 0), (8, 16, 4), (16, 24, 12), (24, 32, 20), (32, 37, 28)]
    assert key_ranges(None, 37, 8, None) == [(0, 8, 0), (8, 16, 0), (16, 24, 0), (24, 32, 0), (32, 37, 0)]


def test_document_op_passes_opcheck_and_compiles_once_for_every_document_layout():
    from torch._dynamo.testing import CompileCounter

    q, k, v = (t.requires_grad_() for t in qkv())
    torch.library.opcheck(_document_attention, (q, k, v, DOCS, 8, None, 0.3))
    torch.library.opcheck(_document_attention, (q, k, v, None, 8, 5, 0.3))
    counter = CompileCounter()
    compiled = torch.compile(lambda q, k, v, docs: document_attention(q, k, v, docs, None, 8).square().sum(),
                             backend=counter)
    for docs in (DOCS, SCATTERED, torch.tensor([[0] * 3 + [1] * 34, [0] * 20 + [1] * 17])):
        got = torch.autograd.grad(compiled(q, k, v, docs), (q, k, v))
        want = torch.autograd.grad(document_attention(q, k, v, docs, None, 8).square().sum(), (q, k, v))
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert counter.frame_count == 1  # the key ranges are the op's business, not guards


def test_cpu_takes_the_document_path_unless_softcapped(monkeypatch):
    seen = []
    for name in ("document_attention", "blocked_attention"):
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, real=real, name=name, **kw: seen.append(name) or real(*a, **kw))
    q, k, v = qkv()
    for layer in (LayerAttention(), LayerAttention(5), LayerAttention(softcap=2.0)):
        attend(q, k, v, layer, AttentionMasks.build([layer], 2, 37, q.device, document_ids=DOCS))
    assert seen == ["document_attention", "document_attention", "blocked_attention"]


def test_flex_path_matches_dense_reference():
    """The CUDA path's block mask and score_mod, run by eager FlexAttention on CPU."""
    q, k, v = qkv()
    masks = AttentionMasks(DOCS, block_masks={5: attention._block_mask(DOCS, 5, 2, 37, q.device)})
    out = attention._flex(q, k, v, masks.block_masks[5], 3.0, gqa=True)
    assert (out.double() - dense_reference(q, k, v, DOCS, 5, 3.0)).abs().max() < 1e-5


def test_explicit_mask_path_applies_the_window_on_cache_positions():
    q, k, v = qkv(batch=1, seqlen=12)
    full = torch.ones(1, 1, 12, 12, dtype=torch.bool).tril()
    masks = AttentionMasks.build([LayerAttention(4)], 1, 12, q.device, mask=full, input_pos=torch.arange(12))
    out = attend(q, k, v, LayerAttention(4, 3.0), masks)
    assert (out.double() - dense_reference(q, k, v, window=4, softcap=3.0)).abs().max() < 1e-5


def test_plain_causal_takes_sdpa_is_causal(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    q, k, v = qkv()
    attend(q, k, v, LayerAttention(), AttentionMasks.build([LayerAttention()], 2, 37, q.device))
    assert seen == [{"is_causal": True, "enable_gqa": True, "scale": None}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = {}

    def get(variant):
        if variant not in cache:
            hf = build_hf_model(variant, seed=3)
            cache[variant] = hf, save_hf_model(hf, tmp_path_factory.mktemp(variant))
        return cache[variant]

    return get


def logits(model, tokens, **kwargs):
    with torch.no_grad():
        return model(tokens, **kwargs)


@pytest.mark.parametrize("variant", WINDOWED)
def test_windowed_logits_match_transformers_over_several_blocks(tiny, variant, monkeypatch):
    hf, path = tiny(variant)
    model = fastune.from_pretrained(path)
    assert model.config.sliding_window is not None
    monkeypatch.setattr(attention, "BLOCK", 16)  # several query blocks in 45 tokens
    tokens = random_tokens(2, 45)
    theirs = hf_logits(hf, tokens)
    assert (logits(model, tokens) - theirs).abs().max() <= FP32_ATOL
    for layer in model.layers:  # negative control: without the window the logits differ
        layer.self_attn.layer = LayerAttention()
    assert (logits(model, tokens) - theirs).abs().max() > 1e-3


def test_layer_types_follow_transformers():
    hf = build_hf_model("qwen2_window")
    ours = ModelConfig.from_hf_dict(hf.config.to_dict())
    assert list(ours.layer_types) == hf.config.layer_types == ["full_attention", "sliding_attention"]
    off = ModelConfig.from_hf_dict({**hf.config.to_dict(), "use_sliding_window": False})
    assert off.sliding_window is None and off.layer_attention(1) == LayerAttention()


@pytest.mark.parametrize("variant", WINDOWED)
def test_packed_windowed_documents_equal_separate_runs(tiny, variant, monkeypatch):
    hf, path = tiny(variant)
    model = fastune.from_pretrained(path)
    monkeypatch.setattr(attention, "BLOCK", 16)
    lengths = [30, 9, 25]
    tokens = random_tokens(1, sum(lengths))
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    ours = logits(model, tokens, position_ids=pos, document_ids=doc_ids)
    separate = torch.cat([hf_logits(hf, doc) for doc in tokens.split(lengths, dim=1)], dim=1)
    assert (ours - separate).abs().max() <= FP32_ATOL


@pytest.mark.parametrize("variant", WINDOWED)
def test_greedy_generation_past_the_window_equals_transformers(tiny, variant):
    hf, path = tiny(variant)
    model = fastune.from_pretrained(path).eval()
    prompts = [[5, 17, 33, 2, 61, 9, 40, 8, 11, 70], [71, 3]]  # 10 + 24 tokens > windows 12, 16
    ours = generate(model, prompts, max_new_tokens=24).tokens
    for prompt, tokens in zip(prompts, ours):
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        assert tokens == theirs[0, len(prompt):].tolist()


@pytest.mark.parametrize("variant", ["qwen3", "qwen3_tied"])
def test_qwen3_round_trip_through_transformers(tiny, tmp_path, variant):
    from transformers import AutoModelForCausalLM

    hf, path = tiny(variant)
    model = fastune.from_pretrained(path)
    assert model.config.qk_norm and not model.config.attention_bias
    assert (model.lm_head.weight is model.embed_tokens.weight) == (variant == "qwen3_tied")
    fastune.save_pretrained(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(reloaded).__name__ == "Qwen3ForCausalLM"
    assert reloaded.config.layer_types == hf.config.layer_types
    tokens = random_tokens(2, 33)
    assert torch.equal(hf_logits(reloaded, tokens), hf_logits(hf, tokens))


def test_qwen3_transformers_4x_config_dialect(tiny, tmp_path):
    """4.x dialect: top-level rope_theta, no layer_types (the sliding layers come from
    max_window_layers, here 0: all). transformers reads the same file."""
    from transformers import AutoModelForCausalLM

    hf, _ = tiny("qwen3")
    path = save_hf_model(hf, tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    for key in ("rope_parameters", "dtype", "layer_types"):
        cfg.pop(key, None)
    cfg.update(rope_theta=1000000.0, rope_scaling=None, torch_dtype="float32", max_window_layers=0)
    (path / "config.json").write_text(json.dumps(cfg))
    model = fastune.from_pretrained(path)
    assert model.config.layer_types == ("sliding_attention", "sliding_attention")
    theirs = AutoModelForCausalLM.from_pretrained(path).eval()
    assert theirs.config.layer_types == ["sliding_attention", "sliding_attention"]
    tokens = random_tokens(2, 45)
    assert (logits(model, tokens) - hf_logits(theirs, tokens)).abs().max() <= FP32_ATOL


def _tiny_config(**changes) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, model_type="qwen3", qk_norm=True)
    return ModelConfig(**{**base, **changes})


def test_per_layer_rope_base():
    """A layer type's own RoPE base: equal to the top-level base where they agree, and a
    model whose sliding layers use base X equals one whose every layer uses X."""
    torch.manual_seed(0)
    types = ("sliding_attention", "sliding_attention")
    plain = Transformer(_tiny_config(rope_theta=10000.0, layer_types=types))
    local = Transformer(_tiny_config(rope_theta=1e6, layer_types=types,
                                     layer_rope={"sliding_attention": {"rope_theta": 10000.0}}))
    local.load_state_dict(plain.state_dict())
    tokens = random_tokens(1, 20, vocab=64)
    assert torch.equal(logits(plain, tokens), logits(local, tokens))
    mixed = Transformer(_tiny_config(rope_theta=1e6, layer_types=("sliding_attention", "full_attention"),
                                     layer_rope={"sliding_attention": {"rope_theta": 10000.0}}))
    mixed.load_state_dict(plain.state_dict())
    assert mixed.rope_keys == ["sliding_attention", ""]
    assert not torch.allclose(logits(mixed, tokens), logits(plain, tokens))


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("changes", [{}, dict(sliding_window=64, layer_types=("sliding_attention",) * 2,
                                              attn_logit_softcapping=30.0)], ids=["docs", "window_softcap"])
def test_packed_training_step_creates_no_seq_by_seq_tensor(changes):
    """Forward, loss and backward of a packed batch on fake tensors: no tensor of any
    op has two dimensions of the sequence length (the old path made [B, 1, S, S])."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    seqlen = 2 * attention.BLOCK + 32
    with FakeTensorMode():
        model = Transformer(_tiny_config(**changes))
        tokens = torch.randint(0, 64, (2, seqlen))
        doc_ids = (torch.arange(seqlen) >= 100).long().expand(2, seqlen)
        pos = torch.cat([torch.arange(100), torch.arange(seqlen - 100)]).expand(2, seqlen)
        with _Shapes() as seen:
            out = model(tokens, position_ids=pos, document_ids=doc_ids)
            F.cross_entropy(out.flatten(0, 1), tokens.flatten()).backward()
    assert seen.shapes and not [s for s in seen.shapes if list(s).count(seqlen) >= 2]
