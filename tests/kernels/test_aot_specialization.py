"""The AOT specs compile the variant real launches get: the launches of the host
functions at the specs' shapes are recorded (specialization computed by Triton's own
launcher rule, without running the kernel) and must each equal one spec's key. A spec
without ``multiple_of_16`` for an integer that real launches see as divisible by 16
compiles (and measures) a variant that never runs."""

import importlib

import pytest
import torch

from fastune.kernels import aot, cross_entropy, linear_cross_entropy
from fastune.kernels.dispatch import force_triton

ce_module = importlib.import_module("fastune.kernels.cross_entropy")
VOCAB = 128256


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](...)`` records the launch's key."""

    def __init__(self, kernel):
        self.kernel, self.keys = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.keys.append(aot.launch_key(self.kernel, args,
                                                                         kwargs))


def test_cross_entropy_launches_match_the_aot_specs(monkeypatch):
    specs = {aot.spec_key(s) for s in ce_module.aot_specs()}
    recorder = _Recorder(ce_module._cross_entropy_kernel)
    monkeypatch.setattr(ce_module, "_cross_entropy_kernel", recorder)
    labels = torch.tensor([5, -100, 7])
    with force_triton(True):
        for smoothing in (0.0, 0.1):  # training: bf16, gradient in place
            logits = torch.zeros(3, VOCAB, dtype=torch.bfloat16, requires_grad=True)
            cross_entropy(logits * 1, labels, label_smoothing=smoothing)
        hidden = torch.zeros(3, 16, dtype=torch.bfloat16, requires_grad=True)
        linear_cross_entropy(hidden, torch.zeros(VOCAB, 16, dtype=torch.bfloat16), labels)
        with torch.no_grad():  # evaluation: fp32, loss only
            cross_entropy(torch.zeros(3, VOCAB), labels)
        # Gemma 2: softcapped logits, training and evaluation
        logits = torch.zeros(3, 256000, dtype=torch.bfloat16, requires_grad=True)
        cross_entropy(logits * 1, labels, softcap=30.0)
        with torch.no_grad():
            cross_entropy(torch.zeros(3, 256000), labels, softcap=30.0)
    launched = set(recorder.keys)
    assert len(launched) == 5
    assert launched <= specs, f"launches with no AOT spec: {launched - specs}"


def test_a_spec_without_divisibility_does_not_match():
    spec = dict(ce_module.aot_specs()[0])
    spec.pop("multiple_of_16")
    key = dict(enumerate(aot.spec_key(spec)))
    assert key[1] == ("i32", "") and key[4] == ("i32", "")  # row_stride, vocab


@pytest.mark.parametrize("value,expected", [(VOCAB, ("i32", "D")), (67, ("i32", "")),
                                            (1, ("constexpr", 1))])
def test_launch_key_follows_the_launcher(value, expected):
    labels = torch.zeros(1, dtype=torch.int64)
    key = aot.launch_key(ce_module._cross_entropy_kernel,
                         (labels, value, labels, labels, value, -100, 0.0, 0.0, 0.0),
                         dict(COMPUTE_GRAD=True, SMOOTHING=False, BLOCK_V=4096, SOFTCAP=False,
                              num_warps=8))
    assert key[1] == expected and key[6] == ("fp32", None)
