"""`fastune train` from the command line: W&B offline records of a whole run, and bad
input reported as one line with a non-zero exit status."""

import json
import time

import pytest
import yaml
from click.testing import CliRunner

from fastune.cli import main
from test_loggers import records_of
from train_helpers import single_thread  # noqa: F401 (autouse fixture)
from train_helpers import hf_llama, make_config, save_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_base(hf_llama(seed=7), tmp_path_factory.mktemp("base"))


def config_file(tmp_path, base, **values):
    """make_config's YAML, returned as the path the CLI takes."""
    make_config(tmp_path, base, **values)
    return str(tmp_path / "cfg.yaml")


def wait_for_exit_record(run_dir, timeout=30.0):
    """wandb's service process may still be writing the .wandb file when ``finish``
    returns; its last record is the exit record."""
    deadline = time.monotonic() + timeout
    while not records_of(run_dir, "exit"):
        assert time.monotonic() < deadline, "no exit record in the .wandb file"
        time.sleep(0.2)


def test_train_with_wandb_offline_records_config_metrics_and_checkpoints(tmp_path, base, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    path = config_file(tmp_path, base, max_steps_per_epoch=2, save_every_n_steps=1)
    result = CliRunner().invoke(main, ["train", path, "metric_logger=wandb", "metric_logger.project=t",
                                       "metric_logger.log_checkpoints=true"])
    assert result.exit_code == 0, result.output
    wait_for_exit_record(tmp_path)

    config = {}
    updates = [r.config.update for r in records_of(tmp_path, "run")] + [r.update for r in records_of(tmp_path, "config")]
    for update in updates:
        config.update({item.key: json.loads(item.value_json) for item in update})
    assert config["method"] == "lora" and config["lora"]["rank"] == 4

    history = [{"".join(i.nested_key or [i.key]): json.loads(i.value_json) for i in h.item}
               for h in records_of(tmp_path, "history")]
    steps = [h for h in history if "loss" in h]
    assert [h["global_step"] for h in steps] == [1, 2]
    assert {"loss", "lr", "grad_norm", "tokens_per_second", "tokens_per_second_supervised"} <= set(steps[0])
    assert any("val_loss" in h for h in history)

    artifacts = records_of(tmp_path, "artifact")
    assert [a.type for a in artifacts] == ["model", "model"]
    assert "step_1" in artifacts[0].aliases and "epoch_0" in artifacts[1].aliases
    assert json.loads(artifacts[1].metadata)["global_step"] == 2
    (exit_record,) = records_of(tmp_path, "exit")
    assert exit_record.exit_code == 0
    assert (tmp_path / "out" / "config.yaml").is_file()


@pytest.mark.parametrize("values, message", [
    (dict(device="cuda"), "error: device: cuda asked for, but torch sees no CUDA device"),
    (dict(dataset={"source": "json", "data_files": {"train": "TRAIN"}, "val_split": "validation"}),
     "error: dataset.data_files: no file for split 'validation' (has train)"),
    (dict(model={"checkpoint_dir": "MISSING_DIR"}), "model.checkpoint_dir: no such directory"),
    (dict(resume_from_checkpoint="NOT_A_CKPT"), "no training_state.pt; it is not a fastune training checkpoint"),
])
def test_bad_input_is_one_line(tmp_path, base, values, message):
    (tmp_path / "not_a_ckpt").mkdir()
    path = config_file(tmp_path, base)
    cfg = yaml.safe_load(open(path))
    text = json.dumps({**cfg, **values}).replace("MISSING_DIR", str(tmp_path / "nowhere"))
    text = text.replace("NOT_A_CKPT", str(tmp_path / "not_a_ckpt"))
    text = text.replace("TRAIN", str(tmp_path / "train.jsonl"))
    (tmp_path / "bad.yaml").write_text(text)
    result = CliRunner().invoke(main, ["train", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    # Progress bars of `datasets` may precede it on stderr; the error itself is one line.
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
