"""Third-party noise stays off the terminal unless --debug (fastune.cli.quiet)."""

import subprocess
import sys
import warnings

import pytest
from click.testing import CliRunner

IMPORT_TORCHAO = "import logging, sys; logging.basicConfig(stream=sys.stderr); import torchao"


def stderr_of(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stderr


@pytest.mark.slow
def test_torchao_library_failures_are_dropped():
    loud = stderr_of(IMPORT_TORCHAO)
    quiet = stderr_of("from fastune.cli.quiet import quiet_dependencies; quiet_dependencies(); " + IMPORT_TORCHAO)
    assert "Failed to load" not in quiet and "deprecated" not in quiet
    if "_C_mxfp8" not in loud:
        pytest.skip("torchao's binaries load on this machine: nothing to drop")


def test_dependency_deprecations_are_dropped_and_fastunes_own_kept(monkeypatch):
    from fastune.cli.quiet import quiet_dependencies

    monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_dependencies()
        for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
            warnings.warn_explicit("old", category, "x.py", 1, module="transformers.modeling_utils")
            warnings.warn_explicit("ours", category, "x.py", 1, module="fastune.training.loop")
        warnings.warn_explicit("a real problem", UserWarning, "x.py", 1, module="transformers.modeling_utils")
    assert sorted(str(w.message) for w in seen) == ["a real problem", "ours", "ours", "ours"]
    assert __import__("os").environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"


@pytest.mark.parametrize("args, quiet", [
    (["ls"], True),
    (["cp", "demo", "/nonexistent-dir/x.yaml", "--debug"], False),  # --debug after the command name
    (["--debug", "ls"], False),
])
def test_the_cli_quiets_dependencies_unless_debug(monkeypatch, args, quiet):
    import fastune.cli.quiet
    from fastune.cli import main

    calls = []
    monkeypatch.setattr(fastune.cli.quiet, "quiet_dependencies", lambda: calls.append(1))
    monkeypatch.delenv("FASTUNE_DEBUG", raising=False)
    CliRunner().invoke(main, args)
    assert bool(calls) == quiet
