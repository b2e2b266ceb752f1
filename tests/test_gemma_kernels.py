"""Gemma's numerics with kernels on and off: a toy family on the shared decoder with
Gemma's norm ((1 + w) * xhat in fp32), GeGLU (``gelu_pytorch_tanh``) and final-logit
softcapping. The plain model computes them; ``apply_kernels`` swaps in the fused norm
variant and FusedGeGLUMLP, and ``build_loss`` keeps the fused loss with the cap inside.
Kernels on equal kernels off in fp32, and stay within the bf16 rule in bf16 (tiny sizes:
bf16 matmuls are slow on this CPU)."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fastune.models.spec as spec_module
from fastune.kernels.dispatch import force_triton
from fastune.models.config import ModelConfig
from fastune.models.spec import Numerics, get_spec, register
from fastune.models.transformer import MLP, Transformer
from fastune.modules.kernels import FusedGeGLUMLP, FusedRMSNorm, apply_kernels
from fastune.training.loss import build_loss
from tests.kernels.numerics import assert_bf16_close

BSZ, SEQLEN, VOCAB, CAP = 2, 7, 37, 2.0
GEMMA = Numerics(norm_weight_offset=1.0, norm_weight_in_fp32=True, activation="gelu_pytorch_tanh")
LOSS_CFG = {"chunk_size": 5, "z_loss": 0.0, "label_smoothing": 0.0}


@pytest.fixture(autouse=True)
def toy_gemma(monkeypatch):
    monkeypatch.setattr(spec_module, "_REGISTRY", dict(spec_module._registry()))
    register(dataclasses.replace(get_spec("llama"), model_type="toy_gemma", numerics=GEMMA))


def config() -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                       num_attention_heads=3, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-6,
                       model_type="toy_gemma", final_logit_softcapping=CAP)


def models(dtype=torch.float32):
    """(kernels off, kernels on) with the same random weights; norm weights around 0,
    as Gemma stores them; an output layer large enough that the cap bites."""
    torch.manual_seed(0)
    off = Transformer(config())
    with torch.no_grad():
        for name, p in off.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
        off.lm_head.weight.mul_(20)
    on = Transformer(config())
    on.load_state_dict(off.state_dict())
    apply_kernels(on, "all")
    return off.to(dtype), on.to(dtype)


def batch():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BSZ, SEQLEN), generator=gen)
    labels = torch.randint(0, VOCAB, (BSZ, SEQLEN), generator=gen)
    labels[0, :2] = -100
    return tokens, labels


def loss_and_grads(model, loss_fn):
    tokens, labels = batch()
    model.zero_grad(set_to_none=True)
    logits = model(tokens)
    loss, _ = loss_fn(model(tokens, return_hidden=True), labels)
    loss.backward()
    return [logits.detach(), loss.detach()], {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_plain_model_caps_logits_and_uses_geglu():
    off, on = models()
    assert type(off.layers[0].mlp) is MLP and off.layers[0].mlp.activation == "gelu_pytorch_tanh"
    assert type(on.layers[0].mlp) is FusedGeGLUMLP and type(on.norm) is FusedRMSNorm
    tokens, _ = batch()
    hidden = off(tokens, return_hidden=True)
    raw = off.lm_head(hidden)
    assert raw.abs().max() > 2 * CAP  # the cap bites
    torch.testing.assert_close(off(tokens), CAP * torch.tanh(raw / CAP))


@pytest.mark.parametrize("triton_path", [False, True], ids=["reference", "triton"])
def test_fp32_kernels_on_equal_kernels_off(triton_path):
    off, on = models()
    want, want_grads = loss_and_grads(off, build_loss(off, LOSS_CFG))
    with force_triton(triton_path):
        got, got_grads = loss_and_grads(on, build_loss(on, LOSS_CFG))
    tol = 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=tol, atol=tol,
                                   msg=lambda m: f"grad of {name}: {m}")


def test_bf16_kernels_on_within_bf16_rule_of_kernels_off():
    """Kernels on (Triton, interpreter; fused loss with the cap inside) in bf16 are at most
    2x as far from the float64 model as the plain bf16 model with its eager loss is."""
    off, on = models(torch.bfloat16)
    truth_model = copy.deepcopy(off).double()  # the bf16 weights, exactly, in float64

    def truth_loss(hidden, labels):
        logits = truth_model.logits(hidden)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum"), None

    truth, truth_grads = loss_and_grads(truth_model, truth_loss)
    eager, eager_grads = loss_and_grads(off, build_loss(off, LOSS_CFG))
    with force_triton():
        got, got_grads = loss_and_grads(on, build_loss(on, LOSS_CFG))
    names = ["logits", "loss"] + list(truth_grads)
    # The loss is an fp32 sum (see tests/kernels/test_cross_entropy.py): an fp32 ulp of slack.
    slack = max(torch.finfo(torch.float32).eps * truth[1].abs().item(), 1e-6)
    assert_bf16_close(got[1:], eager[1:], truth[1:], ["loss"], slack=slack)
    assert_bf16_close(got[:1] + [got_grads[n] for n in truth_grads],
                      eager[:1] + [eager_grads[n] for n in truth_grads],
                      truth[:1] + [truth_grads[n] for n in truth_grads], names[:1] + names[2:])


def test_final_logit_softcapping_round_trips_through_config_json():
    hf = {"vocab_size": 37, "hidden_size": 40, "intermediate_size": 56, "num_hidden_layers": 2,
          "num_attention_heads": 4, "model_type": "toy_gemma"}
    assert ModelConfig.from_hf_dict(hf).final_logit_softcapping is None
    assert "final_logit_softcapping" not in ModelConfig.from_hf_dict(hf).to_hf_dict()
    config = ModelConfig.from_hf_dict({**hf, "final_logit_softcapping": 30.0})
    assert config.final_logit_softcapping == 30.0 and "final_logit_softcapping" not in config.extra
    assert config.to_hf_dict()["final_logit_softcapping"] == 30.0
