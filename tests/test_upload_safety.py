"""`fastune upload` sends only what the dry run lists: regular files inside FOLDER,
no hidden files, no resume state at any depth, to a valid repo id."""

from __future__ import annotations

import os

import huggingface_hub
import pytest
from click.testing import CliRunner

from fastune.cli import main
from fastune.hub import HubError, check_repo_id, plan_upload


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def output_dir(tmp_path):
    """An output_dir as a run leaves it, plus what must not leave the machine."""
    out = tmp_path / "out"
    for name in ("config.yaml", "config.1.yaml", "logs/metrics.jsonl", "epoch_0/model.safetensors",
                 "epoch_0/config.json", "epoch_0/training_state.pt", "epoch_0/adapter/adapter_model.safetensors",
                 "epoch_0/distributed_checkpoint/__0_0.distcp", "epoch_0/distributed_checkpoint/.metadata",
                 ".env", "epoch_0/.secret", ".cache/x", "weird[1]*.txt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    outside = tmp_path / "private.txt"
    outside.write_text("private")
    os.symlink(outside, out / "link_out.txt")
    os.symlink(out / "epoch_0" / "config.json", out / "link_in.json")
    os.symlink(tmp_path, out / "dirlink")
    return out


WANT = ["epoch_0/adapter/adapter_model.safetensors", "epoch_0/config.json", "epoch_0/model.safetensors",
        "link_in.json", "logs/metrics.jsonl", "weird[1]*.txt"]


def test_plan_skips_links_out_hidden_files_and_resume_state_at_every_depth(output_dir):
    plan = plan_upload(output_dir)
    assert plan.files == WANT
    assert plan.hidden == [".cache/x", ".env", "epoch_0/.secret"]
    assert plan.links == ["dirlink", "link_out.txt"]
    assert ".env" in plan_upload(output_dir, include_hidden=True).files


@pytest.mark.parametrize("repo_id", ["../../etc", "a/b/c", "me/x y", "/abs"])
def test_invalid_repo_ids_are_refused(repo_id):
    with pytest.raises(HubError, match="not a valid repo id"):
        check_repo_id(repo_id)
    for args in (["upload", ".", repo_id, "--dry-run"], ["download", repo_id, "--output-dir", "x"]):
        result = run(*args)
        assert result.exit_code == 2 and result.output.startswith("error: ") and "not a valid repo id" in result.output


def test_dry_run_lists_exactly_what_the_upload_sends(monkeypatch, output_dir):
    sent = {}

    class Commit:
        commit_url = "https://huggingface.co/me/x/commit/abc"

    def upload_folder(**kw):  # what huggingface_hub would send, by its own filtering
        from huggingface_hub.utils import filter_repo_objects

        root = kw["folder_path"]
        everything = [p.relative_to(root).as_posix() for p in root.glob("**/*") if p.is_file()]
        sent["files"] = sorted(filter_repo_objects(everything, allow_patterns=kw["allow_patterns"],
                                                   ignore_patterns=kw["ignore_patterns"]))
        return Commit()

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    dry = run("upload", output_dir, "me/x", "--dry-run")
    assert dry.exit_code == 0, dry.output
    listed = [line.strip() for line in dry.stdout.splitlines()[1:]]
    assert listed == WANT
    assert "skipped 3 hidden file(s)" in dry.stderr and ".env" in dry.stderr
    assert "skipped 2 symlink(s)" in dry.stderr
    real = run("upload", output_dir, "me/x")
    assert real.exit_code == 0, real.output
    assert sent["files"] == WANT
