"""Bad inputs through the real command line, each in its own process: config, data,
checkpoint, environment, resume, upload. Every one must end with one line on stderr,
exit status 2, no traceback, and every file that was there before unchanged.

Each case has its own folder, next to a shared one that must stay unchanged too;
most fail at validation, and none trains.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import yaml
from safetensors.torch import load_file, save_file
from train_helpers import hf_llama, save_base, write_rows

HF_TOKEN = "hf_" + "Qw3Er4Ty5U" * 4


@dataclass
class Case:
    name: str
    args: list[str]  # after `fastune`; {d}: the case's folder, {s}: the shared folder
    expect: str  # a fragment of the error line
    setup: Optional[Callable[[Path, Path], None]] = None
    env: dict[str, str] = field(default_factory=dict)
    absent: tuple[str, ...] = ()  # files that must not exist afterwards (proof no code ran)


def base_config(shared: Path, d: Path, **values) -> Path:
    cfg = {
        "output_dir": str(d / "out"), "method": "lora", "seed": 0,
        "model": {"checkpoint_dir": str(shared / "base"), "dtype": "fp32", "use_kernels": False},
        "lora": {"rank": 2, "alpha": 4.0, "targets": ["q_proj", "v_proj"]},
        "dataset": {"source": "json", "data_files": {"train": str(shared / "train.jsonl")}, "max_seq_len": 32},
        "batch_size": 2, "epochs": 1, "max_steps_per_epoch": 1, "compile": False, "device": "cpu",
        "metric_logger": {"_component_": "fastune.training.loggers.MetricLogger"},
        **values,
    }
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def with_config(**values):
    return lambda shared, d: base_config(shared, d, **values)


def copy_base(shared: Path, d: Path) -> Path:
    target = d / "ckpt"
    target.mkdir()
    for f in (shared / "base").iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


def broken_checkpoint(damage: Callable[[Path], None]):
    """A config whose model.checkpoint_dir is a copy of the base model, damaged."""
    def setup(shared, d):
        damage(copy_base(shared, d))
        base_config(shared, d, model={"checkpoint_dir": str(d / "ckpt"), "dtype": "fp32", "use_kernels": False})
    return setup


def truncate(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def garbage_header(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 40) + b"{not json at all, just bytes!!!!!!!!!!}" + data[48:])


def wrong_shape(ckpt: Path) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def missing_shard(ckpt: Path) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    keys = sorted(tensors)
    half = len(keys) // 2
    save_file({k: tensors[k] for k in keys[:half]}, ckpt / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors"
                  for i, k in enumerate(keys)}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (ckpt / "model.safetensors").unlink()


def pickle_only(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps({"a": 1}))


def bad_config_json(ckpt: Path) -> None:
    (ckpt / "config.json").write_text("{truncated")


def rows(text: str):
    def setup(shared, d):
        (d / "data.jsonl").write_text(text)
        base_config(shared, d, dataset={"source": "json", "data_files": {"train": str(d / "data.jsonl")},
                                        "max_seq_len": 32})
    return setup


def checkpoint_folder(d: Path, name: str = "step_2", state: Optional[dict] = None) -> Path:
    folder = d / "out" / name
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps(state or {"global_step": 2, "method": "lora"}))
    (folder / "training_state.pt").write_bytes(b"earlier")
    return folder


def resume_setup(kind: str):
    def setup(shared, d):
        if kind == "later":
            checkpoint_folder(d, "step_2")
            checkpoint_folder(d, "step_4", {"global_step": 4, "method": "lora"})
        elif kind == "damaged":
            folder = checkpoint_folder(d, "step_2")
            (folder / "trainer_state.json").write_text("{trunc")
            (d / "out" / "epoch_0").mkdir()
        elif kind in ("existing", "method"):
            checkpoint_folder(d, "step_2", {"global_step": 2, "method": "full" if kind == "method" else "lora"})
        elif kind == "not_checkpoint":
            (d / "elsewhere").mkdir()
            (d / "elsewhere" / "notes.txt").write_text("x")
        base_config(shared, d)
    return setup


def upload_folder(shared, d):
    (d / "export").mkdir()
    (d / "export" / "model.safetensors").write_bytes(b"x")


def only_hidden(shared, d):
    (d / "export").mkdir()
    (d / "export" / ".env").write_text("HF_TOKEN=x")


def a_file(shared, d):
    (d / "afile").write_text("a regular file")
    base_config(shared, d, output_dir=str(d / "afile" / "out"))


def crafted_dcp(shared, d):
    """A full fine-tuning checkpoint whose DCP .metadata would write a marker when unpickled."""
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {d / 'marker'}",))

    folder = checkpoint_folder(d, "step_2", {"global_step": 2, "method": "full", "epochs_run": 0,
                                             "step_in_epoch": 2})
    for f in (shared / "base").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    torch.save({"lr_scheduler": {}}, folder / "training_state.pt")
    (folder / "distributed_checkpoint").mkdir()
    (folder / "distributed_checkpoint" / ".metadata").write_bytes(pickle.dumps(Payload()))
    base_config(shared, d, method="full")


CFG = "{d}/config.yaml"
CASES = [
    # config
    Case("unknown key", ["validate", CFG, "optimiser.lr=1"], "unknown key 'optimiser'", with_config()),
    Case("out of range", ["validate", CFG, "epochs=0"], "epochs: must be >= 1", with_config()),
    Case("bad yaml", ["validate", "{d}/bad.yaml"], "bad.yaml", lambda s, d: (d / "bad.yaml").write_text("a: [1, 2\nb: 3\n")),
    Case("missing config file", ["validate", "{d}/nope.yaml"], "nope.yaml"),
    Case("missing checkpoint dir", ["validate", CFG, "model.checkpoint_dir={d}/missing"], "model.checkpoint_dir", with_config()),
    Case("secret in a bad value", ["validate", CFG, "optimizer.lr=${{oc.env:HF_TOKEN}}"], "optimizer.lr", with_config(),
         env={"HF_TOKEN": HF_TOKEN}),
    Case("unknown component", ["validate", CFG, "optimizer._component_=nope.Nope"], "optimizer._component_", with_config()),
    Case("no lora targets", ["validate", CFG, "lora.targets=[]"], "lora.targets", with_config()),
    Case("override without =", ["validate", CFG, "epochs"], "epochs", with_config()),
    Case("missing interpolation", ["validate", CFG, "output_dir=${{nope}}"], "output_dir", with_config()),
    Case("unknown shipped config", ["cp", "no_such_config", "{d}/x.yaml"], "no shipped config named"),
    Case("cp over a file", ["cp", "demo", "{d}/mine.yaml"], "pass --force",
         lambda s, d: (d / "mine.yaml").write_text("mine")),
    # data
    Case("missing data file", ["validate", CFG, "dataset.data_files.train={d}/none.jsonl"], "none.jsonl", with_config()),
    Case("invalid json row", ["train", CFG], "data.jsonl", rows('{"instruction": "a", "output": "b"}\n{oops\n')),
    Case("missing column", ["train", CFG], "data.jsonl", rows('{"question": "a", "answer": "b"}\n' * 4)),
    Case("empty data file", ["train", CFG], "data.jsonl", rows("")),
    Case("unknown format", ["validate", CFG, "dataset.format=poetry"], "dataset.format", with_config()),
    # checkpoint
    Case("truncated safetensors", ["train", CFG], "model.safetensors", broken_checkpoint(truncate)),
    Case("garbage header", ["train", CFG], "model.safetensors", broken_checkpoint(garbage_header)),
    Case("shape mismatch", ["train", CFG], "q_proj", broken_checkpoint(wrong_shape)),
    Case("shard missing from the index", ["train", CFG], "model-00002-of-00002.safetensors", broken_checkpoint(missing_shard)),
    Case("pickle-only folder", ["train", CFG], "ckpt", broken_checkpoint(pickle_only)),
    Case("bad config.json", ["validate", CFG], "config.json", broken_checkpoint(bad_config_json)),
    Case("generate from a non-checkpoint", ["generate", "{d}", "hi"], str("{d}")),
    # environment
    Case("output_dir under a regular file", ["train", CFG], "afile", a_file),
    Case("wandb without a login", ["train", CFG, "metric_logger=wandb"], "wandb login", with_config(),
         env={"WANDB_MODE": "", "WANDB_API_KEY": "", "HOME": "{d}", "NETRC": "{d}/.netrc"}),
    Case("cuda without a GPU", ["train", CFG, "device=cuda"], "device", with_config()),
    Case("nnodes without nproc", ["train", CFG, "--nnodes", "2"], "--nproc-per-node", with_config()),
    Case("quantize over an existing folder", ["quantize", "{s}/base", "{d}/q"], "pass --force",
         lambda s, d: (d / "q").mkdir()),
    # resume
    Case("resume from a missing folder", ["train", CFG, "resume_from_checkpoint={d}/gone"], "gone", with_config()),
    Case("resume from a non-checkpoint", ["train", CFG, "resume_from_checkpoint={d}/elsewhere"], "elsewhere",
         resume_setup("not_checkpoint")),
    Case("resume before later checkpoints", ["train", CFG, "resume_from_checkpoint={d}/out/step_2"], "step_4",
         resume_setup("later")),
    Case("only damaged checkpoints", ["train", CFG, "resume_from_checkpoint=auto"], "damaged", resume_setup("damaged")),
    Case("fresh run over checkpoints", ["train", CFG], "already holds checkpoints", resume_setup("existing")),
    Case("resume another method", ["train", CFG, "resume_from_checkpoint=auto"], "method=full", resume_setup("method")),
    Case("crafted DCP metadata", ["train", CFG, "resume_from_checkpoint=auto"],
         "distributed_checkpoint/.metadata: not a DCP metadata file, refusing it", crafted_dcp,
         absent=("marker",)),
    # upload
    Case("upload to ../../etc", ["upload", "{d}/export", "../../etc", "--dry-run"], "not a valid repo id", upload_folder),
    Case("upload to a/b/c", ["upload", "{d}/export", "a/b/c"], "not a valid repo id", upload_folder),
    Case("upload a missing folder", ["upload", "{d}/none", "me/x", "--dry-run"], "not a directory"),
    Case("upload only hidden files", ["upload", "{d}/export", "me/x"], "nothing to upload", only_hidden,
         env={"HF_HUB_OFFLINE": "1"}),
]


def sha256s(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# One process imports torch, transformers, datasets and fastune once, then forks a child per
# case that runs the `fastune` command line with the case's arguments, environment, folder
# and its own stdout/stderr files: each case is a process of its own, without paying the
# imports (seconds each) forty times.
RUNNER = r"""
import json, os, sys, traceback
import torch, transformers, datasets  # noqa: F401 (imported once, before the forks)
import fastune.training.recipe  # noqa: F401
from fastune.cli import main

codes = []
for job in json.load(open(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.chdir(job["cwd"])
        for key in job["unset"]:
            os.environ.pop(key, None)
        os.environ.update(job["env"])
        code = 0
        try:
            main(job["args"], prog_name="fastune")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()  # what Python itself does with an uncaught exception
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
json.dump(codes, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    shared = tmp_path_factory.mktemp("shared")
    save_base(hf_llama(num_hidden_layers=1), shared / "base")
    write_rows(shared / "train.jsonl", 8)
    before_shared = sha256s(shared)
    cases = {}
    for i, case in enumerate(CASES):
        d = tmp_path_factory.mktemp(f"case{i}")
        if case.setup:
            case.setup(shared, d)
        cases[case.name] = (case, d, sha256s(d))

    jobs = []
    for name, (case, d, _) in cases.items():
        fill = lambda text, d=d: text.format(d=d, s=shared)  # noqa: E731
        env = {k: fill(v) for k, v in case.env.items()}
        jobs.append({"args": [fill(a) for a in case.args], "cwd": str(d), "stderr": str(d.parent / f"{d.name}.err"),
                     "stdout": str(d.parent / f"{d.name}.out"), "env": {k: v for k, v in env.items() if v},
                     "unset": ["FASTUNE_DEBUG", *(k for k, v in env.items() if not v)]})
    work = tmp_path_factory.mktemp("runner")
    (work / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run([sys.executable, "-c", RUNNER, str(work / "jobs.json"), str(work / "codes.json")],
                   check=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    codes = json.loads((work / "codes.json").read_text())
    out = {}
    for (name, (case, d, before)), job, code in zip(cases.items(), jobs, codes):
        out[name] = ((case, d, before), subprocess.CompletedProcess(
            job["args"], code, Path(job["stdout"]).read_text(), Path(job["stderr"]).read_text()))
    assert sha256s(shared) == before_shared
    return out


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(results, name):
    (case, d, before), proc = results[name]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert case.expect.format(d=d) in lines[0], lines[0]
    assert HF_TOKEN not in proc.stderr + proc.stdout
    after = sha256s(d)
    assert {k: after.get(k) for k in before} == before  # every earlier file, unchanged
    for name in case.absent:
        assert not (d / name).exists()


def test_the_suite_covers_every_kind_of_input():
    assert len(CASES) >= 30
