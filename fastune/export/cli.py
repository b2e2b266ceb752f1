"""``fastune export``: write a checkpoint in formats other tools load."""

from __future__ import annotations

from pathlib import Path

import click

# fastune.export.gguf.TYPES, spelled out so that the CLI starts without importing torch (a test compares).
_TYPES_HELP = "f16, bf16, f32, q8_0, q4_0, q4_1, q5_0, q5_1"


@click.group(name="export", short_help="Export a checkpoint to GGUF (llama.cpp).")
def export() -> None:
    """Export a checkpoint for other runtimes (llama.cpp, Ollama, LM Studio)."""


@export.command(name="gguf", short_help="One GGUF file for llama.cpp and Ollama.")
@click.argument("checkpoint", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--type", "out_type", default="f16", show_default=True, metavar="TYPE",
              help=f"Weight type of the matrices: {_TYPES_HELP}. Norms and biases stay f32.")
@click.option("--ollama", is_flag=True, help="Also write an Ollama Modelfile beside OUT.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def gguf_command(checkpoint: str, out: str, out_type: str, ollama: bool, force: bool) -> None:
    """Write CHECKPOINT as one GGUF file, OUT, for llama.cpp, Ollama and LM Studio,
    with the tokenizer and chat template (llama.cpp's chat mode works).

    \b
    CHECKPOINT is a checkpoint folder (from `fastune download` or a training run's
    epoch_N/step_N; a LoRA run's merged weights, or base + adapter merged when only
    the adapter was saved), or a run's output_dir (its latest checkpoint).

    \b
    Types: f16 and bf16 store 16 bits per weight (exact for weights already in that
    type: bf16 for most Hub checkpoints), f32 is lossless, q8_0 is 8-bit (about half
    of f16's size, near-lossless), q4_0/q4_1/q5_0/q5_1 are 4/5-bit (smaller, lossy).
    Other types (Q4_K_M ...): run llama.cpp's llama-quantize on the f16 or bf16 file.

    \b
    Examples:
      fastune export gguf fastune_demo demo.gguf
      fastune export gguf out/epoch_0 model-q8.gguf --type q8_0 --ollama
      llama-cli -m demo.gguf -cnv                       # chat in llama.cpp
      ollama create my-model -f Modelfile                # with --ollama
    """
    from fastune.errors import FastuneError
    from fastune.export.gguf import export_gguf

    modelfile = Path(out).parent / "Modelfile"
    if ollama and modelfile.exists() and not force:
        raise FastuneError(f"{modelfile} exists; pass --force to replace it")
    with _ProgressBar() as progress:
        result = export_gguf(checkpoint, out, out_type.lower(), force=force, progress=progress)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    size = result.path.stat().st_size / 1e6
    click.echo(f"wrote {result.path}: {out_type.lower()}, arch {result.arch}, "
               f"{len(result.tensor_types)} tensors, {size:.1f} MB")
    if ollama:
        path, has_template = _modelfile(checkpoint, result.path)
        note = "" if has_template else (" (no TEMPLATE: the chat template has no Ollama equivalent; "
                                        "Ollama reads the one in the GGUF file)")
        click.echo(f"wrote {path}{note}; run: ollama create NAME -f {path}")


class _ProgressBar:
    """A tensor-by-tensor bar on stderr (when it is a terminal): a large model takes minutes."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int, name: str) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc="writing GGUF", unit="tensor", leave=False, disable=None)
        self.bar.set_postfix_str(name, refresh=False)
        self.bar.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _modelfile(checkpoint: str, gguf_path: Path):
    """The Modelfile, with the stop tokens fastune's generate stops at."""
    import gguf

    from fastune.data import load_tokenizer
    from fastune.export.ollama import write_modelfile
    from fastune.generation import resolve_checkpoint

    tokenizer = load_tokenizer(resolve_checkpoint(checkpoint))
    tokens = gguf.GGUFReader(gguf_path).fields["tokenizer.ggml.tokens"]
    stops = [bytes(tokens.parts[tokens.data[i]]).decode("utf-8") for i in tokenizer.stop_ids]
    return write_modelfile(gguf_path, tokenizer, stops)
