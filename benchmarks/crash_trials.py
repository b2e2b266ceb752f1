"""Crash trials: kill -9 a training run at random moments, resume, compare.

Each trial runs ``fastune train`` on the shipped demo model (a few steps, a
checkpoint every step, ``keep_last_n=2``) with ``resume_from_checkpoint=auto``,
and kills its whole process group with SIGKILL several times: at a random moment,
or the instant a temporary or trashed folder appears (inside a save, inside
pruning; ``FASTUNE_CRASH_TEST_DELAY`` widens those moments). Then it runs the
job to its end and checks that

- the final weights (each checkpoint kept) equal an uninterrupted run's, bit for bit;
- every loss logged, by any of the interrupted runs too, equals the reference's at its step;
- no temporary, replaced or trashed folder remains, and exactly ``keep_last_n``
  checkpoints do: disk use at most ``keep_last_n + 1`` checkpoints.

``--fsdp-trials`` adds trials of 2-rank FSDP2 runs on gloo, whose checkpoints hold DCP
resume state.

    python benchmarks/crash_trials.py --trials 10 --kills 3 --fsdp-trials 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import fastune
from fastune.checkpoint.layout import ADAPTER_WEIGHTS

DEMO = Path(fastune.__file__).parent / "assets" / "demo"
KEEP_LAST_N = 2


def job_args(work: Path, output_dir: Path, ranks: int) -> list[str]:
    args = [sys.executable, "-m", "fastune.cli", "train", "demo", f"output_dir={output_dir}",
            f"dataset.data_files.train={work / 'train.jsonl'}", "dataset.val_split=null",
            "~dataset.data_files.validation", "eval_exact_match.source=null",
            "epochs=2", "max_steps_per_epoch=3", "batch_size=4", "save_every_n_steps=1",
            f"keep_last_n={KEEP_LAST_N}", "log_every_n_steps=1", "resume_from_checkpoint=auto",
            "save_adapter_weights_only=true"]
    return args + (["--nproc-per-node", str(ranks)] if ranks > 1 else [])


def prepare(work: Path) -> None:
    """A 48-row training set: a start tokenizes it in no time."""
    rows = (DEMO / "data" / "train.jsonl").read_text().splitlines()[:48]
    (work / "train.jsonl").write_text("\n".join(rows) + "\n")


def environment(delay: float) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTUNE_CRASH_TEST_DELAY": str(delay),
           "PYTHONUNBUFFERED": "1"}
    return env


def start(args: list[str], env: dict[str, str], log) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def in_flight(output_dir: Path) -> bool:
    """A save or a deletion is under way: a hidden temporary, staging or trash folder exists."""
    try:
        return any(p.name.startswith(".") and any(t in p.name for t in (".tmp-", ".trash-", ".staging-"))
                   for p in output_dir.iterdir())
    except FileNotFoundError:
        return False


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_to_end(args, env, log, timeout: float = 900) -> None:
    proc = start(args, env, log)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise
    if code != 0:
        raise RuntimeError(f"run failed with status {code}; see {log.name}")


def losses(output_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every complete line any run logged (a kill may cut the last one)."""
    found = []
    for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            found.append((record["step"], record["loss"]))
    return found


def weights(output_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p / ADAPTER_WEIGHTS)
            for p in sorted(output_dir.iterdir()) if not p.name.startswith(".") and (p / ADAPTER_WEIGHTS).is_file()}


def disk_use(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def check(output_dir: Path, reference: Path) -> list[str]:
    """What differs from the uninterrupted run, or is left over; empty when the trial passed."""
    problems = []
    want_losses = dict(losses(reference))
    for step, loss in losses(output_dir):
        if want_losses.get(step) != loss:
            problems.append(f"step {step}: loss {loss} != {want_losses.get(step)}")
    if {s for s, _ in losses(output_dir)} != set(want_losses):
        problems.append("the logged steps differ from the reference's")
    got, want = weights(output_dir), weights(reference)
    if sorted(got) != sorted(want):
        problems.append(f"checkpoints {sorted(got)} != {sorted(want)}")
    for name in set(got) & set(want):
        for key, tensor in want[name].items():
            if not torch.equal(got[name].get(key, torch.empty(0)), tensor):
                problems.append(f"{name}: {key} differs")
                break
    hidden = [p.name for p in output_dir.iterdir() if p.name.startswith(".") and p.is_dir()]
    if hidden:
        problems.append(f"left over: {hidden}")
    checkpoint = max(disk_use(p) for p in reference.iterdir() if p.is_dir() and p.name != "logs")
    if disk_use(output_dir) > (KEEP_LAST_N + 1) * checkpoint + 1_000_000:
        problems.append(f"disk use {disk_use(output_dir)} > {KEEP_LAST_N + 1} checkpoints of {checkpoint}")
    return problems


def trial(work: Path, reference: Path, index: int, kills: int, ranks: int, rng: random.Random,
          duration: float, delay: float) -> dict:
    output_dir = work / f"trial_{ranks}r_{index}"
    args, env = job_args(work, output_dir, ranks), environment(delay)
    done, moments = 0, []
    with open(work / f"trial_{ranks}r_{index}.log", "w") as log:
        for _ in range(kills):
            proc = start(args, env, log)
            targeted = rng.random() < 0.5  # half the kills land inside a save or a deletion
            deadline = time.monotonic() + (duration * 1.5 if targeted else rng.uniform(0.2, 1.0) * duration)
            while proc.poll() is None and time.monotonic() < deadline:
                if targeted and in_flight(output_dir):
                    time.sleep(rng.uniform(0, delay))
                    break
                time.sleep(0.02)
            if proc.poll() is not None:  # it finished before the kill
                break
            moments.append("in save/prune" if targeted and in_flight(output_dir) else "random")
            kill_group(proc)
            done += 1
        run_to_end(args, env, log)
    problems = check(output_dir, reference)
    return {"trial": output_dir.name, "kills": done, "moments": moments, "problems": problems}


def run_trials(work: Path, trials: int, kills: int, fsdp_trials: int, seed: int, delay: float,
               progress=print) -> list[dict]:
    prepare(work)
    rng = random.Random(seed)
    results = []
    for ranks, count in ((1, trials), (2, fsdp_trials)):
        if not count:
            continue
        reference = work / f"reference_{ranks}r"
        began = time.monotonic()
        with open(work / f"reference_{ranks}r.log", "w") as log:
            run_to_end(job_args(work, reference, ranks), environment(0), log)
        duration = time.monotonic() - began
        for i in range(count):
            result = trial(work, reference, i, kills, ranks, rng, duration, delay)
            progress(json.dumps(result))
            results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10, help="single-process trials")
    parser.add_argument("--fsdp-trials", type=int, default=2, help="2-rank FSDP2 (gloo, DCP) trials")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs per trial (fewer when the run ends first)")
    parser.add_argument("--delay", type=float, default=0.5, help="FASTUNE_CRASH_TEST_DELAY, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="kept afterwards when given")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fastune_crash_"))
    work.mkdir(parents=True, exist_ok=True)
    results = run_trials(work, args.trials, args.kills, args.fsdp_trials, args.seed, args.delay)
    failed = [r for r in results if r["problems"]]
    kills = sum(r["kills"] for r in results)
    targeted = sum(m == "in save/prune" for r in results for m in r["moments"])
    print(f"{len(results)} trials, {kills} SIGKILLs ({targeted} inside a save or pruning): "
          f"{len(results) - len(failed)} exact, {len(failed)} failed")
    if args.workdir is None and not failed:
        shutil.rmtree(work)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
