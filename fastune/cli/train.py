"""``fastune train``, ``validate``, ``ls`` and ``cp``: run a config, check it, list and copy the shipped ones."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import click

from fastune.cli.group import CONFIG_HELP, DEBUG, debug_option
from fastune.errors import FastuneError


@click.command(epilog=CONFIG_HELP)
@click.argument("config")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE | ~KEY]...")
@click.option("--nproc-per-node", type=int, default=None,
              help="Train on this many processes per node with FSDP2 (one per GPU), through torchrun.")
@click.option("--nnodes", type=int, default=1, show_default=True, help="Number of nodes (multi-node).")
@click.option("--node-rank", type=int, default=None, help="This node's rank, 0 to NNODES-1 (multi-node).")
@click.option("--rdzv-endpoint", default=None, metavar="HOST:PORT",
              help="c10d rendezvous on one node, the same on every node (multi-node).")
@debug_option
@click.pass_context
def train(ctx: click.Context, config: str, overrides: tuple[str, ...], nproc_per_node: Optional[int],
          nnodes: int, node_rank: Optional[int], rdzv_endpoint: Optional[str]) -> None:
    """Fine-tune a model as CONFIG says.

    The config is validated before any heavy work, and the resolved config is
    saved as OUTPUT_DIR/config.yaml. With --nproc-per-node the run is launched
    through torch.distributed.run (torchrun) and sharded with FSDP2; the same
    works as `torchrun --nproc-per-node N -m fastune.cli train CONFIG`.

    \b
    Examples:
      fastune train demo
      fastune train llama3_2/1B_lora optimizer.lr=1e-4 epochs=2
      fastune train my_config.yaml metric_logger=wandb metric_logger.project=alpaca
      fastune train out/config.yaml resume_from_checkpoint=auto
      fastune train llama3_2/1B_lora --nproc-per-node 8
      fastune train my_70B_lora.yaml --nproc-per-node 8 --nnodes 2 --rdzv-endpoint node0:29400
    """
    from fastune.config import load_config, save_resolved_config

    cfg = load_config(config, overrides)  # checked once here, before any rank starts
    if nproc_per_node is not None or nnodes > 1 or rdzv_endpoint is not None:
        _launch(ctx, [config, *overrides], cfg.output_dir, nproc_per_node, nnodes, node_rank, rdzv_endpoint)
        return
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one writer
        save_resolved_config(cfg, cfg.output_dir)
    from fastune.training.recipe import train as run  # torch and the model code: after validation

    run(cfg)


def _launch(ctx: click.Context, train_args: list[str], output_dir: str, nproc_per_node: Optional[int],
            nnodes: int, node_rank: Optional[int], rdzv_endpoint: Optional[str]) -> None:
    """Run `python -m fastune.cli train CONFIG OVERRIDES` on every rank through torchrun;
    a failed rank ends the job and this command with status 1."""
    from fastune import distributed

    if distributed.launched_by_torchrun():
        raise FastuneError("--nproc-per-node: this process already runs under torchrun; drop the option")
    if nproc_per_node is None:
        raise FastuneError("--nproc-per-node: required with --nnodes or --rdzv-endpoint")
    debug = ["--debug"] if ctx.meta.get(DEBUG) else []
    args = distributed.torchrun_args(["train", *debug, *train_args], nproc_per_node, nnodes, node_rank,
                                     rdzv_endpoint, distributed.job_id(output_dir))
    try:
        distributed.launch(args)
    except distributed.RankFailed as e:
        click.echo(f"error: {e}", err=True)
        ctx.exit(1)


@click.command(epilog=CONFIG_HELP)
@click.argument("config")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE | ~KEY]...")
@click.option("--print-config", is_flag=True, help="Also print the whole resolved config.")
@debug_option
def validate(config: str, overrides: tuple[str, ...], print_config: bool) -> None:
    """Check CONFIG (with overrides) without training: keys, types, files,
    components, and the model's config.json. Prints "config OK" and a summary.

    \b
    Examples:
      fastune validate demo
      fastune validate my_config.yaml batch_size=16 --print-config
    """
    from omegaconf import OmegaConf

    from fastune.config import load_config
    from fastune.models.config import ModelConfig

    cfg = load_config(config, overrides)
    model = ModelConfig.from_json(cfg.model.checkpoint_dir)
    click.echo(f"config OK: {config}")
    click.echo(_summary(cfg, model))
    if print_config:
        click.echo(OmegaConf.to_yaml(cfg))


def _summary(cfg, model) -> str:
    """A few lines that say what a training run with ``cfg`` would do."""
    from fastune.models.spec import describe_kernels

    data = cfg.dataset
    if "_component_" in data:
        dataset = data._component_
    else:
        validation = (f"split {data.val_split!r}" if data.val_split is not None else
                      f"{data.val_fraction:.1%} held out" if data.val_fraction is not None else "none")
        dataset = (f"{data.source} [{data.split}], {data.format}, max_seq_len {data.max_seq_len}"
                   f"{', packed' if data.packed else ''}; validation: {validation}")
    from fastune.methods.method import method_from_config

    method = method_from_config(cfg).describe()
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    epochs = f"{cfg.epochs} epoch{'s' * (cfg.epochs != 1)}"
    if cfg.max_steps_per_epoch is not None:
        epochs += f" of at most {cfg.max_steps_per_epoch} steps"
    optimizer = cfg.optimizer.get("_component_", "")
    if "lr" in cfg.optimizer:
        optimizer += f", lr {cfg.optimizer.lr:g}"
    rows = [
        ("model", f"{cfg.model.checkpoint_dir}: {model.model_type}, {model.num_hidden_layers} layers, "
                  f"hidden {model.hidden_size}, vocab {model.vocab_size}; {cfg.model.dtype}, "
                  f"kernels {describe_kernels(cfg.model.kernels)}"),
        ("method", method),
        ("dataset", dataset),
        ("batch", f"{cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation = {per_step} "
                  f"sequences per optimizer step (per rank); {epochs}"),
        ("optimizer", optimizer),
        ("output", str(cfg.output_dir)),
        ("logger", cfg.metric_logger._component_),
    ]
    return "\n".join(f"  {name:<10}{value}" for name, value in rows)


@click.command(name="ls")
def list_configs() -> None:
    """List the shipped configs, by model and method.

    \b
    Use one by name, or copy it out to edit:
      fastune train llama3_2/1B_lora
      fastune cp llama3_2/1B_lora my_config.yaml
    """
    from omegaconf import OmegaConf

    from fastune.config import shipped_config, shipped_config_names

    rows = []
    for name in shipped_config_names():
        text = shipped_config(name).read_text(encoding="utf-8")
        method = OmegaConf.create(text).get("method", "lora")
        model = name.rsplit("/", 1)[0] if "/" in name else name
        rows.append((model, method, name, _first_comment(text)))
    widths = [max(len(r[i]) for r in rows + [("MODEL", "METHOD", "CONFIG", "")]) for i in range(3)]
    for row in [("MODEL", "METHOD", "CONFIG", "DESCRIPTION")] + sorted(rows):
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths + [0])).rstrip())


def _first_comment(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("#") and line.strip("# "):
            return line.strip("# ")
    return ""


@click.command(name="cp")
@click.argument("name")
@click.argument("dest", type=click.Path())
@click.option("--force", is_flag=True, help="Overwrite DEST if it exists.")
@debug_option
def copy_config(name: str, dest: str, force: bool) -> None:
    """Copy the shipped config NAME to DEST (a file, or a folder to put it in).

    \b
    Examples:
      fastune cp llama3_2/1B_lora my_config.yaml
      fastune cp demo configs/       # -> configs/demo.yaml
    """
    from fastune.config import shipped_config, shipped_config_names
    from fastune.config.schema import did_you_mean

    source = shipped_config(name)
    if source is None:
        raise FastuneError(f"no shipped config named {name!r}{did_you_mean(name, shipped_config_names())}; "
                           f"`fastune ls` lists them")
    target = Path(dest)
    if target.is_dir() or dest.endswith(("/", os.sep)):
        target = target / source.name
    elif not target.suffix:
        target = target.with_suffix(".yaml")
    if target.exists() and not force:
        raise FastuneError(f"{target} exists; pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())
    click.echo(f"copied {name} to {target}")
