"""Secrets stay out of every sink: config.yaml, W&B (init arguments, config, the offline
.wandb file), error lines and --debug tracebacks."""

from __future__ import annotations

import functools
import os

import pytest
from click.testing import CliRunner
from test_loggers import cfg_dir, read_wandb_records, wait_for_exit_record, wandb_offline  # noqa: F401

from fastune.cli import main
from fastune.config import load_config, save_resolved_config
from fastune.config.secrets import redact_secrets, redact_text
from fastune.training.loggers import build_metric_logger

ENV_SECRET = "S3cr3t-from-the-environment"  # no token shape: caught because it came from ${oc.env:...}
WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"
HF = "hf_" + "Zy9Xw8Vu7T" * 4
SHAPES = [HF, WANDB_KEY, "sk-" + "A1b2C3d4E5" * 3, "AKIA" + "ABCDEFGHIJKLMNOP", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"]


@pytest.mark.parametrize("secret", SHAPES)
def test_token_shapes_are_redacted_in_text_and_configs(secret):
    assert secret not in redact_text(f"error: value {secret!r} at x")
    assert redact_secrets({"innocent": secret, "tags": ["a", secret]}) == {"tags": ["a"]}


def test_ordinary_values_are_kept():
    text = "/work/runs/llama3_2/epoch_0 lr 2e-4 meta-llama/Llama-3.2-1B-Instruct max_new_tokens"
    assert redact_text(text) == text


def test_environment_values_never_reach_config_yaml_or_wandb(cfg_dir, wandb_offline, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MY_SECRET", ENV_SECRET)
    monkeypatch.setenv("WANDB_KEY_UNDER_ANOTHER_NAME", WANDB_KEY)
    cfg = load_config("config.yaml", [
        "metric_logger=wandb", "metric_logger.notes=${oc.env:MY_SECRET}", f"metric_logger.name=run-{HF}",
        "metric_logger.tags=[a,'${oc.env:WANDB_KEY_UNDER_ANOTHER_NAME}']",
        "metric_logger.job_type=${oc.env:MY_SECRET}",
    ])
    text = save_resolved_config(cfg, cfg_dir / "out").read_text()
    assert ENV_SECRET not in text and WANDB_KEY not in text and HF not in text
    assert "${oc.env:MY_SECRET}" in text  # the saved config still resolves to it next time

    import wandb

    seen = {}
    real_init = wandb.init

    @functools.wraps(real_init)  # the logger checks its keys against wandb.init's signature
    def init(**kw):
        seen.update(kw)
        return real_init(**kw)

    monkeypatch.setattr(wandb, "init", init)
    with build_metric_logger(cfg.metric_logger, cfg):
        pass
    wait_for_exit_record(wandb_offline)
    assert not any(s in repr(seen) for s in (ENV_SECRET, WANDB_KEY, HF)), seen
    assert seen["tags"][0] == "a"
    stored = b"".join(r.SerializeToString() for r in read_wandb_records(wandb_offline))
    for secret in (ENV_SECRET, WANDB_KEY, HF):
        assert secret.encode() not in stored


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_error_lines_and_debug_tracebacks_carry_no_secret(cfg_dir, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", HF)
    monkeypatch.setenv("MY_SECRET", ENV_SECRET)
    for override in ("optimizer.lr=${oc.env:HF_TOKEN}", "optimizer.lr=${oc.env:MY_SECRET}"):
        result = _run("validate", "config.yaml", override)
        assert result.exit_code == 2 and "optimizer.lr" in result.output, result.output
        assert HF not in result.output and ENV_SECRET not in result.output
        debug = _run("validate", "config.yaml", override, "--debug")
        assert debug.exception is not None
        import traceback

        shown = "".join(traceback.format_exception(debug.exception))
        assert HF not in shown and ENV_SECRET not in shown and "optimizer.lr" in shown


def test_debug_traceback_in_a_subprocess_carries_no_secret(cfg_dir):  # noqa: F811
    import subprocess
    import sys

    env = {**os.environ, "HF_TOKEN": HF}
    proc = subprocess.run([sys.executable, "-m", "fastune.cli", "validate", "config.yaml",
                           "optimizer.lr=${oc.env:HF_TOKEN}", "--debug"],
                          capture_output=True, text=True, env=env, cwd=cfg_dir, timeout=120)
    assert "Traceback" in proc.stderr and "optimizer.lr" in proc.stderr
    assert HF not in proc.stderr and HF not in proc.stdout
