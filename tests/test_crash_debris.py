"""What a kill leaves in output_dir is cleaned up, and damaged checkpoints block a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastune.checkpoint import atomic_directory, remove_directory, sweep_debris
from fastune.training import checkpointer
from fastune.training.checkpointer import ResumeError, resolve_resume


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _checkpoint(output_dir, name, step):
    folder = output_dir / name
    folder.mkdir(parents=True)
    (folder / checkpointer.TRAINER_STATE).write_text(json.dumps({"global_step": step}))
    (folder / "model.safetensors").write_bytes(b"x")
    return folder


def test_nested_atomic_write_leaves_no_doubled_temporary_folder(tmp_path):
    with atomic_directory(tmp_path / "step_1") as outer:
        with atomic_directory(outer) as inner:  # the HF writer inside a checkpoint write
            assert inner == outer
            (inner / "model.safetensors").write_bytes(b"x")
        assert [p.name for p in tmp_path.iterdir()] == [outer.name]
    assert [p.name for p in tmp_path.iterdir()] == ["step_1"]
    assert (tmp_path / "step_1" / "model.safetensors").read_bytes() == b"x"


def test_sweep_removes_debris_of_dead_processes_only(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    debris = [f".step_4.tmp-{dead}-0123abcd", f".step_2.trash-{dead}-0123abcd",
              f"..step_4.tmp-{dead}-0123abcd.old-{dead}-89abcdef"]
    kept = [f".step_6.tmp-{alive}-0123abcd", "step_2", ".hidden"]
    for name in debris + kept:
        (tmp_path / name).mkdir()
    assert sorted(p.name for p in sweep_debris(tmp_path)) == sorted(debris)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_sweep_puts_back_a_replaced_folder_whose_successor_never_arrived(tmp_path):
    old = tmp_path / f".epoch_0.old-{_dead_pid()}-0123abcd"
    old.mkdir()
    (old / "f").write_text("kept")
    sweep_debris(tmp_path)
    assert (tmp_path / "epoch_0" / "f").read_text() == "kept"


def test_remove_directory_goes_through_a_hidden_trash_name(tmp_path, monkeypatch):
    folder = _checkpoint(tmp_path, "step_2", 2)
    seen = []
    monkeypatch.setattr("shutil.rmtree", lambda path, *a, **k: seen.append(path) or (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # a kill during the deletion
        remove_directory(folder)
    assert not folder.exists() and seen[0].name.startswith(".step_2.trash-")
    assert checkpointer.checkpoint_dirs(tmp_path) == []


def test_resume_start_sweeps_output_dir(tmp_path):
    _checkpoint(tmp_path, "step_2", 2)
    (tmp_path / f".step_4.tmp-{_dead_pid()}-0123abcd").mkdir()
    (tmp_path / ".step_4.staging-0123abcd").mkdir()
    assert resolve_resume("auto", tmp_path) == tmp_path / "step_2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]


@pytest.mark.parametrize("resume_from", ["auto", None])
def test_only_damaged_checkpoints_block_the_run(tmp_path, resume_from):
    bad = tmp_path / "step_4"
    bad.mkdir()
    (bad / checkpointer.TRAINER_STATE).write_text("{trunc")
    (tmp_path / "epoch_0").mkdir()  # half-deleted by an old keep_last_n
    with pytest.raises(ResumeError, match=r"holds only damaged checkpoints \(epoch_0, step_4: .*move or delete them"):
        resolve_resume(resume_from, tmp_path)


def test_damaged_checkpoint_next_to_an_intact_one_resumes_from_the_intact_one(tmp_path):
    good = _checkpoint(tmp_path, "step_2", 2)
    (tmp_path / "step_4").mkdir()
    assert resolve_resume("auto", tmp_path) == good
