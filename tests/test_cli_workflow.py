"""torchtune's command-line habits (cat, run --config, the download hint of validate,
whole --help summaries) and `fastune plot`."""

import json
import sys
import types

import pytest
from click.testing import CliRunner

from fastune.cli import main
from fastune.config import shipped_config
from test_cli import assert_one_line_error, run, workdir  # noqa: F401 (fixture)


def test_cat_prints_a_shipped_config_and_refuses_an_unknown_one():
    result = run("cat", "llama3_2/1B_lora")
    assert result.exit_code == 0 and result.stdout == shipped_config("llama3_2/1B_lora").read_text()
    assert_one_line_error(run("cat", "llama3_2/1B_lorra"), "no shipped config named", "llama3_2/1B_lora")


@pytest.mark.parametrize("spelling", [["--config", "config.yaml"], ["--config=config.yaml"], ["config.yaml"]])
def test_run_is_train_with_torchtunes_config_option(workdir, monkeypatch, spelling):
    calls = []
    fake = types.ModuleType("fastune.training.recipe")
    fake.train = calls.append
    monkeypatch.setitem(sys.modules, "fastune.training.recipe", fake)
    result = run("run", *spelling, "epochs=3")
    assert result.exit_code == 0, result.output
    assert [cfg.epochs for cfg in calls] == [3]


def test_validate_of_a_model_not_downloaded_names_the_download_command():
    assert_one_line_error(
        run("validate", "llama3_2/1B_lora", "model.checkpoint_dir=/nonexistent/Llama-3.2-1B-Instruct"),
        "model.checkpoint_dir: no such directory: /nonexistent/Llama-3.2-1B-Instruct",
        "`fastune download REPO_ID --output-dir /nonexistent/Llama-3.2-1B-Instruct`")
    result = run("validate", "qwen2_5/7B_lora")  # its comment says which repo goes to its checkpoint_dir
    if result.exit_code == 2:  # (the model is not downloaded on a test machine)
        assert "`fastune download Qwen/Qwen2.5-7B-Instruct --output-dir /tmp/Qwen2.5-7B-Instruct`" in result.output


@pytest.mark.parametrize("group", [[], ["bench"]])
def test_help_summaries_are_whole(group):
    result = CliRunner().invoke(main, [*group, "--help"], terminal_width=80)
    assert result.exit_code == 0
    commands = result.stdout.split("Commands:")[1]
    assert "..." not in commands and "\u2026" not in commands
    if not group:
        assert "original_repo_id.json (exported adapters then name their base" in " ".join(commands.split())


def write_history(folder, records):
    (folder / "logs").mkdir(parents=True)
    (folder / "logs" / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plot_overlays_runs_and_reads_a_resumed_history(tmp_path):
    pytest.importorskip("matplotlib")
    from fastune.training.plot import read_history

    a, b = tmp_path / "a", tmp_path / "b"
    write_history(a, [{"step": 0, "val_loss": 3.0}, {"step": 1, "loss": 2.5, "lr": 1e-3, "tokens_per_second": 900.0},
                      {"step": 2, "loss": 2.0, "lr": 1e-3, "tokens_per_second": 950.0},
                      {"step": 2, "loss": 1.9, "lr": 1e-3, "tokens_per_second": 990.0},  # resumed: wins
                      ])
    (a / "logs" / "history.jsonl").open("a").write('{"step": 3, "loss"')  # killed mid-line
    write_history(b, [{"step": 1, "loss": 2.7, "lr": 5e-4, "tokens_per_second": 800.0}])
    assert read_history(a) == {"val_loss": [(0, 3.0)], "loss": [(1, 2.5), (2, 1.9)], "lr": [(1, 1e-3), (2, 1e-3)],
                               "tokens_per_second": [(1, 900.0), (2, 990.0)]}
    result = run("plot", a, b, "-o", tmp_path / "both.png")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {tmp_path / 'both.png'}\n"
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = run("plot", a)
    assert result.exit_code == 0 and (a / "logs" / "training.png").is_file()
    assert_one_line_error(run("plot", a, tmp_path), f"{tmp_path}: no logs/history.jsonl")


def test_history_logger_passes_everything_on_and_draws_at_each_checkpoint(tmp_path):
    pytest.importorskip("matplotlib")
    from fastune.training.plot import HistoryLogger
    from train_helpers import RecordingLogger

    inner = RecordingLogger()
    with HistoryLogger(inner, tmp_path) as logger:
        logger.log_dict({"loss": 2.0, "lr": 1e-3, "tokens_per_second": 10.0, "epoch": 0}, step=1)
        logger.log_checkpoint(tmp_path / "epoch_0", {"global_step": 1})
    assert inner.records == [{"step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_second": 10.0, "epoch": 0.0}]
    assert inner.checkpoints == [(tmp_path / "epoch_0", {"global_step": 1})] and inner.closed
    assert (tmp_path / "logs" / "training.png").is_file()


def test_the_progress_bar_counts_epochs_as_the_logged_epoch():
    from fastune.training.loop import epoch_label

    run = types.SimpleNamespace(epoch=0, cfg=types.SimpleNamespace(epochs=2))
    assert epoch_label(run) == "epoch 0/1"  # logged as epoch 0, saved as epoch_0
