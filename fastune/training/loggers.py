"""Metric loggers: where the training loop sends its numbers.

One small interface for all of them::

    with build_metric_logger(cfg.metric_logger, cfg) as logger:    # also logs the config
        logger.log_dict({"loss": 1.23, "lr": 2e-4}, step=global_step)
        logger.log_checkpoint(ckpt_dir, {"global_step": global_step, ...})
    # leaving the block closes the logger, also on an exception

``step`` is the global optimizer step. The recipe calls ``log_dict`` every
``log_every_n_steps`` optimizer steps (config key of that name). Values may be
Python numbers or 0-d tensors.

Pick one in the config with ``metric_logger._component_`` or a short name on the
command line: ``metric_logger=disk`` (the default: JSONL in
``${output_dir}/logs``), ``stdout``, ``wandb``, ``tensorboard``.

Logged configs never carry secrets: keys naming a token, key, secret or password,
and values that look like Hugging Face tokens, are dropped first.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import os
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from fastune.checkpoint.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    RESUME_ONLY_FILES,
    TOKENIZER_FILES,
    TRAINER_STATE,
    adapter_folder,
)
from fastune.config import instantiate
from fastune.config.schema import did_you_mean
from fastune.config.secrets import redact_arguments, redact_secrets
from fastune.errors import ConfigError, FastuneError


class MetricLogger:
    """The interface. This base class itself logs nothing: ranks other than 0 use it."""

    def log(self, name: str, value: Any, step: int) -> None:
        self.log_dict({name: value}, step)

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def log_config(self, cfg: DictConfig | Mapping[str, Any]) -> None:
        """Record the resolved config (``output_dir/config.yaml`` holds it in any case)."""

    def log_checkpoint(self, path: str | os.PathLike, metadata: Mapping[str, Any]) -> None:
        """Record a saved checkpoint folder; only W&B stores it (as an artifact)."""

    def close(self) -> None:
        pass

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def scalar(value: Any) -> Any:
    """A 0-d tensor or numpy number as a Python number; other values unchanged."""
    return value.item() if hasattr(value, "item") else value


def _loggable_config(cfg: DictConfig | Mapping) -> dict:
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    return redact_secrets(cfg)


class StdoutLogger(MetricLogger):
    """One line per ``log_dict``: ``step 10 | loss=1.234 lr=0.0002``.
    Printed through tqdm so that a progress bar stays intact."""

    def log_dict(self, metrics, step):
        from tqdm import tqdm

        fields = " ".join(f"{k}={_format(scalar(v))}" for k, v in metrics.items())
        tqdm.write(f"step {step} | {fields}")


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class DiskLogger(MetricLogger):
    """JSON lines in ``log_dir/metrics.jsonl``: one object per ``log_dict`` call,
    ``{"step": step, **metrics}``, flushed at once so a crash loses nothing.
    The file is appended to, so a resumed run continues it (steps after the last
    checkpoint then appear twice; the later line is the resumed run's)."""

    def __init__(self, log_dir: str | os.PathLike, filename: str = "metrics.jsonl"):
        self.path = Path(log_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def log_dict(self, metrics, step):
        record = {"step": step, **{k: scalar(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self):
        self._file.close()


class TensorBoardLogger(MetricLogger):
    """Scalars for TensorBoard in ``log_dir`` (needs ``pip install 'fastune[tensorboard]'``)."""

    def __init__(self, log_dir: str | os.PathLike, **writer_kwargs):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FastuneError("metric_logger: TensorBoardLogger needs the tensorboard package; "
                               "pip install 'fastune[tensorboard]', or use metric_logger=disk") from None
        self._writer = SummaryWriter(log_dir=str(log_dir), **writer_kwargs)

    def log_dict(self, metrics, step):
        for name, value in metrics.items():
            self._writer.add_scalar(name, scalar(value), global_step=step)

    def log_config(self, cfg):
        text = OmegaConf.to_yaml(OmegaConf.create(_loggable_config(cfg)))
        self._writer.add_text("config", f"```yaml\n{text}```")

    def close(self):
        self._writer.close()


class WandBLogger(MetricLogger):
    """Weights & Biases. Every keyword is passed to ``wandb.init`` (project, entity,
    group, job_type, name, tags, notes, mode, dir, ...); ``project`` defaults to
    "fastune". ``WANDB_MODE=offline`` works without an account.

    ``log_config`` puts the config in ``wandb.config`` and uploads it as
    ``fastune_config.yaml``. ``log_checkpoint`` logs each checkpoint as a "model"
    artifact (``model-<run id>``, aliased with the checkpoint's name and "latest"),
    whose metadata is the checkpoint's trainer state (torchtune's keys: seed,
    epochs_run, total_epochs, max_steps_per_epoch, and global_step). A LoRA run's
    artifact holds the adapter, the tokenizer and the trainer state, not the merged
    model; a full run's the HF model. The resume state (optimizer, RNG, loader; about
    twice the model's size) goes only with ``log_resume_state=True``, and no
    checkpoint at all with ``log_checkpoints=False``. ``close`` calls ``finish``
    (exit code 1 when leaving a ``with`` block on an exception, which marks the run
    as failed).
    """

    def __init__(self, log_checkpoints: bool = True, log_resume_state: bool = False, **init_kwargs):
        import wandb

        accepted = inspect.signature(wandb.init).parameters
        for name in init_kwargs:
            if name not in accepted:
                raise ConfigError(f"metric_logger.{name}: not a parameter of wandb.init"
                                  f"{did_you_mean(name, accepted)}")
        init_kwargs.setdefault("project", "fastune")
        self._wandb = wandb
        # notes, tags, name, config...: W&B stores them all, so no secret may reach them.
        self._run = wandb.init(**redact_arguments(init_kwargs))
        self.log_checkpoints = log_checkpoints
        self.log_resume_state = log_resume_state
        self._closed = False

    def log_dict(self, metrics, step):
        self._run.log({k: scalar(v) for k, v in metrics.items()}, step=step)

    def log_config(self, cfg):
        config = _loggable_config(cfg)
        self._run.config.update(config, allow_val_change=True)
        path = Path(self._run.dir) / "fastune_config.yaml"
        path.write_text(OmegaConf.to_yaml(OmegaConf.create(config)), encoding="utf-8")
        self._run.save(str(path), base_path=self._run.dir, policy="now")

    def log_checkpoint(self, path, metadata):
        if not self.log_checkpoints:
            return
        artifact = self._wandb.Artifact(f"model-{self._run.id}", type="model",
                                        metadata={k: scalar(v) for k, v in metadata.items()})
        for file in artifact_files(Path(path), self.log_resume_state):
            artifact.add_file(str(Path(path) / file), name=file)
        self._run.log_artifact(artifact, aliases=[Path(path).name, "latest"])

    def close(self, exit_code: int = 0):
        if not self._closed:
            self._closed = True
            self._run.finish(exit_code=exit_code)

    def __exit__(self, exc_type, exc, tb):
        self.close(exit_code=0 if exc_type is None else 1)


def artifact_files(ckpt: Path, resume_state: bool = False) -> list[str]:
    """The files of checkpoint ``ckpt`` (relative posix paths) that a model artifact
    holds: for a LoRA checkpoint the adapter, tokenizer and trainer state (not the
    merged model); otherwise every file but the resume state, which ``resume_state``
    adds."""
    files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    adapter = adapter_folder(ckpt)
    if adapter is None:
        return [f for f in files if resume_state or not _is_resume_state(f)]
    where = adapter.relative_to(ckpt)  # "." (or "adapter" in the earlier layout)
    published = {TRAINER_STATE, *TOKENIZER_FILES, (where / ADAPTER_CONFIG).as_posix(),
                 (where / ADAPTER_WEIGHTS).as_posix()}
    return [f for f in files if f in published or (resume_state and _is_resume_state(f))]


def _is_resume_state(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in RESUME_ONLY_FILES)


def check_wandb_login(mode: str | None = None) -> None:
    """A one-line error, before any model or data is loaded, when W&B would need a login
    that is not there (``wandb.init`` would fail later with a long UsageError)."""
    mode = mode or os.environ.get("WANDB_MODE")
    if mode in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true"):
        return
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise FastuneError("metric_logger: W&B is not logged in here; run `wandb login`, "
                       "or set WANDB_MODE=offline (or metric_logger.mode=offline) to log locally")


def check_metric_logger(logger: Mapping[str, Any]) -> None:
    """What the logger of the config's ``metric_logger`` section needs that can be
    checked before heavy work: the W&B login."""
    if int(os.environ.get("RANK", "0")) == 0 and str(logger.get("_component_", "")).endswith(".WandBLogger"):
        check_wandb_login(logger.get("mode"))


def build_metric_logger(section: Mapping[str, Any], run_config: Mapping[str, Any]) -> MetricLogger:
    """The logger named by the config's ``metric_logger`` section, with ``run_config``
    (the whole run's settings, as values to record) already logged.

    Under torchrun only rank 0 (env ``RANK``) logs; other ranks get the base
    ``MetricLogger``, which drops everything.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return MetricLogger()
    logger = instantiate(section)
    try:
        logger.log_config(run_config)
    except BaseException as e:
        logger.__exit__(type(e), e, e.__traceback__)  # a W&B run then ends as failed
        raise
    return logger
