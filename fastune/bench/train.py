"""``fastune bench train``: training throughput of a config against its baselines, in one run.

Configurations (``--compare`` adds the baselines):

- ``fastune``: the config as it is (kernels and compile as configured), and any
  ``--variant NAME:KEY=VALUE,...`` (the config with more overrides);
- ``fastune eager`` (``eager``): the same with ``model.use_kernels=false compile=false``;
- ``hf+peft eager`` and ``hf+peft compiled`` (``hf``; ``hf-eager``/``hf-compiled`` for
  one of them): transformers' ``AutoModelForCausalLM`` with a PEFT LoRA adapter of the
  same rank, alpha and targets (no adapter for full fine-tuning), the same weights,
  the same batches from fastune's data pipeline (packed rows reach HF as position
  ids, which it turns into the same document mask), the same optimizer and
  clipping, and HF's own loss with the same normalization; compiled is
  ``torch.compile`` on the whole model, loss included.

Each configuration runs in its own process. The processes start together; each
builds its model, compiles and runs its warm-up steps, then waits until all are
ready. The timed steps then run interleaved, one process at a time: in every round each process runs ``steps / rounds`` steps in
turn (the order rotating between rounds), so that a slow minute of a shared machine
falls on all of them. Ratios are computed from these numbers, within the one run.

Per configuration: the median step time; tokens/s of all non-padding tokens and of
supervised tokens (mean tokens of the timed steps / median step time); the step's
breakdown into data, forward (model and loss), backward (gradient clipping
included) and optimizer; peak memory (RSS on CPU: of the whole process, and during
the timed steps; CUDA: allocator peaks); the first step's loss (the same weights
and batch must give nearly the same loss everywhere); and the fraction of the
device's peak FLOP/s (``profiles/``; on CPU measured by a matmul probe) reached by
the model FLOPs of a step (see ``model_flops_per_step``). With ``breakdown_steps``,
each configuration then runs that many more steps under the profiler, and the report
adds where their time went by kind of work (``fastune.bench.breakdown``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from fastune.bench.train_report import ratios, summarize
from fastune.bench.train_worker import MARK, Spec
from fastune.errors import FastuneError

COMPARE = {
    "eager": ["fastune eager"],
    "hf": ["hf+peft eager", "hf+peft compiled"],
    "hf-eager": ["hf+peft eager"],
    "hf-compiled": ["hf+peft compiled"],
}

class BenchError(FastuneError):
    """A benchmark that cannot run as asked (one line)."""


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"NAME:KEY=VALUE,KEY=VALUE"`` -> (NAME, [KEY=VALUE, ...]): fastune with more overrides.
    A comma starts a new override only where a ``KEY=`` or ``~KEY`` follows it, so that a
    value may be a YAML list: ``model.kernels=[rope,loss]``."""
    name, _, overrides = text.partition(":")
    items = [o.strip() for o in re.split(r",(?=\s*(?:~|[\w.]+=))", overrides) if o.strip()]
    if not name.strip() or not items or not all("=" in o or o.startswith("~") for o in items):
        raise BenchError(f"--variant {text!r}: write NAME:KEY=VALUE[,KEY=VALUE...], "
                         "e.g. 'no kernels:model.use_kernels=false'")
    return name.strip(), items


def specs(config: str, overrides: list[str], compare: list[str], warmup: int,
          variants: list[tuple[str, list[str]]] = ()) -> list[Spec]:
    """fastune as configured, its variants, then the baselines of ``compare``."""
    out = [Spec("fastune", "fastune", config, overrides, warmup)]
    out += [Spec(f"fastune, {name}", "fastune", config, overrides + extra, warmup) for name, extra in variants]
    for name in dict.fromkeys(n for c in compare for n in COMPARE[c]):  # each once, in order
        if name == "fastune eager":
            out.append(Spec(name, "fastune", config, overrides + ["model.use_kernels=false", "compile=false"], warmup))
        else:
            out.append(Spec(name, "hf", config, overrides, warmup, compile=name.endswith("compiled")))
    return out


class _Process:
    """A worker process and its protocol lines."""

    def __init__(self, spec: Spec, log_dir: Path):
        self.spec = spec
        self.log = open(log_dir / f"{spec.name.replace(' ', '_').replace('+', '')}.log", "w")
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "fastune.bench.train_worker", "--worker", spec.to_json()],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.proc.wait()
        self.log.flush()
        tail = Path(self.log.name).read_text()[-3000:]
        raise BenchError(f"{self.spec.name}: the worker process ended (exit {self.proc.returncode}); "
                         f"its log, {self.log.name}, ends with:\n{tail}")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def write_random_checkpoint(cfg, out_dir: Path) -> Path:
    """Random weights (normal, std 0.02; norms 1) for the config's model, saved as an HF
    checkpoint with the source folder's tokenizer files."""
    import fastune
    from fastune.checkpoint.hf import parse_dtype
    from fastune.models.config import ModelConfig
    from fastune.models.spec import get_spec

    torch.manual_seed(cfg.seed)
    config = ModelConfig.from_json(cfg.model.checkpoint_dir)
    model = get_spec(config.model_type).build(config)  # the family's own modules
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.ndim == 1 else p.normal_(0.0, 0.02)
    fastune.save_pretrained(model, out_dir, source_dir=cfg.model.checkpoint_dir, dtype=parse_dtype(cfg.model.dtype))
    return out_dir


def bench_train(config: str, overrides: list[str], compare: list[str], steps: int, warmup: int,
                rounds: int, random_init: bool, profile_key: Optional[str], variants: list[str] = (),
                progress: Callable[[str], None] = lambda _: None, breakdown_steps: int = 0) -> dict:
    """Run the configurations (see the module docstring) and return the report as a dict.
    ``variants`` ("NAME:KEY=VALUE,...") add fastune configurations with more overrides."""
    from fastune.bench.profiles import load_profile, with_measured_speed
    from fastune.bench.report import environment
    from fastune.config import load_config
    from fastune.models.config import ModelConfig

    unknown = [c for c in compare if c not in COMPARE]
    if unknown:
        raise BenchError(f"--compare: unknown baseline {unknown[0]!r}; choose from {', '.join(COMPARE)}")
    for variant in variants:
        parse_variant(variant)  # fail before any work
    if steps < 1 or rounds < 1 or warmup < 0:
        raise BenchError("--steps and --rounds must be at least 1, --warmup at least 0")
    cfg = load_config(config, overrides, check_paths=not random_init)
    from fastune.methods.method import method_from_config

    if method_from_config(cfg).nf4_base and any(c.startswith("hf") for c in compare):
        raise BenchError("--compare hf: QLoRA in HF needs bitsandbytes on CUDA; compare a lora config")
    model_config = ModelConfig.from_json(cfg.model.checkpoint_dir)
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    profile = load_profile(profile_key or ("cpu" if device == "cpu" else _local_gpu_profile()))
    progress(f"measuring the peak FLOP/s of {profile.name}" if profile.kind == "cpu" else f"profile {profile.name}")
    profile = with_measured_speed(profile, cfg.model.dtype)
    rounds = min(rounds, steps)
    per_round = math.ceil(steps / rounds)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    work = Path(tempfile.mkdtemp(prefix="fastune_bench_"))
    processes: list[_Process] = []
    try:
        checkpoint = []
        if random_init:
            progress("writing a random checkpoint")
            path = write_random_checkpoint(cfg, work / "checkpoint")
            checkpoint = [f"model.checkpoint_dir={path}", f"tokenizer={cfg.tokenizer}"]
        results = {}
        all_specs = specs(config, list(overrides), compare, warmup, [parse_variant(v) for v in variants])
        progress(f"setting up {', '.join(s.name for s in all_specs)} (model, compile, {warmup} warm-up steps)")
        for i, spec in enumerate(all_specs):
            own = checkpoint + [f"output_dir={work / f'out{i}'}"]  # where the recipe may write
            processes.append(_Process(dataclasses.replace(spec, overrides=spec.overrides + own), work))
        for spec, process in zip(all_specs, processes):
            ready = process.read()
            warm = ready["warmup"]
            results[spec.name] = {"kind": spec.kind, "overrides": spec.overrides, "setup_s": ready["setup_s"],
                                  "first_loss": warm[0]["loss"] if warm else None, "steps": []}
        for r in range(rounds):
            order = processes[r % len(processes):] + processes[:r % len(processes)]
            for process in order:
                n = min(per_round, steps - len(results[process.spec.name]["steps"]))
                if n > 0:
                    progress(f"round {r + 1}/{rounds}: {process.spec.name}, {n} steps")
                    results[process.spec.name]["steps"] += process.ask(f"run {n}")["steps"]
        for process in processes:
            if breakdown_steps:
                progress(f"profiling {process.spec.name}, {breakdown_steps} steps")
                results[process.spec.name]["breakdown"] = process.ask(f"profile {breakdown_steps}")["breakdown"]
            results[process.spec.name]["memory"] = process.ask("done")["memory"]
    finally:
        for process in processes:
            process.close()
        shutil.rmtree(work, ignore_errors=True)
    summarize(results, cfg, model_config, profile)
    return {
        "run_id": run_id, "config": str(config), "overrides": list(overrides), "environment": environment(),
        "profile": profile.as_dict(), "dtype": cfg.model.dtype, "steps": steps, "warmup": warmup,
        "rounds": rounds, "random_init": random_init,
        "results": results, "ratios": ratios(results),
    }


# Whole words of the device name, first match wins: "L4" is not "L40S", and an H100 PCIe
# or NVL (other clocks and memory) is not the SXM part.
_GPU_PROFILES = ((r"4090", "rtx4090"), (r"3090", "rtx3090"), (r"5090", "rtx5090"), (r"A10G", "a10g"),
                 (r"L4", "l4"), (r"T4", "t4"), (r"H200", "h200"), (r"H100(?!.*(PCIe|NVL))", "h100_sxm"),
                 (r"A100-SXM4-80GB", "a100_80gb"), (r"A100 80GB", "a100_80gb"), (r"A100", "a100_40gb"))


def gpu_profile_for(name: str) -> str:
    """The profile of a GPU, recognized by its device name."""
    for pattern, key in _GPU_PROFILES:
        if re.search(rf"\b{pattern}\b", name):
            return key
    raise BenchError(f"no profile matches the GPU {name!r}; pass --profile")


def _local_gpu_profile() -> str:
    return gpu_profile_for(torch.cuda.get_device_name())
