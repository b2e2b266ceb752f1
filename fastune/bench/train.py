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
the model FLOPs of a step (see ``model_flops_per_step``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from fastune.errors import FastuneError

MARK = "@@fastune-bench "  # protocol lines on a worker's stdout start with this
COMPARE = {
    "eager": ["fastune eager"],
    "hf": ["hf+peft eager", "hf+peft compiled"],
    "hf-eager": ["hf+peft eager"],
    "hf-compiled": ["hf+peft compiled"],
}
PHASES = ("data", "forward", "backward", "optimizer", "other")


class BenchError(FastuneError):
    """A benchmark that cannot run as asked (one line)."""


@dataclasses.dataclass
class Spec:
    """One configuration, as a worker process gets it (JSON on its command line)."""

    name: str
    kind: str  # "fastune" or "hf"
    config: str
    overrides: list[str]
    warmup: int
    compile: bool = False  # hf only: torch.compile the whole model

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"NAME:KEY=VALUE,KEY=VALUE"`` -> (NAME, [KEY=VALUE, ...]): fastune with more overrides."""
    name, _, overrides = text.partition(":")
    items = [o.strip() for o in overrides.split(",") if o.strip()]
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


# ----------------------------------------------------------------------------- model FLOPs


def model_flops_per_step(cfg, model_config, tokens_shape: tuple[int, int]) -> float:
    """Model FLOPs of one optimizer step (all micro-batches), counting what the math
    needs, not what the implementation does: every matmul costs 2 FLOPs per
    multiply-add; a frozen weight costs its forward and its input gradient (2 matmuls),
    a trained one also its weight gradient (3); attention scores and values cost
    2 * 2 * S^2/2 * H * D per row and layer in forward (causal: half the square), twice
    that in backward. Recomputation by activation checkpointing is not counted.
    Padding positions count: the model computes them."""
    c = model_config
    rows, seq = tokens_shape
    tokens = rows * seq * cfg.gradient_accumulation_steps
    q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {"q_proj": (c.hidden_size, q_out), "k_proj": (c.hidden_size, kv_out),
              "v_proj": (c.hidden_size, kv_out), "o_proj": (q_out, c.hidden_size),
              "gate_proj": (c.hidden_size, c.intermediate_size), "up_proj": (c.hidden_size, c.intermediate_size),
              "down_proj": (c.intermediate_size, c.hidden_size)}
    from fastune.training.method import method_from_config

    lora = method_from_config(cfg).lora
    full = lora is None  # the base weights train
    targets = set() if full else set(lora.targets)
    frozen = trained = 0
    for name, (fan_in, fan_out) in shapes.items():
        weight = fan_in * fan_out * c.num_hidden_layers
        trained += weight if full else 0
        frozen += 0 if full else weight
        if name in targets:
            trained += lora.rank * (fan_in + fan_out) * c.num_hidden_layers
    head = c.hidden_size * c.vocab_size
    head_trained = full and not c.tie_word_embeddings or "lm_head" in targets
    trained += head if head_trained else 0
    frozen += 0 if head_trained else head
    if "lm_head" in targets:
        trained += lora.rank * (c.hidden_size + c.vocab_size)
    matmuls = tokens * (2 * 2 * frozen + 2 * 3 * trained)
    attention_forward = 2 * 2 * (seq * seq / 2) * q_out * c.num_hidden_layers * rows * cfg.gradient_accumulation_steps
    return matmuls + 3 * attention_forward


# ----------------------------------------------------------------------------- workers


class PhaseClock:
    """Wall-clock time between named marks: a phase lasts from its mark to the next.
    On CUDA each mark synchronizes first, so that work is charged to its phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list[tuple[str, float]] = []

    def mark(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks.append((phase, time.perf_counter()))

    def take(self) -> tuple[float, dict[str, float]]:
        """(seconds from the first mark to the last, seconds per phase); then forget the marks."""
        phases = dict.fromkeys(PHASES, 0.0)
        for (name, start), (_, end) in zip(self.marks, self.marks[1:]):
            phases[name] += end - start
        total = self.marks[-1][1] - self.marks[0][1]
        self.marks = []
        return total, phases


class MicroBatches:
    """The optimizer steps' micro-batches from a loader, epoch after epoch."""

    def __init__(self, loader, per_step: int):
        self.loader, self.per_step = loader, per_step
        self.epoch = 0
        self._batches = self._new_epoch()

    def _new_epoch(self) -> Iterator:
        self.loader.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)

    def next(self) -> list[dict[str, torch.Tensor]]:
        step = list(itertools.islice(self._batches, self.per_step))
        if len(step) < self.per_step:
            self._batches = self._new_epoch()
            step = list(itertools.islice(self._batches, self.per_step))
        return step


def _token_counts(micro_batches) -> tuple[int, int]:
    from fastune.data import IGNORE_INDEX

    tokens = sum(int(b["num_tokens"]) for b in micro_batches)
    supervised = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
    return tokens, supervised


class _TimedObjective:
    """The run's objective, calling ``done()`` when the loss is computed (backward starts)."""

    def __init__(self, objective, done: Callable[[], None]):
        self.objective, self.done = objective, done
        self.normalizer = objective.normalizer

    def __call__(self, *args, **kwargs):
        out = self.objective(*args, **kwargs)
        self.done()
        return out


class FastuneRunner:
    """The recipe's own ``setup`` and ``train_step``; hooks mark the phases: the model's
    forward pre-hook (forward starts), the loss returning (backward starts) and the
    optimizer's step pre-hook (optimizer starts)."""

    def __init__(self, cfg):
        from fastune.training import recipe

        self.recipe = recipe
        self.run = recipe.setup(cfg)
        self.device = self.run.device
        self.clock = PhaseClock(self.device)
        self.run.model.register_forward_pre_hook(lambda *_: self.clock.mark("forward"))
        self.run.optimizer.register_step_pre_hook(lambda *_: self.clock.mark("optimizer"))
        self.run.objective = _TimedObjective(self.run.objective, lambda: self.clock.mark("backward"))
        self.batches = MicroBatches(self.run.train_loader, cfg.gradient_accumulation_steps)

    def step(self) -> dict[str, Any]:
        self.clock.mark("data")
        micro_batches = self.batches.next()
        self.clock.mark("other")
        loss, _, _ = self.recipe.train_step(self.run, micro_batches)
        self.clock.mark("end")
        return _step_record(self.clock, micro_batches, loss)


class HFRunner:
    """transformers + PEFT on the same weights, batches, optimizer and clipping."""

    def __init__(self, cfg, compile: bool):
        import transformers

        from fastune.checkpoint.hf import parse_dtype
        from fastune.config.sections import DataSection
        from fastune.data import load_tokenizer
        from fastune.training.method import method_from_config
        from fastune.training.optim import build_lr_scheduler, build_optimizer
        from fastune.training.recipe import build_data, resolve_device, seed_everything

        self.device = resolve_device(cfg.device)
        seed_everything(cfg.seed)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            cfg.model.checkpoint_dir, dtype=parse_dtype(cfg.model.dtype)).to(self.device)
        if cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        method = method_from_config(cfg)
        if method.lora is not None:
            import peft

            lora = method.lora
            model = peft.get_peft_model(model, peft.LoraConfig(
                r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=list(lora.targets), use_dora=method.use_dora))
        model.train()
        self.model = model
        self.forward = torch.compile(model) if compile else model
        container = _plain(cfg.optimizer)
        self.optimizer = build_optimizer(container, model, self.device)
        self.scheduler = build_lr_scheduler(_plain(cfg.lr_scheduler), self.optimizer, 10**6)
        self.max_norm = cfg.clip_grad_norm
        loader, _ = build_data(DataSection.from_config(cfg), load_tokenizer(cfg.tokenizer), self.device)
        self.batches = MicroBatches(loader, cfg.gradient_accumulation_steps)
        self.clock = PhaseClock(self.device)

    def step(self) -> dict[str, Any]:
        from fastune.data import IGNORE_INDEX
        from fastune.training.recipe import clip_gradients

        self.clock.mark("data")
        micro_batches = self.batches.next()
        self.clock.mark("other")
        supervised = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
        count = torch.tensor(max(supervised, 1), device=self.device)  # a tensor: no recompile per value
        step_loss = torch.zeros((), device=self.device)
        for batch in micro_batches:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            self.clock.mark("forward")
            out = self.forward(input_ids=batch["tokens"], position_ids=batch.get("position_ids"),
                               labels=batch["labels"], shift_labels=batch["labels"], num_items_in_batch=count)
            self.clock.mark("backward")
            out.loss.backward()
            step_loss += out.loss.detach()
        self.clock.mark("optimizer")
        clip_gradients(self.model, self.max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.clock.mark("end")
        return _step_record(self.clock, micro_batches, step_loss)


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def _step_record(clock: PhaseClock, micro_batches, loss: torch.Tensor) -> dict[str, Any]:
    seconds, phases = clock.take()
    tokens, supervised = _token_counts(micro_batches)
    return {"seconds": seconds, "phases": phases, "tokens": tokens, "supervised": supervised,
            "shape": list(micro_batches[0]["tokens"].shape), "loss": float(loss), "finished_at": time.time(),
            "load_avg": os.getloadavg()[0]}


def _memory(device: torch.device) -> dict[str, float]:
    from fastune.bench.measure import peak_rss_mib

    out = {"process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "steps_peak_rss_mib": peak_rss_mib()}
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    return out


def _reset_step_peaks(device: torch.device) -> None:
    """Peaks of the timed steps only: reset the kernel's peak-RSS mark (and CUDA's)."""
    Path("/proc/self/clear_refs").write_text("5")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _say(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker(spec: Spec) -> None:
    """A configuration's process: set up, warm up, say ready; then run steps when asked."""
    import logging

    from fastune.config import load_config

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    started = time.perf_counter()
    cfg = load_config(spec.config, spec.overrides)
    runner = FastuneRunner(cfg) if spec.kind == "fastune" else HFRunner(cfg, spec.compile)
    warmup = [runner.step() for _ in range(spec.warmup)]
    _reset_step_peaks(runner.device)
    _say({"event": "ready", "setup_s": time.perf_counter() - started, "warmup": warmup})
    for line in sys.stdin:
        command = line.split()
        if command[0] == "run":
            _say({"event": "steps", "steps": [runner.step() for _ in range(int(command[1]))]})
        elif command[0] == "done":
            _say({"event": "done", "memory": _memory(runner.device)})
            return


# ----------------------------------------------------------------------------- the parent


class _Process:
    """A worker process and its protocol lines."""

    def __init__(self, spec: Spec, log_dir: Path):
        self.spec = spec
        self.log = open(log_dir / f"{spec.name.replace(' ', '_').replace('+', '')}.log", "w")
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "fastune.bench.train", "--worker", spec.to_json()],
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
    from fastune.models.transformer import Transformer

    torch.manual_seed(cfg.seed)
    model = Transformer(ModelConfig.from_json(cfg.model.checkpoint_dir))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.ndim == 1 else p.normal_(0.0, 0.02)
    fastune.save_pretrained(model, out_dir, source_dir=cfg.model.checkpoint_dir, dtype=parse_dtype(cfg.model.dtype))
    return out_dir


def bench_train(config: str, overrides: list[str], compare: list[str], steps: int, warmup: int,
                rounds: int, random_init: bool, profile_key: Optional[str], variants: list[str] = (),
                progress: Callable[[str], None] = lambda _: None) -> dict:
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
    from fastune.training.method import method_from_config

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


def summarize(results: dict, cfg, model_config, profile) -> None:
    """Medians and rates of each configuration, added to its entry."""
    peak = profile.peak_flops(cfg.model.dtype)
    for entry in results.values():
        timed = entry["steps"]
        median_s = statistics.median(s["seconds"] for s in timed)
        # Rows of padded batches differ in length: FLOPs per step, averaged over the timed steps.
        flops = statistics.mean(model_flops_per_step(cfg, model_config, tuple(s["shape"])) for s in timed)
        entry.update(
            median_step_s=median_s,
            tokens_per_s=statistics.mean(s["tokens"] for s in timed) / median_s,
            supervised_tokens_per_s=statistics.mean(s["supervised"] for s in timed) / median_s,
            phases_median_ms={p: 1e3 * statistics.median(s["phases"][p] for s in timed) for p in PHASES},
            model_flops_per_step=flops,
            model_flops_per_s=flops / median_s,
            fraction_of_peak_flops=None if not peak else flops / median_s / peak,
        )


def ratios(results: dict) -> dict[str, dict[str, float]]:
    """fastune against each other configuration, from this run's numbers: tokens/s
    ratio (> 1: fastune faster) and peak-memory ratio (< 1: fastune smaller)."""
    base = results["fastune"]
    out = {}
    for name, other in results.items():
        if name == "fastune":
            continue
        memory_key = "cuda_max_allocated_mib" if "cuda_max_allocated_mib" in base["memory"] else "process_peak_rss_mib"
        out[name] = {"tokens_per_s": base["tokens_per_s"] / other["tokens_per_s"],
                     "peak_memory": base["memory"][memory_key] / other["memory"][memory_key],
                     "memory_measure": memory_key}
    return out


def render(report: dict) -> str:
    """The report as markdown."""
    from fastune.bench.report import table

    profile, results = report["profile"], report["results"]
    cuda = profile["kind"] == "cuda"
    peak = profile.get(f"peak_{'bf16' if report['dtype'] in ('bf16', 'bfloat16') else 'fp32'}_flops")
    shape = next(iter(results.values()))["steps"][0]["shape"]
    lines = [
        f"# Training benchmark: {report['config']}",
        "",
        f"{report['steps']} timed steps per configuration after {report['warmup']} warm-up steps, "
        f"interleaved in {report['rounds']} rounds, each configuration in its own process; batch "
        f"{shape[0]} x {shape[1]} tokens, {report['dtype']}"
        f"{', random weights' if report['random_init'] else ''}. Run {report['run_id']}.",
        "",
        "tokens/s = mean tokens per step / median step time: `all` counts every non-padding token "
        "(prompt included), `supervised` only tokens with a label (torchtune's tokens/s). Phases are "
        "medians (ms): forward includes the loss, backward includes gradient clipping. "
        + ("Peak memory: CUDA max allocated. " if cuda else
           "Peak RSS: of the whole process (setup and compile included) / during the timed steps. ")
        + f"Peak {report['dtype']} FLOP/s of {profile['name']}: "
        + (f"{peak / 1e12:.3g} TFLOP/s ({profile['sources'].get('peak_bf16_flops' if report['dtype'] == 'bf16' else 'peak_fp32_flops', '')})"
           if peak else "unknown") + "; model FLOPs per step as `fastune.bench.train.model_flops_per_step` counts them.",
        "",
    ]
    header = ["configuration", "tok/s all", "tok/s supervised", "step ms", "data", "forward", "backward",
              "optimizer", "peak MiB" if cuda else "peak RSS MiB (process / steps)", "% of peak FLOP/s",
              "first loss", "fastune speedup", "fastune memory ratio"]
    rows = []
    for name, r in results.items():
        ph, mem = r["phases_median_ms"], r["memory"]
        memory = (f"{mem['cuda_max_allocated_mib']:.0f}" if cuda
                  else f"{mem['process_peak_rss_mib']:.0f} / {mem['steps_peak_rss_mib']:.0f}")
        ratio = report["ratios"].get(name)
        rows.append([name, f"{r['tokens_per_s']:,.0f}", f"{r['supervised_tokens_per_s']:,.0f}",
                     f"{1e3 * r['median_step_s']:.0f}", f"{ph['data']:.1f}", f"{ph['forward']:.0f}",
                     f"{ph['backward']:.0f}", f"{ph['optimizer']:.1f}", memory,
                     "-" if r["fraction_of_peak_flops"] is None else f"{100 * r['fraction_of_peak_flops']:.1f}%",
                     "-" if r["first_loss"] is None else f"{r['first_loss']:.4f}",
                     "-" if ratio is None else f"{ratio['tokens_per_s']:.2f}x",
                     "-" if ratio is None else f"{ratio['peak_memory']:.2f}"])
    lines.append(table(header, rows))
    loads = [s["load_avg"] for r in results.values() for s in r["steps"]]
    env = report["environment"]
    lines += ["", "`fastune speedup` = fastune tok/s / that configuration's tok/s; `fastune memory ratio` = "
              "fastune peak / that configuration's peak (process peak RSS on CPU), both from this run.",
              "", f"Machine: {env['machine']}, torch {env['torch']}, {env['threads']} threads, {env['date']}; "
              f"1-minute load average during the timed steps {min(loads):.1f} to {max(loads):.1f} "
              "(above the core count, other processes shared the CPU; the interleaved "
              "configurations wait in their own processes). "
              f"Reproduce: `{env['command']}`"]
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> Optional[Path]:
    from fastune.bench.report import bar_chart

    results = report["results"]
    memory_key = "cuda_max_allocated_mib" if report["profile"]["kind"] == "cuda" else "process_peak_rss_mib"
    return bar_chart(path, f"fastune bench train: {Path(report['config']).name}", list(results),
                     {"tokens/s (all tokens)": {"tokens/s": [r["tokens_per_s"] for r in results.values()]},
                      "peak memory, MiB": {memory_key: [r["memory"][memory_key] for r in results.values()]}})


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", required=True, help="the JSON of a Spec")
    args = parser.parse_args(argv)
    worker(Spec(**json.loads(args.worker)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
