"""``fastune generate``, ``eval`` and ``quantize``: use a trained checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from fastune.cli.group import comma_list, debug_option
from fastune.errors import FastuneError


_INFERENCE_HELP = """
\b
CHECKPOINT is a checkpoint folder (from `fastune download`, a training run's
epoch_N/step_N, or `fastune quantize`), or a training run's output_dir, which
means its latest checkpoint.
"""


def _device_options(f):
    f = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)(f)
    return click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
                        help="Weights and compute (a quantized checkpoint keeps its own).")(f)


def _device(name: str):
    from fastune.training.recipe import resolve_device

    return resolve_device(name)


@click.command(epilog=_INFERENCE_HELP)
@click.argument("checkpoint", type=click.Path())
@click.argument("prompt", required=False)
@click.option("--chat/--no-chat", default=None,
              help="Send PROMPT as a user turn in the model's chat format, or as plain text "
                   "[default: chat when the tokenizer has a chat format].")
@click.option("--system", default=None, help="A system message (chat format).")
@click.option("--max-new-tokens", default=256, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 decodes greedily.")
@click.option("--top-k", type=int, default=None, help="Sample from the k most likely tokens.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling.")
@click.option("--seed", type=int, default=None, help="Makes sampling reproducible.")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the decode step: a slower start, faster tokens.")
@_device_options
@debug_option
def generate(checkpoint: str, prompt: Optional[str], chat: Optional[bool], system: Optional[str],
             max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: float,
             seed: Optional[int], compile_: bool, dtype: str, device: str) -> None:
    """Continue PROMPT (read from stdin when omitted) with the model in CHECKPOINT,
    streaming the text to stdout and the speed to stderr. Stops at the model's
    end-of-turn or eos token, or after --max-new-tokens.

    \b
    Examples:
      fastune generate /tmp/Llama-3.2-1B-Instruct "Name three prime numbers."
      fastune generate out/ "Write a haiku." --temperature 0.8 --top-p 0.9 --seed 0 --compile
      echo "Once upon a time" | fastune generate out/epoch_0 --no-chat
    """
    import sys

    from fastune.generation import Generator, SamplingParams, TextStream, load_for_inference, prompt_ids

    text = prompt if prompt is not None else sys.stdin.read()
    sampling = SamplingParams(temperature, top_k, top_p)
    model, tokenizer, ckpt = load_for_inference(checkpoint, dtype=dtype, device=_device(device))
    ids = prompt_ids(tokenizer, text, chat, system)
    stream = TextStream(tokenizer, lambda s: click.echo(s, nl=False), tokenizer.stop_ids)
    out = Generator(model, compile=compile_).generate(
        [ids], max_new_tokens, sampling=sampling, stop_ids=tokenizer.stop_ids, seed=seed, on_token=stream)
    stream.flush()
    click.echo()
    speed = out.decode_tokens_per_second
    speed = (f"{speed:.1f} tokens/s (median decode step; the first, {out.step_seconds[0]:.2f} s, not counted)"
             if speed is not None else "too few decode steps to time")
    n = len(out.tokens[0])
    click.echo(f"[{ckpt}] prompt {len(ids)} tokens, prefill {out.prefill_seconds:.2f} s; "
               f"generated {n} token{'s' * (n != 1)}, {speed}", err=True)


@click.command(name="eval", epilog=_INFERENCE_HELP)
@click.argument("checkpoint", type=click.Path())
@click.option("--tasks", required=True,
              help="Comma-separated lm-eval tasks, groups or tags, e.g. arc_easy,hellaswag, or fastune_demo.")
@click.option("--limit", type=float, default=None, help="Documents per task (a fraction when < 1).")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--max-seq-length", default=4096, show_default=True,
              help="Longer contexts are cut on the left.")
@click.option("--num-fewshot", type=int, default=None, help="Few-shot examples [default: each task's].")
@click.option("--apply-chat-template", is_flag=True,
              help="Format prompts with the model's chat template (instruction-tuned models, the fastune_demo tasks).")
@click.option("--include-path", multiple=True, type=click.Path(),
              help="A folder of lm-eval task YAMLs to add. Repeatable.")
@click.option("--output", type=click.Path(), default=None, help="Also write the results as JSON here.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the decode step of generation tasks.")
@_device_options
@debug_option
def evaluate(checkpoint: str, tasks: str, limit: Optional[float], batch_size: int, max_seq_length: int,
             num_fewshot: Optional[int], apply_chat_template: bool, include_path: tuple[str, ...],
             output: Optional[str], compile_: bool, dtype: str, device: str) -> None:
    """Evaluate CHECKPOINT on lm-evaluation-harness tasks (needs `pip install 'fastune[eval]'`).

    \b
    Examples:
      fastune eval fastune_demo --tasks fastune_demo --apply-chat-template
      fastune eval /tmp/Llama-3.2-1B-Instruct --tasks arc_easy,hellaswag --limit 200
    """
    import json

    from fastune.eval import evaluate as run, metric_table

    if limit is not None and limit >= 1:
        limit = int(limit)
    results = run(checkpoint, comma_list(tasks), limit, batch_size, max_seq_length, num_fewshot,
                  apply_chat_template, include_path, dtype, _device(device), compile_)
    click.echo(metric_table(results))
    if output:
        from lm_eval.utils import handle_non_serializable

        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
        click.echo(f"wrote {output}")


@click.command(epilog=_INFERENCE_HELP)
@click.argument("checkpoint", type=click.Path())
@click.argument("output_dir", type=click.Path())
@click.option("--scheme", type=click.Choice(["int8wo", "int4wo", "int8dq"]), default="int8wo", show_default=True,
              help="int8wo: int8 weights; int4wo: int4 weights in groups (stored one per byte: torchao's "
                   "CPU layout); int8dq: int8 weights and activations. All three load in transformers.")
@click.option("--group-size", type=int, default=None, help="int4wo: input channels per scale [default: 128].")
@click.option("--force", is_flag=True, help="Replace OUTPUT_DIR if it exists.")
@_device_options
@debug_option
def quantize(checkpoint: str, output_dir: str, scheme: str, group_size: Optional[int], force: bool,
             dtype: str, device: str) -> None:
    """Quantize the decoder's linear layers of CHECKPOINT with torchao and save the
    result in OUTPUT_DIR, which `fastune generate` and `fastune eval` load.

    OUTPUT_DIR is in torchao's own serialization, as transformers writes it:
    AutoModelForCausalLM.from_pretrained(OUTPUT_DIR) loads every scheme as it is
    (torchao installed). int4wo keeps int4 values one per byte (torchao's
    IntxUnpackedToInt8Tensor, its int4 layout that runs and serializes on CPU), so
    its file is about int8's size; torchao's packed int4 layouts need CUDA.

    \b
    Examples:
      fastune quantize out/epoch_0 out/epoch_0_int8
      fastune quantize /tmp/Llama-3.2-1B-Instruct /tmp/Llama-3.2-1B-int4 --scheme int4wo --group-size 64
    """
    from fastune.checkpoint.hf import parse_dtype
    from fastune.generation import resolve_checkpoint
    from fastune.quantize import DEFAULT_GROUP_SIZE, QuantizationRecipe, disk_size, quantize_checkpoint

    if Path(output_dir).exists() and not force:
        raise FastuneError(f"{output_dir} exists; pass --force to replace it")
    if scheme == "int4wo" and group_size is None:
        group_size = DEFAULT_GROUP_SIZE
    recipe = QuantizationRecipe(scheme, dtype=parse_dtype(dtype), group_size=group_size)
    source = resolve_checkpoint(checkpoint)
    out = quantize_checkpoint(source, output_dir, recipe, _device(device))
    before, after = disk_size(source), disk_size(out)
    ratio = f", {before / after:.1f}x smaller than {source}'s {before / 1e6:.1f} MB" if before else ""
    click.echo(f"wrote {out}: {scheme}, weights {after / 1e6:.1f} MB on disk{ratio}; "
               f"loads in fastune and in transformers: AutoModelForCausalLM.from_pretrained(\"{out}\")")
