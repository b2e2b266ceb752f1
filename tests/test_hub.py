"""`fastune download` and `fastune upload` (offline: errors, dry runs, and the calls made
with huggingface_hub stubbed), and the export a training run leaves for the Hub and vLLM."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
from click.testing import CliRunner
from huggingface_hub import errors
from safetensors import safe_open
from train_helpers import single_thread  # noqa: F401 (autouse fixture)

from fastune import hub
from fastune.checkpoint import save_hf_checkpoint
from fastune.cli import main
from fastune.hub import REPO_ID_FILE, HubError, base_model_name, download, files_to_upload, read_repo_id

SECRET = "hf_dontPrintMe123"


def hub_error(cls):
    """A huggingface_hub error without an HTTP response (its constructor wants one)."""
    error = cls.__new__(cls)
    Exception.__init__(error, "403 Client Error")
    return error


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_offline_download_is_one_line_and_never_shows_the_token(tmp_path):
    result = run("download", "meta-llama/Llama-3.2-1B-Instruct", "--output-dir", str(tmp_path / "m"),
                 "--hf-token", SECRET)
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: meta-llama/Llama-3.2-1B-Instruct: cannot reach the Hugging Face Hub "
                                     "(no network, or HF_HUB_OFFLINE=1), and the files are not in the local cache")
    assert SECRET not in result.output
    assert not (tmp_path / "m" / REPO_ID_FILE).exists()


@pytest.mark.parametrize("error, message", [
    (errors.GatedRepoError, "is gated: accept its license on https://huggingface.co/org/model"),
    (errors.RepositoryNotFoundError, "no such model repo on the Hub, or it is private"),
])
def test_gated_or_missing_repo_is_one_line(monkeypatch, tmp_path, error, message):
    def refuse(*args, **kwargs):
        raise hub_error(error)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    result = run("download", "org/model", "--output-dir", str(tmp_path), "--hf-token", SECRET)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: org/model") and message in result.stderr
    assert SECRET not in result.output


def test_download_records_the_repo_and_skips_non_safetensors_weights(monkeypatch, tmp_path):
    calls = []

    def fake_snapshot(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        Path(kwargs["local_dir"]).mkdir(parents=True)
        return str(kwargs["local_dir"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    result = run("download", "org/model", "--output-dir", str(tmp_path / "m"))
    assert result.exit_code == 0, result.output
    repo_id, kwargs = calls[0]
    assert repo_id == "org/model" and kwargs["token"] == SECRET
    assert kwargs["ignore_patterns"] == ["*.pth", "*.pt", "*.bin"]
    assert read_repo_id(tmp_path / "m") == "org/model"
    assert SECRET not in result.output
    download("org/other", tmp_path / "all", ignore_patterns=[])
    assert calls[1][1]["ignore_patterns"] is None  # '' on the command line: download everything


def test_adapters_name_the_downloaded_repo_as_their_base(tmp_path):
    assert base_model_name(tmp_path) == str(tmp_path.resolve())  # not downloaded: its path
    (tmp_path / REPO_ID_FILE).write_text(json.dumps({"repo_id": "org/model"}))
    assert base_model_name(tmp_path) == "org/model"


def test_download_defaults_to_where_the_configs_look(monkeypatch):
    seen = {}

    def refuse(repo_id, **kwargs):
        seen.update(kwargs)
        raise hub_error(errors.GatedRepoError)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(HubError, match="is gated"):
        download("meta-llama/Llama-3.2-1B-Instruct")
    assert Path(seen["local_dir"]) == Path("/tmp/Llama-3.2-1B-Instruct")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The output_dir of `fastune train demo`, cut to 2 steps (LoRA: merged weights + adapter)."""
    from fastune.config import load_config
    from fastune.training.recipe import train

    out = tmp_path_factory.mktemp("demo") / "run"
    train(load_config("demo", [f"output_dir={out}", "epochs=1", "max_steps_per_epoch=2",
                               "eval_exact_match.source=null", "metric_logger=stdout"]))
    return out


def test_upload_dry_run_lists_the_export_and_sends_nothing(monkeypatch, demo_run):
    def no_network(*args, **kwargs):
        raise AssertionError("a dry run must not call the Hub")

    monkeypatch.setattr(huggingface_hub, "create_repo", no_network)
    monkeypatch.setattr(huggingface_hub, "upload_folder", no_network)
    ckpt = demo_run / "epoch_0"
    result = run("upload", str(ckpt), "me/demo", "--dry-run", "--hf-token", SECRET)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"would upload {len(lines) - 1} files (")
    assert lines[0].endswith("to https://huggingface.co/me/demo:")
    listed = [line.strip() for line in lines[1:]]
    assert listed == files_to_upload(ckpt)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "merged/config.json",
            "merged/model.safetensors", "merged/tokenizer.json", "trainer_state.json"} <= set(listed)
    assert "training_state.pt" not in listed and (ckpt / "training_state.pt").is_file()
    assert SECRET not in result.output


def test_upload_leaves_out_the_sharded_resume_state(tmp_path):
    """An FSDP2 checkpoint's DCP resume state stays home; the export goes."""
    (tmp_path / "distributed_checkpoint").mkdir()
    (tmp_path / "distributed_checkpoint" / "__0_0.distcp").write_bytes(b"x")
    (tmp_path / "distributed_checkpoint" / ".metadata").write_bytes(b"x")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert files_to_upload(tmp_path) == ["model.safetensors"]


def test_upload_passes_privacy_token_and_ignores(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    calls = {}
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.update(create=(repo_id, kw)))

    class Commit:
        commit_url = "https://huggingface.co/me/x/commit/abc"

    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.update(upload=kw) or Commit())
    result = run("upload", str(tmp_path), "me/x", "--private", "--hf-token", SECRET)
    assert result.exit_code == 0, result.output
    assert calls["create"] == ("me/x", {"private": True, "token": SECRET, "exist_ok": True, "repo_type": "model"})
    assert calls["upload"]["ignore_patterns"] == list(hub.DEFAULT_UPLOAD_IGNORE)
    assert calls["upload"]["allow_patterns"] == ["config.json"]
    assert calls["upload"]["token"] == SECRET
    assert result.stdout.strip() == "uploaded 1 files: https://huggingface.co/me/x/commit/abc"


def test_upload_without_network_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = run("upload", str(tmp_path), "me/x", "--hf-token", SECRET)
    assert result.exit_code == 2 and result.stderr.startswith("error: me/x: ")
    assert result.stderr.count("\n") == 1 and SECRET not in result.output


# --- the export, as vLLM's and transformers' loaders read it ------------------------------

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def check_hf_folder(folder: Path) -> None:
    """What vLLM's loader assumes of a model folder: config.json names an architecture it
    knows and a dtype; the weights are model.safetensors, or exactly the shards that
    model.safetensors.index.json lists, holding exactly the keys it lists; no adapter
    files beside them (a loader would take the folder for an adapter); no other weights."""
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[config["model_type"]]]
    assert config["torch_dtype"] in ("bfloat16", "float32", "float16")
    assert not (folder / "adapter_config.json").exists() and not (folder / "adapter_model.safetensors").exists()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pth"))
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        assert shards == ["model.safetensors"]
        return
    weight_map = json.loads(index.read_text())["weight_map"]
    assert sorted(set(weight_map.values())) == shards
    stored = {}
    for shard in shards:
        with safe_open(folder / shard, "pt") as f:
            stored.update({key: shard for key in f.keys()})
    assert stored == weight_map


def check_peft_folder(folder: Path, targets: set[str]) -> None:
    """A LoRA adapter as PEFT and vLLM's LoRA loader read it."""
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert set(config["target_modules"]) == targets and config["r"] >= 1 and config["lora_alpha"] > 0
    assert Path(config["base_model_name_or_path"]).is_dir()
    # No model weights or config.json beside the adapter: transformers would take the
    # folder for a model with an embedded adapter and apply the adapter over those weights.
    assert not (folder / "config.json").exists()
    assert sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth")) == [
        "adapter_model.safetensors"]
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)


def test_a_demo_run_exports_loader_friendly_folders(demo_run):
    ckpt = demo_run / "epoch_0"
    check_hf_folder(ckpt / "merged")
    check_peft_folder(ckpt, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


def test_a_sharded_export_has_a_consistent_index(tmp_path, demo_run):
    import fastune

    model = fastune.from_pretrained(demo_run / "epoch_0")
    save_hf_checkpoint(model, model.config, tmp_path / "sharded", source_dir=demo_run / "epoch_0",
                       max_shard_size="400KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    check_hf_folder(tmp_path / "sharded")
