"""The training config: loading, overrides, defaults, validation errors, instantiate, saving."""

import os
import textwrap

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from fastune.config import (
    instantiate, load_config, locate, read_config_text, save_resolved_config, shipped_config_names,
)
from fastune.errors import ConfigError, FastuneError

BASE = """\
output_dir: out
model:
  checkpoint_dir: ckpt
dataset:
  source: json
  data_files: data/train.jsonl
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder with a checkpoint dir, a data file and config.yaml = BASE; the cwd."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "config.yaml").write_text(BASE)
    return tmp_path


def load(overrides=(), text=None, **kwargs):
    if text is not None:
        with open("config.yaml", "w") as f:
            f.write(textwrap.dedent(text))
    return load_config("config.yaml", list(overrides), **kwargs)


# --- shipped configs -------------------------------------------------------------------


def test_shipped_configs_include_demo_and_llama32():
    names = shipped_config_names()
    assert "demo" in names and "llama3_2/1B_lora" in names


@pytest.mark.parametrize("name", shipped_config_names())
def test_every_shipped_config_validates_without_weights(name):
    cfg = load_config(name, check_paths=False)
    assert cfg.output_dir and cfg.model.checkpoint_dir


@pytest.mark.parametrize("spelling", ["llama3_2/1B_lora", "llama3_2/1B_lora.yaml"])
def test_shipped_name_with_or_without_yaml(spelling):
    path, text = read_config_text(spelling)
    assert path.endswith(os.path.join("llama3_2", "1B_lora.yaml"))
    assert "method: lora" in text


def test_a_local_file_wins_over_a_shipped_name(workdir):
    (workdir / "demo").write_text(BASE)
    path, text = read_config_text("demo")
    assert path == "demo" and text == BASE


def test_asset_interpolation_points_into_the_package():
    cfg = load_config("demo", check_paths=False)
    assert cfg.model.checkpoint_dir.endswith(os.path.join("fastune", "assets", "demo", "base_model"))


# --- defaults, overrides, aliases -------------------------------------------------------


def test_defaults_are_filled_and_interpolated(workdir):
    cfg = load()
    assert cfg.method == "lora" and cfg.seed == 0 and cfg.model.dtype == "bf16"
    assert list(cfg.model.kernels) == ["rms_norm", "rope", "swiglu", "lora", "loss"]
    assert "use_kernels" not in cfg.model  # the old alias is resolved into model.kernels
    assert cfg.tokenizer == "ckpt"  # defaults to the checkpoint
    assert cfg.optimizer._component_ == "torch.optim.AdamW"
    assert cfg.metric_logger == {"_component_": "fastune.training.loggers.DiskLogger", "log_dir": "out/logs"}
    assert cfg.distributed.reduce_dtype == "fp32"


@pytest.mark.parametrize("overrides, kernels", [
    (["model.kernels=all"], ["rms_norm", "rope", "swiglu", "lora", "loss"]),
    (["model.kernels=none"], []),
    (["model.kernels=[loss, rope]"], ["rope", "loss"]),  # put in one order
    (["model.use_kernels=true"], ["rms_norm", "rope", "swiglu", "lora", "loss"]),  # the old alias
    (["model.use_kernels=false"], []),
])
def test_kernels_key_and_its_old_alias(workdir, overrides, kernels):
    cfg = load(overrides)
    assert list(cfg.model.kernels) == kernels and "use_kernels" not in cfg.model


def test_config_is_struct_mode(workdir):
    cfg = load()
    with pytest.raises(ConfigAttributeError):
        cfg.optimzer  # a typo in the recipe fails loudly instead of reading None


def test_overrides_nested_list_null_and_yaml_scalars(workdir):
    cfg = load(["optimizer.lr=1e-4", "lora.targets=[q, v, down]", "max_steps_per_epoch=null",
                "compile=false", "optimizer.betas=[0.9,0.95]", "seed=7"])
    assert cfg.optimizer.lr == 1e-4 and isinstance(cfg.optimizer.lr, float)
    assert list(cfg.lora.targets) == ["q_proj", "v_proj", "down_proj"]  # torchtune short names
    assert cfg.max_steps_per_epoch is None and cfg.compile is False and cfg.seed == 7
    assert list(cfg.optimizer.betas) == [0.9, 0.95]


def test_ints_become_floats_and_aliases_normalize(workdir):
    cfg = load(["optimizer.lr=1", "model.dtype=bfloat16", "activation_checkpointing=selective"])
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.dtype == "bf16" and cfg.activation_checkpointing == "selective"


def test_delete_override_restores_the_default(workdir):
    cfg = load(["~seed"], text=BASE + "seed: 5\n")
    assert cfg.seed == 0


def test_interpolation_in_file_and_override(workdir):
    cfg = load(["metric_logger.log_dir=${output_dir}/metrics"], text=BASE + "tokenizer: ${model.checkpoint_dir}\n")
    assert cfg.metric_logger.log_dir == "out/metrics" and cfg.tokenizer == "ckpt"
    cfg = load(["output_dir=${oc.env:FASTUNE_TEST_OUT,fallback}/run"])
    assert cfg.output_dir == "fallback/run" and cfg.metric_logger.log_dir == "fallback/run/logs"


def test_overrides_apply_in_order(workdir):
    assert load(["epochs=2", "epochs=3"]).epochs == 3


def test_logger_short_names_then_kwargs(workdir):
    cfg = load(["metric_logger=wandb", "metric_logger.project=p", "metric_logger.log_checkpoints=true"])
    assert cfg.metric_logger == {"_component_": "fastune.training.loggers.WandBLogger",
                                 "project": "p", "log_checkpoints": True}
    assert load(["metric_logger=stdout"]).metric_logger._component_.endswith("StdoutLogger")
    assert load(["metric_logger=jsonl"]).metric_logger.log_dir == "out/logs"
    assert load(["metric_logger=tensorboard"]).metric_logger.log_dir == "out/tensorboard"


def test_short_name_in_the_file(workdir):
    cfg = load(text=BASE + "metric_logger: stdout\n")
    assert cfg.metric_logger == {"_component_": "fastune.training.loggers.StdoutLogger"}


def test_another_component_does_not_inherit_the_default_components_keys(workdir):
    cfg = load(["optimizer=sgd", "optimizer.lr=0.1", "optimizer.momentum=0.9"])
    assert cfg.optimizer == {"_component_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9}
    cfg = load(["optimizer._component_=torch.optim.Adam"])
    assert "fused" not in cfg.optimizer and "weight_decay" not in cfg.optimizer


def test_dataset_builder_component_takes_its_own_kwargs(workdir, monkeypatch):
    (workdir / "my_data.py").write_text("def build(tokenizer, path, limit=10):\n    return [path] * limit\n")
    monkeypatch.syspath_prepend(str(workdir))  # a component must be importable (PYTHONPATH)
    cfg = load(["dataset._component_=my_data.build", "dataset.path=x", "~dataset.source", "~dataset.data_files"])
    assert cfg.dataset == {"_component_": "my_data.build", "path": "x"}
    assert instantiate(cfg.dataset, tokenizer=None, limit=2) == ["x", "x"]


def test_check_paths_false_skips_file_checks(workdir):
    cfg = load(["model.checkpoint_dir=missing", "dataset.data_files=nope.jsonl"], check_paths=False)
    assert cfg.model.checkpoint_dir == "missing"


def test_expanduser_in_paths(workdir, monkeypatch):
    monkeypatch.setenv("HOME", str(workdir))
    assert load(["model.checkpoint_dir=~/ckpt"]).model.checkpoint_dir == str(workdir / "ckpt")


# --- bad input: one line naming the file or override, and the key -----------------------


BAD_OVERRIDES = [
    (["model.chekpoint_dir=ckpt"], ["override 'model.chekpoint_dir=ckpt'", "unknown key 'model.chekpoint_dir'",
                                    "did you mean 'model.checkpoint_dir'"]),
    (["lr=1e-4"], ["unknown key 'lr'", "did you mean 'optimizer.lr'"]),
    (["lora_rank=4"], ["did you mean 'lora.rank'"]),
    (["enable_activation_checkpointing=true"], ["did you mean 'activation_checkpointing'"]),
    (["optimiser.lr=1"], ["override 'optimiser.lr=1'", "unknown key 'optimiser'", "did you mean 'optimizer'"]),
    (["batch_size=four"], ["batch_size: expected an integer, got 'four' (str)"]),
    (["batch_size=true"], ["batch_size: expected an integer, got True (bool)"]),
    (["optimizer.lr=fast"], ["optimizer.lr: expected a number, got 'fast' (str)"]),
    (["epochs=0"], ["epochs: must be >= 1, got 0"]),
    (["dataset.val_fraction=1.5"], ["dataset.val_fraction: must be < 1, got 1.5"]),
    (["method=lorra"], ["method: expected one of 'full', 'lora', 'dora', 'qlora', got 'lorra'", "did you mean 'lora'"]),
    (["lora.targets=q_proj"], ["lora.targets: expected a list", "write a list as [a, b]"]),
    (["lora.targets=[q_proj, qq_proj]"], ["lora.targets", "got 'qq_proj'", "did you mean 'q_proj'"]),
    (["lora.targets=[]"], ["lora.targets: method lora needs at least one target"]),
    (["model=big"], ["model: expected a section of keys, got 'big' (str)"]),
    (["model.kernels=[rope, swiglue]"], ["model.kernels", "got 'swiglue'", "did you mean 'swiglu'"]),
    (["model.kernels=al"], ["model.kernels", "got 'al'", "did you mean 'all'"]),
    (["model.kernels=none", "model.use_kernels=true"], ["model.use_kernels", "not both"]),
    (["model.use_kernels=maybe"], ["model.use_kernels: expected null or true or false"]),
    (["model._component_=x.y"], ["model takes no _component_"]),
    (["model.checkpoint_dir=nowhere"], ["model.checkpoint_dir: no such directory: nowhere"]),
    (["model.checkpoint_dir=data/train.jsonl"], ["not a directory: data/train.jsonl"]),
    (["tokenizer=tok.model"], ["tokenizer: no such file or directory: tok.model"]),
    (["dataset.data_files=data/valid.jsonl"], ["dataset.data_files: no such file or directory: data/valid.jsonl"]),
    (["dataset.data_files={train: [data/train.jsonl, data/more.jsonl]}"], ["data/more.jsonl"]),
    (["dataset.data_files=data/*.csv"], ["dataset.data_files: no file matches data/*.csv"]),
    (["~dataset.data_files"], ["dataset.data_files: source 'json' reads local files"]),
    (["dataset.source=./local.jsonl"], ["dataset.source: no such file or directory: ./local.jsonl"]),
    (["dataset.val_split=validation", "dataset.val_fraction=0.1"], ["not both"]),
    (["resume_from_checkpoint=out/step_9"], ["resume_from_checkpoint: no such directory: out/step_9"]),
    (["optimizer._component_=torch.optim.AdamWW"], ["optimizer._component_: cannot import 'torch.optim.AdamWW'",
                                                    "did you mean 'AdamW'"]),
    (["metric_logger._component_=fastune.nowhere.Logger"], ["metric_logger._component_",
                                                            "cannot import 'fastune.nowhere.Logger'"]),
    (["metric_logger._component_=not a path"], ["is not a dotted Python path"]),
    (["optimizer._component_=torch.optim"], ["'torch.optim' is not callable"]),
    (["optimizer.betaz=[0.9, 0.9]"], ["optimizer.betaz: not a parameter of torch.optim.AdamW", "did you mean 'betas'"]),
    (["metric_logger=wandbb"], ["unknown short name 'wandbb'", "did you mean 'wandb'"]),
    (["metric_logger.log_dir=${output_dri}/logs"], ["metric_logger.log_dir", "output_dri"]),
    (["~output_dir"], ["override '~output_dir'", "missing required key 'output_dir'"]),
    (["~nothing"], ["override '~nothing': nothing to delete"]),
    (["seed"], ["override 'seed': expected KEY=VALUE"]),
    (["lora.targets=[q_proj"], ["override 'lora.targets=[q_proj': cannot parse the value"]),
    (["output_dir.x=1"], ["'output_dir' is not a section"]),
    (["seed.x=1"], ["seed: expected an integer, got {'x': 1} (dict)"]),
]


@pytest.mark.parametrize("overrides, fragments", BAD_OVERRIDES, ids=[o[0] for o, _ in BAD_OVERRIDES])
def test_bad_override_gives_one_clear_line(workdir, overrides, fragments):
    with pytest.raises(ConfigError) as info:
        load(overrides)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


BAD_FILES = [
    (BASE + "seed: 1\nseed: 2\n", "config.yaml:8:1: invalid YAML: found duplicate key seed"),
    ("- a\n- b\n", "config.yaml: expected a mapping of keys at the top level"),
    (BASE + "model:\n  dtype: bf16\n", "config.yaml:7:1: invalid YAML: found duplicate key model"),
    (BASE.replace("checkpoint_dir", "chekpoint_dir"),
     "config.yaml:3: unknown key 'model.chekpoint_dir' (did you mean 'model.checkpoint_dir'?)"),
    (BASE + "batch_size: four\n", "config.yaml:7: batch_size: expected an integer, got 'four' (str)"),
    (BASE + "optimizer:\n  lr: 1e-4\n  weight_decay: lots\n",
     "config.yaml:9: optimizer.weight_decay: expected a number, got 'lots' (str)"),
    (BASE.replace("model:\n  checkpoint_dir: ckpt\n", ""),
     "config.yaml: missing required key 'model.checkpoint_dir'"),
    ("", "config.yaml: missing required key 'output_dir'"),
    ("1: one\n" + BASE, "config.yaml: top level: key 1 is not a name"),
]


@pytest.mark.parametrize("text, expected", BAD_FILES)
def test_bad_file_names_file_line_and_key(workdir, text, expected):
    with pytest.raises(ConfigError) as info:
        load(text=text)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(expected)


def test_malformed_yaml_names_the_lines(workdir):
    # The parser notices the unclosed [ of line 3 on line 4; the message gives both.
    with pytest.raises(ConfigError, match=r"^config\.yaml:4:\d+: invalid YAML: .* starts at line 3\)$"):
        load(text="output_dir: out\nmodel:\n  checkpoint_dir: [ckpt\nseed: 1\n")


def test_not_utf8(workdir):
    (workdir / "config.yaml").write_bytes(b"output_dir: \xff\n")
    with pytest.raises(ConfigError, match="config.yaml: not UTF-8"):
        load()


def test_missing_config_file_and_near_shipped_name(workdir):
    with pytest.raises(ConfigError, match="no such config file or shipped config: nope.yaml"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="did you mean 'llama3_2/1B_lora'"):
        load_config("llama3_2/1B_lor")
    with pytest.raises(ConfigError, match="data: is a directory"):
        load_config("data")


def test_errors_are_fastune_errors():
    assert issubclass(ConfigError, FastuneError)
    from fastune.models.config import ConfigError as ModelConfigError
    assert ModelConfigError is ConfigError  # config.json problems print the same way


# --- components ------------------------------------------------------------------------


def test_instantiate_optimizer_with_args_and_kwargs(workdir):
    cfg = load(["optimizer.lr=0.5", "optimizer.weight_decay=0.1"])
    param = torch.nn.Parameter(torch.zeros(2))
    opt = instantiate(cfg.optimizer, [param], weight_decay=0.2)  # kwargs win over the config
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["weight_decay"] == 0.2


def test_instantiate_without_component(workdir):
    with pytest.raises(ConfigError, match="nothing to instantiate"):
        instantiate(load().lora)


def test_locate_nested_attribute_and_broken_dependency(workdir, monkeypatch):
    assert locate("torch.optim.lr_scheduler.LambdaLR") is torch.optim.lr_scheduler.LambdaLR
    (workdir / "broken_mod.py").write_text("import not_installed_pkg_xyz\nclass B: pass\n")
    monkeypatch.syspath_prepend(str(workdir))
    with pytest.raises(ImportError, match="importing broken_mod.B failed: No module named 'not_installed_pkg_xyz'"):
        locate("broken_mod.B")


# --- saving ------------------------------------------------------------------------------


def test_save_resolved_config_round_trips_and_never_overwrites(workdir):
    cfg = load(["optimizer.lr=3e-4"])
    path = save_resolved_config(cfg, "out")
    assert path.resolve() == workdir / "out" / "config.yaml"
    again = load_config(str(path))
    assert again == cfg
    assert save_resolved_config(again, "out") == path  # same content: nothing new
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["config.yaml"]
    save_resolved_config(load(["optimizer.lr=1e-4"]), "out")
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["config.1.yaml", "config.yaml"]
    assert OmegaConf.load(workdir / "out" / "config.1.yaml").optimizer.lr == 3e-4
    assert OmegaConf.load(workdir / "out" / "config.yaml").optimizer.lr == 1e-4


def test_saved_config_leaves_out_credentials_from_the_environment(workdir, monkeypatch):
    token = "hf_" + "Zy9Xw8Vu7T" * 4
    monkeypatch.setenv("MY_WANDB_KEY", "secret-value-123")
    cfg = load(["metric_logger=wandb", "metric_logger.api_key=${oc.env:MY_WANDB_KEY}",
                f"metric_logger.notes={token}"])
    text = save_resolved_config(cfg, "out").read_text()
    assert "secret-value-123" not in text and token not in text and "api_key" not in text
    assert "metric_logger" in text and "WandBLogger" in text


def test_short_name_keeps_the_arguments_the_new_component_takes(workdir, caplog):
    """optimizer=adam swaps the class, not the learning rate; a key the new component
    does not take is dropped with a warning, never passed on to fail later."""
    cfg = load(["optimizer.lr=3e-4", "optimizer.fused=false", "optimizer=sgd"])
    assert OmegaConf.to_container(cfg.optimizer) == {"_component_": "torch.optim.SGD", "lr": 3e-4,
                                                     "fused": False}
    with caplog.at_level("WARNING"):
        cfg = load(["optimizer.lr=1e-3", "optimizer.amsgrad=true", "optimizer=sgd"])
    assert "amsgrad" not in cfg.optimizer and cfg.optimizer.lr == 1e-3
    assert "dropped amsgrad, which torch.optim.SGD does not take" in caplog.text


def test_a_registered_dataset_format_is_a_format_choice(workdir):
    """The schema reads the format registry: one register_format call adds a choice."""
    from train_helpers import DEMO_TOKENIZER

    from fastune.data import load_tokenizer, tokenize_rows
    from fastune.data.formats import FORMATS, DatasetFormat, register_format

    with pytest.raises(ConfigError, match=r"dataset.format: expected one of .*'instruct'.*got 'qa'"):
        load(["dataset.format=qa"])

    def qa(row, columns):
        return [{"role": "user", "content": row[columns["question"]]},
                {"role": "assistant", "content": row[columns["answer"]]}]

    register_format(DatasetFormat("qa", ("question", "answer"), qa))
    try:
        assert load(["dataset.format=qa"]).dataset.format == "qa"
        with pytest.raises(ValueError, match="already registered"):
            register_format(DatasetFormat("qa", ("question",), qa))
        tok = load_tokenizer(DEMO_TOKENIZER)
        ds = tokenize_rows([{"question": "2+2?", "answer": "4"}], tok, format="qa")
        assert tok.decode(ds[0]["tokens"].tolist()).rstrip().endswith("4")
    finally:
        del FORMATS["qa"]
