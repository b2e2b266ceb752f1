"""OS and checkpoint errors are one line naming the path, exit status 2; --debug keeps
the traceback; a failed save leaves the earlier checkpoints as they were."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from click.testing import CliRunner

from fastune.checkpoint import CheckpointError, atomic_directory
from fastune.cli import main
from fastune.errors import FastuneError, user_error_line
from fastune.training import checkpointer


@pytest.mark.parametrize("code, fragment", [
    (errno.ENOSPC, "No space left on device; free some space"),
    (errno.EROFS, "Read-only file system; choose a writable folder"),
    (errno.EACCES, "Permission denied; choose a folder you may write to"),
    (errno.ENOTDIR, "Not a directory; a part of the path is a file"),
])
def test_os_errors_the_user_fixes_are_one_line_naming_the_path(code, fragment):
    import os

    line = user_error_line(OSError(code, os.strerror(code), "/runs/out/step_2"))
    assert line == f"/runs/out/step_2: {fragment}"


def test_bugs_are_not_user_errors():
    assert user_error_line(KeyError("x")) is None
    assert user_error_line(OSError(errno.EBADF, "Bad file descriptor")) is None


def test_checkpoint_errors_are_fastune_errors():
    assert issubclass(CheckpointError, FastuneError) and issubclass(CheckpointError, ValueError)


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
         "num_hidden_layers": 2, "num_attention_heads": 2}))
    (tmp_path / "config.yaml").write_text("output_dir: out\nmodel:\n  checkpoint_dir: ckpt\ndataset:\n  source: org/data\n")
    return tmp_path


def test_read_only_output_dir_is_one_line(config, monkeypatch):
    """Root ignores permissions, so the read-only filesystem is simulated where the config is written."""
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr("pathlib.Path.mkdir", read_only)
    result = CliRunner().invoke(main, ["train", "config.yaml"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: out: Read-only file system; choose a writable folder"
    debug = CliRunner().invoke(main, ["train", "config.yaml", "--debug"])
    assert isinstance(debug.exception, OSError)  # --debug keeps the exception and its traceback


def test_full_disk_during_a_save_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from fastune.checkpoint import hf

    earlier = checkpointer.save_checkpoint(tmp_path, "step_1", lambda folder: (folder / "model.safetensors").write_bytes(b"1"),
                                           {"x": torch.zeros(1)}, {"global_step": 1})
    before = sorted(p.name for p in tmp_path.iterdir())

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 27, kind: FileTooLarge, message: \"File too large\" })")

    monkeypatch.setattr(hf, "save_file", full)
    model = torch.nn.Linear(2, 2)  # what write_model would do: the HF writer
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot write .*File too large") as info:
        checkpointer.save_checkpoint(tmp_path, "step_2", lambda folder: hf.write_safetensors(
            folder / "model.safetensors", {"w": model.weight.detach()}), {}, {"global_step": 2})
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no step_2, no temporary folder
    assert (earlier / "model.safetensors").read_bytes() == b"1"


@pytest.mark.parametrize("under", ["afile", "afile/deeper"])
def test_output_dir_under_a_regular_file_names_it(tmp_path, under):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError) as info:
        with atomic_directory(tmp_path / under / "step_1"):
            pass
    line = user_error_line(info.value)
    assert line.startswith(str(tmp_path / "afile")) and "a part of the path is a file" in line
    assert (tmp_path / "afile").read_text() == "x"
