"""The command line: help, ls, cp, validate, train's plumbing, and one-line errors."""

import json
import sys
import types

import pytest
from click.testing import CliRunner
from omegaconf import OmegaConf

from fastune.cli import main
from fastune.errors import ConfigError

CONFIG = "output_dir: out\nmodel:\n  checkpoint_dir: ckpt\ndataset:\n  source: org/data\n"
MODEL = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
         "num_hidden_layers": 2, "num_attention_heads": 2}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(MODEL))
    (tmp_path / "config.yaml").write_text(CONFIG)
    return tmp_path


def run(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_teaches_with_examples():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("train", "validate", "ls", "cp"):
        assert command in result.output
    train_help = run("train", "--help").output
    assert "fastune train llama3_2/1B_lora optimizer.lr=1e-4" in train_help
    assert "~max_steps_per_epoch" in train_help and "metric_logger=wandb" in train_help


def test_ls_lists_shipped_configs_by_model_and_method():
    result = run("ls")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "METHOD", "CONFIG"]
    rows = {line.split()[2]: line.split()[:2] for line in lines[1:]}
    assert rows["demo"] == ["demo", "lora"]
    assert rows["llama3_2/1B_lora"] == ["llama3_2", "lora"]


def test_cp_to_file_folder_and_without_extension(workdir):
    result = run("cp", "llama3_2/1B_lora", "mine.yaml")
    assert result.exit_code == 0 and "copied llama3_2/1B_lora to mine.yaml" in result.output
    assert OmegaConf.load(workdir / "mine.yaml").method == "lora"
    (workdir / "configs").mkdir()
    assert run("cp", "demo", "configs").exit_code == 0
    assert (workdir / "configs" / "demo.yaml").is_file()
    assert run("cp", "demo.yaml", "new_folder/").exit_code == 0
    assert (workdir / "new_folder" / "demo.yaml").is_file()
    assert run("cp", "demo", "noext").exit_code == 0
    assert (workdir / "noext.yaml").is_file()


def test_cp_refuses_to_overwrite_without_force(workdir):
    (workdir / "mine.yaml").write_text("keep me\n")
    assert_one_line_error(run("cp", "demo", "mine.yaml"), "mine.yaml exists; pass --force")
    assert (workdir / "mine.yaml").read_text() == "keep me\n"
    assert run("cp", "demo", "mine.yaml", "--force").exit_code == 0
    assert "keep me" not in (workdir / "mine.yaml").read_text()


def test_cp_unknown_name(workdir):
    assert_one_line_error(run("cp", "llama3_2/1B_lroa", "x.yaml"), "no shipped config named 'llama3_2/1B_lroa'",
                          "did you mean 'llama3_2/1B_lora'")


def test_validate_prints_ok_and_a_summary(workdir):
    result = run("validate", "config.yaml", "batch_size=2", "gradient_accumulation_steps=3", "lora.targets=[q,v]")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "config OK: config.yaml"
    summary = "\n".join(lines[1:])
    assert "llama, 2 layers, hidden 16, vocab 64" in summary
    assert "lora (rank 8, alpha 16, on q_proj, v_proj)" in summary
    assert "2 x 3 accumulation = 6 sequences per optimizer step" in summary
    assert "torch.optim.AdamW, lr 0.0002" in summary


def test_validate_print_config(workdir):
    result = run("validate", "config.yaml", "seed=3", "--print-config")
    assert result.exit_code == 0
    printed = OmegaConf.create(result.output.split("fastune.training.loggers.DiskLogger\n", 1)[1])
    assert printed.seed == 3 and printed.tokenizer == "ckpt"


@pytest.mark.parametrize("args, fragments", [
    (["validate", "config.yaml", "optimizer.lr=fast"],
     ["override 'optimizer.lr=fast': optimizer.lr: expected a number, got 'fast' (str)"]),
    (["validate", "nope.yaml"], ["no such config file or shipped config: nope.yaml"]),
    (["validate", "config.yaml", "model.checkpoint_dir=missing"], ["model.checkpoint_dir: no such directory: missing"]),
    (["validate", "config.yaml", "model.checkpoint_dir=."], ["config.json not found"]),  # the model's own config
    (["train", "config.yaml", "optimiser.lr=1"], ["unknown key 'optimiser'", "did you mean 'optimizer'"]),
])
def test_bad_input_is_one_line_with_exit_code_2(workdir, args, fragments):
    assert_one_line_error(run(*args), *fragments)


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_exception(workdir, where):
    args = ["validate", "config.yaml", "epochs=0"]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    result = run(*args)
    assert isinstance(result.exception, ConfigError) and "epochs: must be >= 1" in str(result.exception)


def test_train_validates_saves_the_config_and_calls_the_recipe(workdir, monkeypatch):
    calls = []
    fake = types.ModuleType("fastune.training.recipe")
    fake.train = calls.append
    monkeypatch.setitem(sys.modules, "fastune.training.recipe", fake)
    result = run("train", "config.yaml", "epochs=3")
    assert result.exit_code == 0, result.output
    (cfg,) = calls
    assert cfg.epochs == 3
    assert OmegaConf.load(workdir / "out" / "config.yaml") == cfg


def test_train_with_a_bad_config_writes_nothing(workdir, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastune.training.recipe", types.ModuleType("unused"))
    assert_one_line_error(run("train", "config.yaml", "batch_size=0"), "batch_size: must be >= 1")
    assert not (workdir / "out").exists()
