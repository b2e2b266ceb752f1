"""FSDP2 on 2 CPU ranks (gloo) under torchrun, against the single-process recipe.

One torchrun job (tests/distributed_worker.py) trains full, LoRA, DoRA and QLoRA with
batch_size 2 per rank (each with an FSDP or memory option on, see OPTIONS), then
resumes the LoRA and full runs from their step_2 DCP checkpoints. The single-process
references train the same configs with batch_size 4 in this process: the same global
batch every step, since the loader deals samples to the ranks round-robin. All runs
are fp32, so the curves may differ only by summation order (batches padded to other
lengths, gradients summed across ranks): per step, |loss difference| and |grad-norm
difference| at most TOL = 2e-5 (seen: under 5e-6). QLoRA is held to the same
tolerance: each rank quantizes whole weights to NF4 before FSDP shards them, so both
runs train on the same NF4 values. fp16 LoRA (frozen fp16 base, fp32 adapters, loss
scaling) is held to FP16_TOL, and an inf in one rank's gradient must skip the step on
every rank.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastune.data import build_dataloader, load_sft_dataset, load_tokenizer
from fastune.data.errors import DataError
from fastune.distributed import DistributedError, torchrun_args
from train_helpers import DEMO_TOKENIZER, hf_llama, make_config, preference_dataset, run, save_base, write_rows

TESTS = Path(__file__).parent
STEPS = 4  # optimizer steps per run; checkpoints at step_2 and epoch_0 (step 4)
TOL = 2e-5
# fp16: the ranks' gradients are rounded to fp16 before the fp32 reduce-scatter, the
# single process's after summing both halves of the batch.
FP16_TOL = 1e-3
METHODS = ("full", "lora", "dora", "qlora")
# Each 2-rank run also turns on options that must not change the curve: async DCP saves
# (the full run's step_2 is then resumed from), activation checkpointing, no resharding
# after forward (and an adapter-only export), CPU offload of the shards.
OPTIONS = {
    "full": {"distributed": {"async_save": True}},
    "lora": {"activation_checkpointing": True},
    "dora": {"distributed": {"fsdp_reshard_after_forward": False}, "save_adapter_weights_only": True},
    "qlora": {"distributed": {"fsdp_cpu_offload": True}},
}


# method -> the logged step records of its single-process reference run.
_STEP_RECORDS: dict[str, list[dict]] = {}


def _dpo(root: Path) -> dict:
    """make_config values of LoRA DPO on preference pairs written into ``root``."""
    return {"objective": "dpo", "preference": {"beta": 0.5}, "dataset": preference_dataset(root)}


# NF4 shards over 2 ranks need every projection to hold a multiple of 2 * 64 * 256 elements.
NF4_SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def _env() -> dict[str, str]:
    """The ranks import tests/distributed_worker.py (the worker and the optimizer of the
    killed-rank test); one thread per rank on these 2 shared cores."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _torchrun(args: list[str], timeout: float = 420) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout)


def _values(method: str, out: Path, **values) -> dict:
    """make_config values of a run: batch 2 per rank, STEPS steps, a checkpoint at step 2."""
    return {"method": method, "output_dir": str(out), "batch_size": 2, "max_steps_per_epoch": STEPS,
            "save_every_n_steps": 2, **values}


def _logged(output_dir: Path) -> dict:
    """step -> (loss, grad_norm), and ("val", step) -> val_loss, from rank 0's metrics.jsonl."""
    found = {}
    for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            found[record["step"]] = (record["loss"], record["grad_norm"])
        if "val_loss" in record:
            found[("val", record["step"])] = record["val_loss"]
    return found


def _recorded(logger) -> dict:
    """The same, from a RecordingLogger of an in-process run."""
    found = {}
    for record in logger.records:
        if "loss" in record:
            found[int(record["step"])] = (record["loss"], record["grad_norm"])
        if "val_loss" in record:
            found[("val", int(record["step"]))] = record["val_loss"]
    return found


def _assert_same_curve(got: dict, want: dict) -> None:
    assert sorted(got, key=str) == sorted(want, key=str)
    for key, value in want.items():
        assert torch.allclose(torch.tensor(got[key], dtype=torch.float64),
                              torch.tensor(value, dtype=torch.float64), rtol=0, atol=TOL), (key, got[key], value)


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    """method -> (folder, curve) of single-process LoRA and full runs (batch 2 x 2
    accumulation steps) with a checkpoint at step_2, plus a config that resumes it on 2
    ranks (batch 2 each: the same global batch, and the loader's batch size) for the
    torchrun job."""
    root = tmp_path_factory.mktemp("one_process")
    base = save_base(hf_llama(seed=6, tie_word_embeddings=True), root / "base")
    write_rows(root / "train.jsonl", 32, seed=0)
    write_rows(root / "val.jsonl", 6, seed=1)
    runs = {}
    for method in ("lora", "full"):
        cfg = make_config(root, base, name=f"{method}.yaml",
                          **_values(method, root / method, gradient_accumulation_steps=2))
        _, logger = run(cfg)
        make_config(root, base, name=f"{method}_resume_2ranks.yaml",
                    **_values(method, root / f"{method}_resumed_2ranks",
                              resume_from_checkpoint=str(root / method / "step_2")))
        runs[method] = (root, _recorded(logger))
    return runs


@pytest.fixture(scope="module")
def job(tmp_path_factory, one_process_runs):
    """Bases, configs, and the one torchrun job: fresh runs of every method, then the
    2-rank resumes (the worker loads each config just before training it, so
    step_2 exists by then)."""
    root = tmp_path_factory.mktemp("dist")
    bases = {
        "dense": save_base(hf_llama(seed=6, tie_word_embeddings=True), root / "base"),
        "nf4": save_base(hf_llama(seed=6, **NF4_SHAPE), root / "base_nf4"),
    }
    write_rows(root / "train.jsonl", 32, seed=0)
    write_rows(root / "val.jsonl", 6, seed=1)
    configs = []
    for method in METHODS:
        base = bases["nf4" if method == "qlora" else "dense"]
        make_config(root, base, name=f"{method}.yaml", **_values(method, root / f"{method}_2ranks", **OPTIONS[method]))
        configs.append(str(root / f"{method}.yaml"))
    # resume_from_checkpoint must exist when a config is loaded, so these are written as
    # plain YAML: the same runs, resumed from step_2 into another output_dir.
    for method in ("lora", "full"):
        text = (root / f"{method}.yaml").read_text()
        text = text.replace(str(root / f"{method}_2ranks"), str(root / f"{method}_resumed_2ranks"))
        text += f"resume_from_checkpoint: {root / f'{method}_2ranks' / 'step_2'}\n"
        (root / f"{method}_resume.yaml").write_text(text)
        configs.append(str(root / f"{method}_resume.yaml"))
    configs += [str(folder / f"{method}_resume_2ranks.yaml") for method, (folder, _) in one_process_runs.items()]
    # LoRA DPO: pairs dealt to the ranks, the reference with adapters disabled under FSDP.
    make_config(root, bases["dense"], name="dpo.yaml", **_values("lora", root / "dpo_2ranks", **_dpo(root)))
    configs.append(str(root / "dpo.yaml"))
    fp16 = {"checkpoint_dir": str(bases["dense"]), "dtype": "fp16"}
    make_config(root, bases["dense"], name="lora_fp16.yaml", **_values("lora", root / "lora_fp16_2ranks", model=fp16))
    make_config(root, bases["dense"], name="fp16_inf.yaml", **_values("lora", root / "fp16_inf", model=fp16))
    configs += [str(root / "lora_fp16.yaml"), f"inf-on-rank-1:{root / 'fp16_inf.yaml'}:{root / 'fp16_inf.json'}"]
    started = time.perf_counter()
    result = _torchrun([str(TESTS / "distributed_worker.py"), *configs])
    assert result.returncode == 0, result.stderr[-4000:]
    print(f"torchrun job: {time.perf_counter() - started:.0f} s")
    return root, bases


@pytest.fixture(scope="module")
def references(job):
    """method -> (output_dir, curve) of the single-process run with the same global batch."""
    root, bases = job
    cache = {}

    def reference(method: str):
        if method not in cache:
            base = bases["nf4" if method == "qlora" else "dense"]
            out = root / f"{method}_1proc"
            extra = {"dpo": _dpo(root), "lora_fp16": {"model": {"checkpoint_dir": str(base), "dtype": "fp16"}}}
            cfg = make_config(root, base, name=f"{method}_1proc.yaml",
                              **_values(method if method in METHODS else "lora", out, batch_size=4,
                                        **extra.get(method, {})))
            _, logger = run(cfg)
            cache[method] = (out, _recorded(logger))
            _STEP_RECORDS[method] = [r for r in logger.records if "loss" in r]
        return cache[method]

    return reference


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_train_like_one_process(job, references, method):
    root, _ = job
    _, want = references(method)
    got = _logged(root / f"{method}_2ranks")
    assert len([k for k in got if isinstance(k, int)]) == STEPS
    _assert_same_curve(got, want)


@pytest.mark.slow
def test_two_ranks_train_fp16_lora_like_one_process(job, references):
    root, _ = job
    _, want = references("lora_fp16")
    got = _logged(root / "lora_fp16_2ranks")
    assert sorted(got, key=str) == sorted(want, key=str)
    for key, value in want.items():
        assert abs(torch.tensor(got[key]) - torch.tensor(value)).max() <= FP16_TOL, (key, got[key], value)
    steps = _metrics(root / "lora_fp16_2ranks")
    assert steps[-1]["skipped_steps"] == 0 and steps[-1]["loss_scale"] > 1


@pytest.mark.slow
def test_an_inf_on_one_rank_skips_the_fp16_step_on_every_rank(job):
    root, _ = job
    for rank in (0, 1):
        record = json.loads((root / f"fp16_inf.json.{rank}").read_text())
        scale = record["scales"][0]
        assert record == {"moved": [False, True], "scales": [scale, scale / 2, scale / 2], "skipped_steps": 1}, rank


@pytest.mark.slow
def test_two_ranks_train_dpo_like_one_process(job, references):
    """The pair count and the reward metrics are summed over ranks like the loss."""
    root, _ = job
    _, want = references("dpo")
    _assert_same_curve(_logged(root / "dpo_2ranks"), want)
    got_steps, ref_steps = _metrics(root / "dpo_2ranks"), _STEP_RECORDS["dpo"]
    assert len(got_steps) == len(ref_steps) == STEPS
    for got, ref in zip(got_steps, ref_steps):
        for name in ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert abs(got[name] - ref[name]) <= TOL * max(1.0, abs(ref[name])), (name, got, ref)


def _metrics(output_dir: Path) -> list[dict]:
    lines = (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_dcp_checkpoint_of_two_ranks_resumes_on_one_and_on_two(job, method):
    """step_2 of the 2-rank run, resumed on 2 ranks (in the torchrun job) and in a single
    process (here, batch 2 with 2 accumulation steps: the same global batch), continues
    the uninterrupted 2-rank curve: steps 3 and 4 and the final validation loss."""
    root, bases = job
    uninterrupted = _logged(root / f"{method}_2ranks")
    tail = {k: v for k, v in uninterrupted.items() if k in (3, 4, ("val", 4))}
    ckpt = root / f"{method}_2ranks" / "step_2"
    assert (ckpt / "distributed_checkpoint" / ".metadata").is_file()

    on_two = _logged(root / f"{method}_resumed_2ranks")
    assert on_two == tail  # same world size, same order of every sum: exact

    single = root / f"{method}_resumed_1proc"
    single.mkdir()
    shutil.copytree(ckpt, single / "step_2")
    cfg = make_config(root, bases["dense"], name=f"{method}_resume_1proc.yaml",
                      **_values(method, single, gradient_accumulation_steps=2, resume_from_checkpoint="auto"))
    state, logger = run(cfg)
    assert state.global_step == STEPS
    _assert_same_curve(_recorded(logger), tail)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_one_process_checkpoint_resumes_on_two_ranks(job, one_process_runs, method):
    """step_2 of a single-process run (its optimizer state unsharded, the weights or the
    adapter in HF/PEFT files), resumed on 2 ranks in the torchrun job, continues the
    single-process curve: steps 3 and 4 and the final validation loss."""
    folder, curve = one_process_runs[method]
    tail = {k: v for k, v in curve.items() if k in (3, 4, ("val", 4))}
    assert not (folder / method / "step_2" / "distributed_checkpoint").exists()
    _assert_same_curve(_logged(folder / f"{method}_resumed_2ranks"), tail)


@pytest.mark.slow
def test_resume_state_that_does_not_fit_is_one_line(job):
    """A DCP checkpoint of rank-4 adapters, loaded into a run with rank-8 adapters."""
    import fastune
    from fastune.distributed import load_resume_state
    from fastune.modules.peft import apply_lora
    from fastune.training.checkpointer import ResumeError

    root, bases = job
    model = fastune.from_pretrained(bases["dense"])
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], rank=8, alpha=16.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ResumeError, match=r"distributed_checkpoint does not fit this run: Size mismatch .*"
                                          r"for model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight"):
        load_resume_state(model, optimizer, root / "lora_2ranks" / "step_2")


@pytest.mark.slow
def test_adapter_only_export_of_two_ranks(job):
    """DoRA with save_adapter_weights_only: the tokenizer and the PEFT adapter, no merged weights."""
    root, _ = job
    names = {p.name for p in (root / "dora_2ranks" / "epoch_0").iterdir()}
    assert {"tokenizer.json", "adapter_config.json", "adapter_model.safetensors", "distributed_checkpoint"} <= names
    assert not any(name.endswith(".safetensors") and name != "adapter_model.safetensors" for name in names)
    assert "merged" not in names and "config.json" not in names
    adapter = json.loads((root / "dora_2ranks" / "epoch_0" / "adapter_config.json").read_text())
    assert adapter["use_dora"] is True


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_export_of_two_ranks_loads_in_transformers_and_peft(job, references, method):
    """epoch_0 of the 2-rank run (gathered to rank 0) gives the logits of the single-process
    run's export in transformers; the LoRA adapter loads in PEFT over the base model."""
    import peft
    import transformers

    root, bases = job
    reference_dir, _ = references(method)
    ckpt, want_dir = root / f"{method}_2ranks" / "epoch_0", reference_dir / "epoch_0"
    tokens = torch.randint(0, 365, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()(input_ids=tokens).logits
        want = transformers.AutoModelForCausalLM.from_pretrained(want_dir).eval()(input_ids=tokens).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        if method == "lora":
            base = transformers.AutoModelForCausalLM.from_pretrained(bases["dense"])
            adapted = peft.PeftModel.from_pretrained(base, ckpt).eval()
            torch.testing.assert_close(adapted(input_ids=tokens).logits, got, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_with_an_error(tmp_path, job):
    """Rank 1 dies at its second optimizer step (os._exit, as if OOM-killed) while rank 0
    waits in a collective: `fastune train --nproc-per-node 2` must exit 1 with a line
    naming the rank, in bounded time, not hang."""
    root, bases = job
    make_config(tmp_path, bases["dense"], name="crash.yaml",
                **_values("lora", tmp_path / "out", optimizer={
                    "_component_": "distributed_worker.AdamWThatKillsRank1", "lr": 1e-2}))
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "fastune.cli", "train", str(tmp_path / "crash.yaml"), "--nproc-per-node", "2"],
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    elapsed = time.perf_counter() - started
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: rank 1 exited with status 1" in result.stderr
    assert elapsed < 240
    assert not (tmp_path / "out" / "epoch_0").exists()


# ----------------------------------------------------------------------------- fast checks


def test_torchrun_arguments():
    single = torchrun_args(["train", "c.yaml"], 4)
    assert single == ["--nproc-per-node=4", "--nnodes=1", "--max-restarts=0", "--standalone",
                      "--module", "fastune.cli", "train", "c.yaml"]
    multi = torchrun_args(["train", "c.yaml"], 8, nnodes=2, node_rank=1, rdzv_endpoint="node0:29400",
                          rdzv_id="job")
    assert "--rdzv-backend=c10d" in multi and "--rdzv-endpoint=node0:29400" in multi
    assert "--rdzv-id=job" in multi and "--node-rank=1" in multi and "--standalone" not in multi
    with pytest.raises(DistributedError, match="--rdzv-endpoint: required with --nnodes > 1"):
        torchrun_args(["train"], 8, nnodes=2)
    with pytest.raises(DistributedError, match="--nproc-per-node: must be at least 1"):
        torchrun_args(["train"], 0)
    with pytest.raises(DistributedError, match=r"--node-rank: must be in \[0, 2\)"):
        torchrun_args(["train"], 8, nnodes=2, node_rank=2, rdzv_endpoint="h:1")


def test_loader_state_resumes_on_another_world_size(tmp_path):
    """After 3 batches of 2 on each of 2 ranks, samples 0-11 were handed out: one rank goes on
    at its batch 6; five ranks are refused (12 samples are not whole steps of 5 x 2)."""
    dataset = load_sft_dataset(str(write_rows(tmp_path / "rows.jsonl", 40)), load_tokenizer(str(DEMO_TOKENIZER)),
                               format="instruct")
    two = [build_dataloader(dataset, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    seen = []
    for loader in two:
        batches = iter(loader)
        for _ in range(3):
            seen.append(next(batches)["tokens"])
    state = two[0].state_dict()
    one = build_dataloader(dataset, 2, seed=1)
    one.load_state_dict(state)
    reference = build_dataloader(dataset, 2, seed=1)
    expected = list(iter(reference))[6]["tokens"]
    assert torch.equal(next(iter(one))["tokens"], expected)
    with pytest.raises(DataError, match="not a whole number of batches of 2 on each of 5 ranks"):
        build_dataloader(dataset, 2, seed=1, rank=0, world_size=5).load_state_dict(state)


def test_a_finished_background_save_is_put_in_place_before_the_next_save(monkeypatch):
    """Rank 0 renames a completed async save into place at the next step, not at the next
    save: a crash in between must not leave it staged where resume never looks. The
    barrier of the next wait() still runs, once, and the rename does not run twice."""
    from concurrent.futures import Future

    from fastune import distributed
    from fastune.distributed import saver as saver_module

    barriers, finished = [], []
    monkeypatch.setattr(saver_module.dist, "barrier", lambda group=None: barriers.append(group))
    saver = distributed.CheckpointSaver(distributed.World(0, 2, 0, torch.device("cpu")), async_save=True,
                                        commit=None)  # finish is replaced below
    future = Future()
    saver._pending = saver_module._Pending(future, lambda: finished.append("step_2"))
    saver.finish_if_done()
    assert finished == []  # DCP still writing
    future.set_result(None)
    saver.finish_if_done()
    assert finished == ["step_2"] and barriers == []
    saver.wait()
    assert finished == ["step_2"] and len(barriers) == 1
