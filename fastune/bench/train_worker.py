"""A ``fastune bench train`` configuration's process (``python -m fastune.bench.train_worker
--worker SPEC``): it builds the run, warms up, says ready, then runs timed steps when
the parent (``fastune.bench.train``) asks, speaking JSON lines after ``MARK``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

MARK = "@@fastune-bench "  # protocol lines on a worker's stdout start with this
PHASES = ("data", "forward", "backward", "optimizer", "other")



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
        from fastune.methods.method import method_from_config
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
    memory = None  # the timed steps' peaks, taken before a profile can add to them
    for line in sys.stdin:
        command = line.split()
        if command[0] == "run":
            _say({"event": "steps", "steps": [runner.step() for _ in range(int(command[1]))]})
        elif command[0] == "profile":
            from fastune.bench.breakdown import profile_steps

            memory = memory or _memory(runner.device)
            sync = torch.cuda.synchronize if runner.device.type == "cuda" else lambda: None
            _say({"event": "profile", "breakdown": profile_steps(runner.step, int(command[1]), sync)})
        elif command[0] == "done":
            _say({"event": "done", "memory": memory or _memory(runner.device)})
            return


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", required=True, help="the JSON of a Spec")
    args = parser.parse_args(argv)
    worker(Spec(**json.loads(args.worker)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
