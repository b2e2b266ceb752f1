"""The ``fastune`` command group, and what every command shares.

Every command may raise ``fastune.errors.FastuneError`` for bad input: the group
prints it as one line, ``error: <message>``, and exits with status 2. With
``--debug`` (before or after the command name) or ``FASTUNE_DEBUG=1`` the
traceback is shown instead.
"""

from __future__ import annotations

import os

import click

from fastune import __version__
from fastune.errors import FastuneError

DEBUG = "fastune.debug"


class Group(click.Group):
    """A click group that turns a user error (``FastuneError``, or an OS error such as a
    full disk) into one line on stderr and exit status 2. Secrets are redacted from that
    line and from any traceback (``--debug``, or a bug)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # --debug may follow the command name; the noise it lets through comes at import,
        # before that command's options are parsed.
        options = args[: args.index("--")] if "--" in args else args
        if "--debug" in options:
            ctx.meta[DEBUG] = True
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        from fastune.cli.quiet import quiet_dependencies
        from fastune.config.secrets import redact_exception, redact_text
        from fastune.errors import user_error_line

        if not (ctx.meta.get(DEBUG) or os.environ.get("FASTUNE_DEBUG") == "1"):
            quiet_dependencies()
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:
            line = user_error_line(e)
            if line is None or ctx.meta.get(DEBUG) or os.environ.get("FASTUNE_DEBUG") == "1":
                redact_exception(e)
                raise
            click.echo(f"error: {redact_text(line)}", err=True)
            ctx.exit(2)


    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list with each command's whole first sentence: click would cut it
        to the terminal's width with an ellipsis."""
        commands = [(name, self.get_command(ctx, name)) for name in self.list_commands(ctx)]
        rows = [(name, cmd.get_short_help_str(limit=10_000)) for name, cmd in commands
                if cmd is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _set_debug(ctx: click.Context, _param, value: bool) -> None:
    if value:
        ctx.meta[DEBUG] = True


debug_option = click.option(
    "--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
    help="Show the full traceback of an error instead of one line.",
)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fastune")
@debug_option
def main() -> None:
    """fastune: fast, correct fine-tuning of Llama-family LLMs.

    \b
    Typical workflow:
      fastune ls                                  # shipped configs
      fastune download meta-llama/Llama-3.2-1B-Instruct --output-dir /tmp/Llama-3.2-1B-Instruct
      fastune train llama3_2/1B_lora batch_size=8
      fastune generate | eval | quantize

    \b
    Offline demo (CPU, a few minutes):
      fastune train demo
    """


CONFIG_HELP = """
\b
CONFIG is a YAML file, or the name of a shipped config (see `fastune ls`).
Each KEY=VALUE overrides one key; the value is read as YAML:
  optimizer.lr=1e-4               a nested key
  lora.targets=[q_proj,v_proj]    a list
  max_steps_per_epoch=null        null
  ~max_steps_per_epoch            delete a key (back to its default)
  metric_logger=wandb             a short name for a component:
                                  disk, stdout, wandb, tensorboard;
                                  optimizer=adamw, adam, sgd
  metric_logger.project=my-run    then its keyword arguments
  metric_logger._component_=my.module.MyLogger
  output_dir='${oc.env:HOME}/runs/x'   interpolation (quote the $)
"""


def comma_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]
