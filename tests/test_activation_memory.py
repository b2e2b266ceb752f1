"""Selective checkpointing keeps fastune's fused LoRA outputs; activation offloading
copies each storage once and brings layers back one ahead of backward. The offloading
hooks run on the CPU (the stream calls do nothing there), so their bookkeeping is
tested here; the copies' overlap needs a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy

import fastune.training.memory as memory
from fastune.kernels.dispatch import force_triton
from fastune.models import ModelConfig, Transformer
from fastune.modules.kernels import apply_kernels
from fastune.modules.peft import apply_lora
from train_helpers import single_thread  # noqa: F401 (autouse fixture)

CONFIG = dict(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def _lora_model(use_kernels=True, layers=3):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**CONFIG, "num_hidden_layers": layers}))
    apply_kernels(model, use_kernels)
    apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj"], rank=4, alpha=8.0)
    return model


def _step(model, context=None):
    tokens = torch.randint(0, 67, (2, 9), generator=torch.Generator().manual_seed(1))
    with context or torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        hidden = model(tokens, return_hidden=True)
    hidden.square().sum().backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_selective_checkpointing_saves_the_fused_lora_outputs(monkeypatch):
    decisions = []
    policy = memory._save_matmuls_policy

    def logged(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        if not ctx.is_recompute:
            decisions.append((str(op), decision))
        return decision

    monkeypatch.setattr(memory, "_save_matmuls_policy", logged)
    model = _lora_model(layers=1)
    memory.apply_activation_checkpointing(model, "selective")
    with force_triton(True):
        _step(model)
    # The attention projections are fused LoRA linears; gate, up and down one fused LoRA MLP.
    lora = [d for op, d in decisions if op == "fastune.lora_linear.default"]
    mlp = [d for op, d in decisions if op == "fastune.lora_mlp.default"]
    print(f"\nselective AC decisions for fastune::lora_linear: {lora}, fastune::lora_mlp: {mlp}")
    assert len(lora) == 4 and set(lora) == {CheckpointPolicy.MUST_SAVE}
    assert mlp == [CheckpointPolicy.MUST_SAVE]
    assert (("fastune.apply_rope.default", CheckpointPolicy.PREFER_RECOMPUTE) in decisions)


def _offloading(model, min_bytes=0):
    hooks = memory._OffloadHooks(torch.device("cpu"), min_bytes, memory.weight_detector(model))
    return hooks, memory._Offloading(hooks, model)


def test_offloading_copies_each_storage_once_and_changes_no_gradient():
    model = _lora_model()
    expected = _step(model)
    model.zero_grad()
    hooks, context = _offloading(model)
    packs = []  # the storages of the offloaded tensors, held so their addresses stay unique
    pack = hooks.pack

    def counted(t):
        out = pack(t)
        if not isinstance(out, torch.Tensor):
            packs.append(t.untyped_storage())
        return out

    hooks.pack = counted
    grads = _step(model, context)
    offloads = [e for e in hooks.log if e[0] == "offload"]
    print(f"\noffloaded storages: {len(offloads)} for {len(packs)} saved activations")
    assert len(offloads) == len({s.data_ptr() for s in packs}) < len(packs)
    torch.testing.assert_close(grads, expected, rtol=0, atol=0)


def test_backward_brings_each_layer_back_once_a_layer_ahead():
    model = _lora_model()
    hooks, context = _offloading(model)
    unpack = hooks.unpack

    def logged(packed):
        if not isinstance(packed, torch.Tensor):
            hooks.log.append(("unpack", packed[0].group))
        return unpack(packed)

    hooks.unpack = logged
    _step(model, context)
    fetches = [g for kind, g in hooks.log if kind == "fetch"]
    groups = sorted({g for kind, g in hooks.log if kind == "offload"}, reverse=True)
    assert fetches == groups, "each layer fetched once, last layer first"
    for group in groups[1:]:
        first_unpack = hooks.log.index(("unpack", group))
        assert hooks.log.index(("unpack", group + 1)) < hooks.log.index(("fetch", group)) \
            < first_unpack, f"layer {group} was not fetched while layer {group + 1} ran"


@pytest.mark.slow
def test_qlora_under_fsdp2_offloads_no_weight():
    """2 gloo ranks, the Triton path forced (its LoRA op saves the NF4 weight's inner
    tensors, all-gathered by FSDP2 into storages no parameter had before the forward):
    the sharded forward offloads exactly what the unsharded one does, where a detector
    that knew only the storages of before the forward also offloaded the NF4 tensors."""
    worker = Path(__file__).parent / "offload_fsdp_worker.py"
    env = {**os.environ, "FASTUNE_FORCE_TRITON": "1", "TRITON_INTERPRET": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", str(worker)], env=env, capture_output=True,
                          text=True, timeout=420)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    weights = [t for t in result["sharded_static"] if t not in result["single"]]
    print(f"\noffloaded under FSDP2: {len(result['sharded'])} tensors (unsharded: "
          f"{len(result['single'])}); with the old detector {len(result['sharded_static'])}, "
          f"{len(weights)} of them NF4 weight tensors")
    assert result["sharded"] == result["single"]
    assert not any(dtype in ("torch.uint8", "torch.int8") for dtype, _ in result["sharded"])
    assert weights, "the check must see the weights the old detector offloaded"
