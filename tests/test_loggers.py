"""Metric loggers: JSONL on disk, stdout, TensorBoard's missing-package error, and W&B
offline, checked by reading the run's .wandb record file back."""

import json
import struct
import time

import pytest
import torch
from omegaconf import OmegaConf

from fastune.config import load_config
from fastune.config.secrets import redact_secrets
from fastune.errors import ConfigError, FastuneError
from fastune.training.loggers import (
    DiskLogger, MetricLogger, StdoutLogger, TensorBoardLogger, build_metric_logger,
)

HF_TOKEN = "hf_" + "a1B2c3D4e5" * 4


@pytest.fixture
def cfg_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "config.yaml").write_text(
        "output_dir: out\nmodel:\n  checkpoint_dir: ckpt\ndataset:\n  source: org/data\n")
    return tmp_path


def _build(cfg):
    return build_metric_logger(cfg.metric_logger, cfg)


def test_disk_logger_writes_one_json_object_per_call(tmp_path):
    with DiskLogger(tmp_path / "logs") as logger:
        logger.log_dict({"loss": torch.tensor(2.5), "lr": 1e-4}, step=1)
        logger.log("grad_norm", 0.75, step=2)
    with DiskLogger(tmp_path / "logs") as logger:  # a resumed run appends
        logger.log_dict({"loss": 2.0}, step=3)
    lines = (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 2.5, "lr": 1e-4}, {"step": 2, "grad_norm": 0.75}, {"step": 3, "loss": 2.0}]


def test_stdout_logger(capsys):
    StdoutLogger().log_dict({"loss": 1.23456, "tokens": 512}, step=4)
    assert capsys.readouterr().out == "step 4 | loss=1.235 tokens=512\n"


def test_build_metric_logger_default_is_jsonl_in_output_dir(cfg_dir):
    with _build(load_config("config.yaml")) as logger:
        assert isinstance(logger, DiskLogger)
        logger.log_dict({"loss": 1.0}, step=1)
    assert json.loads((cfg_dir / "out" / "logs" / "metrics.jsonl").read_text()) == {"step": 1, "loss": 1.0}


def test_only_rank_zero_logs(cfg_dir, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    logger = _build(load_config("config.yaml"))
    assert type(logger) is MetricLogger
    logger.log_dict({"loss": 1.0}, step=1)
    logger.close()
    assert not (cfg_dir / "out").exists()


def test_redact_secrets():
    config = {"hf_token": "x", "tokenizer": "/ckpt", "keep_last_n": 2, "wandbApiKey": "k", "max_new_tokens": 8,
              "nested": {"api-key": "k", "password": "p", "client_secret": "s", "name": "run", "note": HF_TOKEN},
              "tags": ["a", HF_TOKEN]}
    assert redact_secrets(config) == {"tokenizer": "/ckpt", "keep_last_n": 2, "max_new_tokens": 8, "nested": {"name": "run"},
                                      "tags": ["a"]}


def test_tensorboard_without_the_package_is_one_clear_error(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(FastuneError, match=r"pip install 'fastune\[tensorboard\]'"):
            TensorBoardLogger(tmp_path)
    else:
        pytest.skip("tensorboard is installed here")


# --- W&B, offline ---------------------------------------------------------------------------


def read_wandb_records(run_dir):
    """The protobuf records of an offline run's ``run-*.wandb`` file.

    The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version),
    then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length,
    type: 1 full, 2 first, 3 middle, 4 last); a block's tail shorter than a
    header is padding.
    """
    from wandb.proto import wandb_internal_pb2

    paths = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(paths) <= 1
    data = paths[0].read_bytes() if paths else b""  # wandb-core may not have created it yet
    assert data[:4] in (b":W&B", data[:0])
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            return
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def records_of(run_dir, kind):
    return [getattr(r, kind) for r in read_wandb_records(run_dir) if r.WhichOneof("record_type") == kind]


def wait_for_exit_record(run_dir, timeout=60.0):
    """wandb-core writes the .wandb file in the background: finish() can return
    before the records reach the disk. The exit record is written last."""
    deadline = time.monotonic() + timeout
    while not records_of(run_dir, "exit"):
        assert time.monotonic() < deadline, "wandb never wrote the exit record (finish not called?)"
        time.sleep(0.2)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    # wandb reads its environment once per process and caches it; tearing it down
    # makes this test's WANDB_DIR count, whatever ran before.
    wandb.teardown()
    yield tmp_path
    wandb.teardown()


def test_wandb_logs_config_metrics_checkpoint_and_finishes(cfg_dir, wandb_offline):
    cfg = load_config("config.yaml", ["metric_logger=wandb", "metric_logger.project=fastune-test",
                                      "metric_logger.group=g", "metric_logger.log_checkpoints=true"])
    ckpt = cfg_dir / "out" / "step_2"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_config.json").write_text("{}")
    with_secret = OmegaConf.to_container(cfg)
    with_secret["metric_logger"]["hf_token"] = HF_TOKEN
    with build_metric_logger(cfg.metric_logger, cfg) as logger:
        logger.log_config(with_secret)
        logger.log_dict({"loss": torch.tensor(1.5), "lr": 2e-4}, step=1)
        logger.log_dict({"loss": 1.25}, step=2)
        logger.log_checkpoint(ckpt, {"seed": 0, "epochs_run": 0, "total_epochs": 1,
                                     "max_steps_per_epoch": None, "global_step": 2})

    wait_for_exit_record(wandb_offline)
    (run,) = records_of(wandb_offline, "run")
    assert run.project == "fastune-test" and run.run_group == "g"
    config = {}
    for record in [run.config, *records_of(wandb_offline, "config")]:
        config.update({item.key: json.loads(item.value_json) for item in record.update})
    assert config["optimizer"]["lr"] == 2e-4 and config["method"] == "lora"
    assert config["metric_logger"]["project"] == "fastune-test"
    assert "hf_token" not in config["metric_logger"]
    assert HF_TOKEN not in b"".join(r.SerializeToString() for r in read_wandb_records(wandb_offline)).decode(
        "utf-8", "replace")

    history = [{"".join(i.nested_key or [i.key]): json.loads(i.value_json) for i in h.item}
               for h in records_of(wandb_offline, "history")]
    assert [(h["_step"], h["loss"]) for h in history] == [(1, 1.5), (2, 1.25)]
    summary = {}
    for s in records_of(wandb_offline, "summary"):
        summary.update({"".join(i.nested_key or [i.key]): json.loads(i.value_json) for i in s.update})
    assert summary["loss"] == 1.25

    files = [f.path for r in records_of(wandb_offline, "files") for f in r.files]
    assert "fastune_config.yaml" in files
    (artifact,) = records_of(wandb_offline, "artifact")
    assert artifact.type == "model" and "step_2" in artifact.aliases
    assert json.loads(artifact.metadata) == {"seed": 0, "epochs_run": 0, "total_epochs": 1,
                                             "max_steps_per_epoch": None, "global_step": 2}
    (exit_record,) = records_of(wandb_offline, "exit")
    assert exit_record.exit_code == 0


def checkpoint_folders(root):
    """A LoRA checkpoint (adapter at the top, merged/, resume state, sharded state) and
    a full one, as a run writes them."""
    lora, full = root / "lora" / "epoch_0", root / "full" / "step_2"
    for folder, model_files in ((lora, ("adapter_config.json", "adapter_model.safetensors", "merged/config.json",
                                        "merged/model.safetensors", "merged/tokenizer.json")),
                                (full, ("config.json", "model.safetensors"))):
        for name in (*model_files, "tokenizer.json", "trainer_state.json", "training_state.pt",
                     "distributed_checkpoint/__0_0.distcp", "distributed_checkpoint/.metadata"):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(name)
    return lora, full


def test_checkpoint_artifacts_hold_the_adapter_of_lora_runs_and_resume_state_when_asked(tmp_path):
    from fastune.training.loggers import artifact_files

    lora, full = checkpoint_folders(tmp_path)
    resume = ["distributed_checkpoint/.metadata", "distributed_checkpoint/__0_0.distcp", "training_state.pt"]
    assert artifact_files(lora) == ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                                    "trainer_state.json"]
    assert sorted(artifact_files(lora, resume_state=True)) == sorted(artifact_files(lora) + resume)
    assert artifact_files(full) == ["config.json", "model.safetensors", "tokenizer.json", "trainer_state.json"]
    assert sorted(artifact_files(full, resume_state=True)) == sorted(artifact_files(full) + resume)


@pytest.mark.parametrize("resume_state", [False, True])
def test_wandb_logs_checkpoints_by_default(cfg_dir, wandb_offline, resume_state):
    from fastune.training.loggers import artifact_files

    lora, _ = checkpoint_folders(cfg_dir)
    cfg = load_config("config.yaml", ["metric_logger=wandb", f"metric_logger.log_resume_state={resume_state}"])
    progress = {"seed": 0, "epochs_run": 1, "total_epochs": 2, "max_steps_per_epoch": None, "global_step": 4}
    with build_metric_logger(cfg.metric_logger, cfg) as logger:
        logger.log_checkpoint(lora, progress)
    wait_for_exit_record(wandb_offline)
    (artifact,) = records_of(wandb_offline, "artifact")
    assert artifact.type == "model" and set(artifact.aliases) >= {"epoch_0", "latest"}
    assert json.loads(artifact.metadata) == progress
    assert sorted(e.path for e in artifact.manifest.contents) == sorted(artifact_files(lora, resume_state))


def test_wandb_finishes_as_failed_on_an_exception(cfg_dir, wandb_offline):
    cfg = load_config("config.yaml", ["metric_logger=wandb", "metric_logger.log_checkpoints=false"])
    with pytest.raises(RuntimeError, match="boom"):
        with build_metric_logger(cfg.metric_logger, cfg) as logger:
            logger.log_dict({"loss": 3.0}, step=1)
            logger.log_checkpoint(cfg_dir, {"global_step": 1})  # log_checkpoints is off: ignored
            raise RuntimeError("boom")
    wait_for_exit_record(wandb_offline)
    (exit_record,) = records_of(wandb_offline, "exit")
    assert exit_record.exit_code == 1
    assert records_of(wandb_offline, "artifact") == []


def test_wandb_finishes_as_failed_when_the_config_cannot_be_logged(cfg_dir, wandb_offline, monkeypatch):
    from fastune.training.loggers import WandBLogger

    def broken(self, cfg):
        raise OSError("disk full")

    monkeypatch.setattr(WandBLogger, "log_config", broken)
    cfg = load_config("config.yaml", ["metric_logger=wandb"])
    with pytest.raises(OSError, match="disk full"):
        build_metric_logger(cfg.metric_logger, cfg)
    wait_for_exit_record(wandb_offline)
    (exit_record,) = records_of(wandb_offline, "exit")
    assert exit_record.exit_code == 1


def test_wandb_unknown_init_keyword(cfg_dir, wandb_offline):
    cfg = load_config("config.yaml", ["metric_logger=wandb", "metric_logger.projetc=x"])
    with pytest.raises(ConfigError, match=r"metric_logger.projetc: not a parameter of wandb.init "
                                          r"\(did you mean 'project'\?\)"):
        build_metric_logger(cfg.metric_logger, cfg)
    assert not (wandb_offline / "wandb").exists()  # checked before wandb.init
