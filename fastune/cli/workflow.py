"""``fastune plot``, and torchtune's spellings: ``fastune cat CONFIG`` and ``fastune run``
(``train`` that also takes ``--config``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from fastune.cli.group import CONFIG_HELP, debug_option
from fastune.cli.train import train
from fastune.errors import FastuneError


@click.command()
@click.argument("output_dirs", nargs=-1, required=True, metavar="OUTPUT_DIR [OTHER_DIR]...")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="The PNG to write [default: OUTPUT_DIR/logs/training.png for one run, "
                   "runs.png here for several].")
@debug_option
def plot(output_dirs: tuple[str, ...], output: Optional[str]) -> None:
    """Chart loss, validation loss, learning rate and tokens/s against step.

    Reads each run's logs/history.jsonl (every run writes it, whatever its
    metric_logger) and draws the runs over each other, one colour per run.
    Needs matplotlib: pip install 'fastune[plot]'.

    \b
    Examples:
      fastune plot fastune_demo
      fastune plot runs/lr_1e-4 runs/lr_3e-4 -o lr_sweep.png
    """
    from fastune.training.plot import chart_path, plot_runs

    for folder in output_dirs:
        if not Path(folder).is_dir():
            raise FastuneError(f"{folder}: no such directory")
    out = output or (chart_path(output_dirs[0]) if len(output_dirs) == 1 else Path("runs.png"))
    written = plot_runs(output_dirs, out)
    if written is None:
        raise FastuneError("fastune plot needs matplotlib: pip install 'fastune[plot]'")
    click.echo(f"wrote {written}")


@click.command(name="cat")
@click.argument("name")
@debug_option
def cat_config(name: str) -> None:
    """Print the shipped config NAME (see `fastune ls`).

    \b
    Examples:
      fastune cat demo
      fastune cat llama3_2/1B_lora > my_config.yaml
    """
    from fastune.config import shipped_config, shipped_config_names
    from fastune.config.schema import did_you_mean

    source = shipped_config(name)
    if source is None:
        raise FastuneError(f"no shipped config named {name!r}{did_you_mean(name, shipped_config_names())}; "
                           f"`fastune ls` lists them")
    click.echo(source.read_text(encoding="utf-8"), nl=False)


class _RunCommand(click.Command):
    """``train``'s options, with torchtune's ``--config CONFIG`` accepted in place of
    the CONFIG argument (``tune run`` users type it so)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out, i = [], 0
        config = None
        while i < len(args):
            if args[i] == "--config" and i + 1 < len(args):
                config, i = args[i + 1], i + 2
            elif args[i].startswith("--config="):
                config, i = args[i].split("=", 1)[1], i + 1
            else:
                out.append(args[i])
                i += 1
        return super().parse_args(ctx, [config, *out] if config is not None else out)


run = _RunCommand(
    name="run", callback=train.callback, params=train.params, epilog=CONFIG_HELP,
    help="""Fine-tune a model as CONFIG says: `fastune train`, also spelled as torchtune's
    `tune run` (CONFIG may be given as --config CONFIG).

    \b
    Examples:
      fastune run --config llama3_2/1B_lora batch_size=8
      fastune run demo epochs=1
    """,
    short_help="Fine-tune a model as CONFIG says (train, torchtune's spelling).",
)
