"""The ``fastune`` command line."""

import click

from fastune import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fastune")
def main() -> None:
    """fastune: fast, correct fine-tuning of Llama-family LLMs.

    \b
    Typical workflow:
      fastune download meta-llama/Llama-3.2-1B-Instruct
      fastune train configs/llama3_2/1B_lora.yaml batch_size=8
      fastune generate | eval | quantize
    """


if __name__ == "__main__":
    main()
