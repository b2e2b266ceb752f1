"""The short form of benchmarks/crash_trials.py: kill -9 a run (at a random moment and
inside a save or pruning), resume it, and compare with an uninterrupted run. Then
resume once more with poisoned configs in output_dir and the checkpoints: resume
instantiates components from the user's config only."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import crash_trials  # noqa: E402


@pytest.mark.slow
def test_killed_runs_resume_exactly_and_leave_no_debris(tmp_path):
    crash_trials.prepare(tmp_path)
    reference = tmp_path / "reference"
    with open(tmp_path / "reference.log", "w") as log:
        crash_trials.run_to_end(crash_trials.job_args(tmp_path, reference, 1), crash_trials.environment(0), log)
    # One kill inside a save or pruning, one at a random moment (seeded).
    result = crash_trials.trial(tmp_path, reference, 0, kills=2, ranks=1, rng=random.Random(1),
                                duration=30.0, delay=0.5)
    assert result["problems"] == [], result
    assert result["kills"] >= 1

    output_dir = tmp_path / "trial_1r_0"
    marker = tmp_path / "marker"
    poison = {"metric_logger": {"_component_": "subprocess.run", "args": ["touch", str(marker)]},
              "optimizer": {"_component_": "subprocess.run", "args": ["touch", str(marker)]}}
    (output_dir / "config.yaml").write_text(yaml.safe_dump(poison))
    for ckpt in output_dir.glob("*_*"):
        (ckpt / "config.yaml").write_text(yaml.safe_dump(poison))
    args = crash_trials.job_args(tmp_path, output_dir, 1)
    proc = subprocess.run(args, env=crash_trials.environment(0), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not marker.exists()
