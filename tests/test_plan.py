"""``fastune plan``: the memory tracker, the fake-tensor estimate against a real step,
the recommendations, the hardware profiles, and the command's reports."""

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from fastune.training.memory_tracker import MemoryTracker
from fastune.bench.plan import Target, build_model, plan, trace_step, verify, worst_case_batch
from fastune.bench.profiles import FIGURES, Profile, ProfileError, load_profile, profile_names
from fastune.cli import main
from fastune.config import load_config
from fastune.models.config import ModelConfig

# Every projection a multiple of 64 * 256 elements, so that QLoRA can quantize it.
TINY_MODEL = {"model_type": "llama", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "rms_norm_eps": 1e-5}
CONFIG = """\
output_dir: {tmp}/out
method: lora
model:
  checkpoint_dir: {tmp}/model
  dtype: fp32
lora:
  rank: 4
  targets: [q_proj, v_proj]
dataset:
  source: json
  data_files: {tmp}/unused.jsonl
  packed: true
  max_seq_len: 64
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


# ----------------------------------------------------------------------------- the tracker


def test_tracker_counts_live_bytes_and_their_peak():
    tracker = MemoryTracker()
    a = torch.ones(1000)  # 4000 bytes, before tracking
    tracker.track_existing([a], "parameters")
    with tracker:
        with tracker.phase("forward"):
            b = a * 2  # 4000: kept (an activation)
            c = b + 1  # 4000: freed before the forward ends (a temporary)
            del c
        with tracker.phase("backward"):
            d = torch.zeros(3000)  # 12000: peak 4000 + 4000 + 12000
            del d
    report = tracker.finish()
    assert report.peak_bytes == 20000
    assert report.phase_at_peak == "backward"
    assert report.by_category == {"parameters": 4000, "gradients": 0, "optimizer_state": 0,
                                  "activations": 4000, "temporary": 12000}
    assert b.sum() == 2000  # b stayed alive through the peak


def test_tracker_counts_the_logits_chunk_inside_the_fused_loss():
    """The fused loss is one opaque op: its [chunk, vocab] logits exist only inside it,
    and the tracker counts them as a temporary beside the op's outputs."""
    from fastune.kernels import linear_cross_entropy

    hidden = torch.randn(64, 8, requires_grad=True)
    weight = torch.randn(1000, 8)  # frozen: outputs are the loss and dhidden only
    labels = torch.randint(0, 1000, (64,))
    tracker = MemoryTracker()
    tracker.track_existing([hidden, weight, labels], "parameters")
    with tracker, tracker.phase("forward"):
        loss, _ = linear_cross_entropy(hidden, weight, labels, chunk_size=16)
    report = tracker.finish()
    logits_chunk = 16 * 1000 * 4
    assert report.by_category["temporary"] >= logits_chunk
    assert report.peak_bytes >= sum(t.nbytes for t in (hidden, weight, labels)) + logits_chunk


def test_tracker_agrees_with_torch_memtracker(tiny):
    """An independent dispatch-level tracker, torch's MemTracker, finds the same peak for
    full fine-tuning (MemTracker cannot track frozen parameters, so not for LoRA)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from fastune.training.optim import build_optimizer
    from fastune.training.loss import build_loss

    cfg, model_config = config(tiny, "method=full", "model.use_kernels=false")
    ours = trace_step(cfg, model_config, Target("cpu"))
    with FakeTensorMode():
        model = build_model(cfg, model_config)
        loss_fn = build_loss(model, cfg.loss)
        optimizer = build_optimizer({"_component_": "torch.optim.AdamW", "lr": 1e-3}, model, torch.device("cpu"))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        batch = worst_case_batch(cfg, model_config.vocab_size)
        tracker = MemTracker()
        tracker.track_external(model, optimizer, *batch.values())
        with tracker:
            hidden = model(batch["tokens"], position_ids=batch["position_ids"],
                           document_ids=batch["document_ids"], return_hidden=True)
            loss, _ = loss_fn(hidden, batch["labels"])
            (loss / batch["labels"].numel()).backward()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        theirs = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
    assert ours.peak_bytes == pytest.approx(theirs, rel=0.01)


# ----------------------------------------------------------------------------- the estimate


@pytest.mark.parametrize("overrides", [
    (),
    ("method=qlora",),
    ("method=full", "activation_checkpointing=true"),
    ("model.use_kernels=false", "model.dtype=bf16"),
])
def test_cpu_estimate_is_within_10_percent_of_a_real_step(tiny, overrides):
    cfg, model_config = config(tiny, *overrides)
    check = verify(cfg, model_config)
    assert abs(check["relative_error"]) < 0.10, check
    assert check["measured"]["peak_bytes"] > 0


def test_categories_of_full_fine_tuning(tiny):
    cfg, model_config = config(tiny, "method=full", "model.use_kernels=false")
    memory = trace_step(cfg, model_config, Target("cpu"))
    with torch.device("meta"):
        model = build_model(cfg, model_config)
    n_params = sum(p.numel() for p in model.parameters())
    n_buffers = sum(b.numel() for b in model.buffers())  # the RoPE frequencies
    assert memory.by_category["parameters"] == 4 * (n_params + n_buffers)  # fp32, no rounding on CPU
    # AdamW: exp_avg and exp_avg_sq per parameter, plus a step counter per tensor.
    assert 2 * 4 * n_params <= memory.by_category["optimizer_state"] <= 2 * 4 * n_params + 4096


def test_full_fine_tuning_dpo_counts_the_frozen_reference_and_both_answers(tiny):
    """Full fine-tuning DPO keeps a frozen copy (one more model's parameters) and runs chosen
    and rejected in one forward (twice the rows); LoRA DPO's reference is the model itself."""
    cfg, model_config = config(tiny, "method=full", "dataset.packed=false")
    sft = trace_step(cfg, model_config, Target("cpu"))
    dpo = trace_step(*config(tiny, "method=full", "dataset.packed=false", "objective=dpo"), Target("cpu"))
    with torch.device("meta"):
        n_params = sum(p.numel() for p in build_model(cfg, model_config).parameters())
    assert dpo.by_category["parameters"] - sft.by_category["parameters"] == 4 * n_params  # fp32 copy
    assert dpo.by_category["activations"] > 1.5 * sft.by_category["activations"]
    lora = trace_step(*config(tiny, "dataset.packed=false"), Target("cpu"))
    lora_dpo = trace_step(*config(tiny, "dataset.packed=false", "objective=dpo"), Target("cpu"))
    assert lora_dpo.by_category["parameters"] == lora.by_category["parameters"]


def test_cuda_paths_and_features_change_the_estimate(tiny):
    """QLoRA shrinks the parameters, checkpointing the activations; CUDA rounds to 512 bytes."""
    base = trace_step(*config(tiny), Target("cuda"))
    qlora = trace_step(*config(tiny, "method=qlora"), Target("cuda"))
    checkpointed = trace_step(*config(tiny, "activation_checkpointing=true"), Target("cuda"))
    assert qlora.by_category["parameters"] < 0.7 * base.by_category["parameters"]
    assert checkpointed.by_category["activations"] < 0.5 * base.by_category["activations"]
    assert base.peak_bytes % 512 == 0


def test_cuda_plan_counts_flex_attention_memory_for_windows_and_softcaps(tiny, tmp_path):
    """On a GPU, windowed and softcapped layers run FlexAttention (out and log-sum-exp saved),
    not the CPU blocked path: a Gemma 2 step holds what the same step without them holds,
    while on CPU the blocked path's scores make it larger."""
    gemma2 = {**TINY_MODEL, "model_type": "gemma2", "head_dim": 32, "sliding_window": 16,
              "attn_logit_softcapping": 50.0, "final_logit_softcapping": None}
    plain = {**gemma2, "sliding_window": None, "attn_logit_softcapping": None}
    peaks = {}
    for name, model in (("gemma2", gemma2), ("plain", plain)):
        (tmp_path / "model").mkdir(exist_ok=True)
        (tmp_path / "model" / "config.json").write_text(json.dumps(model))
        cfg, model_config = config(tiny, f"model.checkpoint_dir={tmp_path / 'model'}")
        peaks[name] = {d: trace_step(cfg, model_config, Target(d)).by_category["activations"] for d in ("cuda", "cpu")}
    assert peaks["gemma2"]["cuda"] == peaks["plain"]["cuda"]
    assert peaks["gemma2"]["cpu"] > peaks["plain"]["cpu"]


def test_recommends_the_first_variant_that_fits(tiny):
    cfg, model_config = config(tiny, "batch_size=4")
    roomy = Profile(key="roomy", name="roomy", kind="cuda", memory_gib=1000.0)
    as_configured = plan(cfg, model_config, roomy)
    assert as_configured["recommended"] == "(as configured)"
    assert len(as_configured["candidates"]) == 1

    need = as_configured["candidates"][0]["device_total_gib"]
    tight = dataclasses.replace(roomy, key="tight", memory_gib=need - 1e-6)
    report = plan(cfg, model_config, tight)
    first, chosen = report["candidates"][0], report["candidates"][-1]
    assert not first["fits"] and chosen["fits"]
    assert report["recommended"] == chosen["label"] == "activation_checkpointing=True"
    assert chosen["device_total_gib"] <= tight.memory_gib
    assert "activation_checkpointing" in report["features"]


# ----------------------------------------------------------------------------- profiles


def test_every_shipped_profile_loads_with_sources():
    names = profile_names()
    for key in ("rtx3090", "rtx4090", "rtx5090", "t4", "l4", "a10g", "a100_40gb", "a100_80gb",
                "h100_sxm", "h200", "cpu"):
        assert key in names
    for key in names:
        profile = load_profile(key)
        assert profile.memory_gib and profile.memory_gib > 0
        if profile.kind == "cuda":
            assert set(profile.sources) == set(FIGURES), key
            assert profile.peak_fp32_flops > 1e12 and profile.memory_bandwidth > 1e11
    assert load_profile("rtx4090").peak_bf16_flops == pytest.approx(165.2e12)


def test_unknown_profile_is_one_line_with_a_suggestion():
    with pytest.raises(ProfileError, match="rtx4090"):
        load_profile("rtx490")


@pytest.mark.parametrize("name, parameters", [("llama3_2_1b", 1_235_814_400), ("llama3_2_3b", 3_212_749_824),
                                              ("llama3_1_8b", 8_030_261_248)])
def test_shipped_model_configs_have_the_published_sizes(name, parameters):
    import importlib.resources

    from fastune.models.transformer import Transformer

    path = importlib.resources.files("fastune") / "assets" / "model_configs" / name
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_json(str(path)))
    assert sum(p.numel() for p in model.parameters()) == parameters


# ----------------------------------------------------------------------------- the command


def test_plan_command_writes_json_and_markdown(tiny, tmp_path):
    out = tmp_path / "reports"
    result = CliRunner().invoke(main, ["plan", str(tiny), "--verify", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "plan_tiny_cpu.json").read_text())
    assert data["profile"]["key"] == "cpu" and data["recommended"] == "(as configured)"
    assert set(data["candidates"][0]["by_category"]) == {"parameters", "gradients", "optimizer_state",
                                                        "activations", "temporary"}
    assert abs(data["verification"]["relative_error"]) < 0.10
    markdown = (out / "plan_tiny_cpu.md").read_text()
    assert "| settings | parameters | gradients | optimizer state | activations | temporary |" in markdown
    assert "## Check on this CPU (MiB)" in markdown


def test_plan_command_bad_profile_is_one_line(tiny, tmp_path):
    result = CliRunner().invoke(main, ["plan", str(tiny), "--profile", "rtx409", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --profile: no profile named 'rtx409' (did you mean 'rtx4090'?); known: "
        + ", ".join(profile_names())]


def test_plan_command_needs_a_profile_for_a_gpu_config(tiny, tmp_path):
    result = CliRunner().invoke(main, ["plan", str(tiny), "device=cuda", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--profile" in result.output


def test_planned_offloading_brings_each_storage_back_once():
    """As the real offloading hooks (tests/test_activation_memory.py), the planner's copy
    one back per storage: two consumers of one input unpack views of one allocation."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastune.bench.plan_offload import offloading_hooks

    with FakeTensorMode():
        x = torch.randn(512, 1024)  # 2 MiB: above offloading's minimum
        w1, w2 = (torch.randn(1024, 8, requires_grad=True) for _ in range(2))
        with offloading_hooks(None):
            loss = (x @ w1).sum() + (x @ w2).sum()  # mm saves x for each weight's grad
        nodes = [n for n, _ in loss.grad_fn.next_functions]
        saved = [n.next_functions[0][0]._saved_self for n in nodes]  # unpacks
        assert saved[0].shape == saved[1].shape == x.shape
        assert saved[0].untyped_storage() is saved[1].untyped_storage()
        assert saved[0].untyped_storage() is not x.untyped_storage()


def test_planned_offloading_frees_each_copy_after_its_last_use():
    """A copy back lives while backward still needs it, not to the end of backward: when
    the first layer's gradient is formed, the later layers' copies are gone. (Views made
    with ``set_`` kept their storage alive under fake tensors: the plan of Llama 3.1 8B
    QLoRA with offloading held all 32 layer inputs at once, 1 GiB too much.)"""
    import weakref

    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastune.bench.plan_offload import offloading_hooks

    copies = []
    with FakeTensorMode():
        weights = [torch.randn(1024, 1024, requires_grad=True) for _ in range(6)]
        hooks = offloading_hooks(None)
        unpack = hooks.unpack_hook

        def recorded(packed):
            out = unpack(packed)
            copies.append(weakref.ref(out.untyped_storage()))
            return out

        hooks.unpack_hook = recorded
        with hooks:
            h = torch.randn(512, 1024)  # 2 MiB activations: above offloading's minimum
            for w in weights:
                h = torch.tanh(h @ w)  # mm saves its input, tanh its output: one storage
        alive_at_the_end = []
        weights[0].register_hook(lambda g: alive_at_the_end.append(sum(c() is not None for c in copies)))
        h.sum().backward()
    assert len(copies) >= len(weights)
    assert alive_at_the_end[0] <= 2, f"{alive_at_the_end[0]} of {len(copies)} copies still alive"


def test_storages_of_a_dtensor_are_its_local_shard(tmp_path):
    """DTensor lists its device mesh among its inner names: only its shard holds storage."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from fastune.training.memory_tracker import storages

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1),
                                rank=0, world_size=1)
    try:
        shard = distribute_tensor(torch.randn(4, 6), init_device_mesh("cpu", (1,)), [Shard(0)])
        assert storages(shard) == [shard._local_tensor.untyped_storage()]
    finally:
        if created:
            dist.destroy_process_group()
