"""The ``fastune`` command line.

Every command may raise ``fastune.errors.FastuneError`` for bad input: the group
prints it as one line, ``error: <message>``, and exits with status 2. With
``--debug`` (before or after the command name) or ``FASTUNE_DEBUG=1`` the
traceback is shown instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import click

from fastune import __version__, hub
from fastune.errors import FastuneError

_DEBUG = "fastune.debug"


class _Group(click.Group):
    """A click group that turns a FastuneError into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FastuneError as e:
            if ctx.meta.get(_DEBUG) or os.environ.get("FASTUNE_DEBUG") == "1":
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)


def _set_debug(ctx: click.Context, _param, value: bool) -> None:
    if value:
        ctx.meta[_DEBUG] = True


debug_option = click.option(
    "--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
    help="Show the full traceback of an error instead of one line.",
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
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


_CONFIG_HELP = """
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


@main.command(epilog=_CONFIG_HELP)
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
    _recipe_train()(cfg)


def _launch(ctx: click.Context, train_args: list[str], output_dir: str, nproc_per_node: Optional[int],
            nnodes: int, node_rank: Optional[int], rdzv_endpoint: Optional[str]) -> None:
    """Run `python -m fastune.cli train CONFIG OVERRIDES` on every rank through torchrun;
    a failed rank ends the job and this command with status 1."""
    from fastune import distributed

    if distributed.launched_by_torchrun():
        raise FastuneError("--nproc-per-node: this process already runs under torchrun; drop the option")
    if nproc_per_node is None:
        raise FastuneError("--nproc-per-node: required with --nnodes or --rdzv-endpoint")
    debug = ["--debug"] if ctx.meta.get(_DEBUG) else []
    args = distributed.torchrun_args(["train", *debug, *train_args], nproc_per_node, nnodes, node_rank,
                                     rdzv_endpoint, distributed.job_id(output_dir))
    try:
        distributed.launch(args)
    except distributed.RankFailed as e:
        click.echo(f"error: {e}", err=True)
        ctx.exit(1)


def _recipe_train():
    try:
        from fastune.training.recipe import train
    except ModuleNotFoundError as e:
        if e.name != "fastune.training.recipe":
            raise
        raise FastuneError("the training recipe (fastune.training.recipe) is not built yet") from None
    return train


@main.command(epilog=_CONFIG_HELP)
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
    data = cfg.dataset
    if "_component_" in data:
        dataset = data._component_
    else:
        validation = (f"split {data.val_split!r}" if data.val_split is not None else
                      f"{data.val_fraction:.1%} held out" if data.val_fraction is not None else "none")
        dataset = (f"{data.source} [{data.split}], {data.format}, max_seq_len {data.max_seq_len}"
                   f"{', packed' if data.packed else ''}; validation: {validation}")
    from fastune.training.method import method_from_config

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
                  f"kernels {'on' if cfg.model.use_kernels else 'off'}"),
        ("method", method),
        ("dataset", dataset),
        ("batch", f"{cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation = {per_step} "
                  f"sequences per optimizer step (per rank); {epochs}"),
        ("optimizer", optimizer),
        ("output", str(cfg.output_dir)),
        ("logger", cfg.metric_logger._component_),
    ]
    return "\n".join(f"  {name:<10}{value}" for name, value in rows)


@main.command(name="ls")
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


@main.command(name="cp")
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


def _write(out_dir: str, name: str, data: dict, markdown: str) -> None:
    from fastune.bench.report import write_report

    click.echo(markdown)
    for path in write_report(out_dir, name, data, markdown):
        click.echo(f"wrote {path}")


@main.command(epilog=_CONFIG_HELP)
@click.argument("config")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE | ~KEY]...")
@click.option("--profile", default=None,
              help="Device to plan for: a file name in profiles/ (rtx3090, rtx4090, rtx5090, t4, l4, a10g, "
                   "a100_40gb, a100_80gb, h100_sxm, h200, cpu); default cpu when the config's device is cpu.")
@click.option("--verify", is_flag=True, help="CPU only: also run the step on real tensors and compare the peaks.")
@click.option("--out", default="fastune_reports", show_default=True, help="Folder for plan_*.json and .md.")
@debug_option
def plan(config: str, overrides: tuple[str, ...], profile: str | None, verify: bool, out: str) -> None:
    """Estimate the peak GPU memory of training CONFIG, with no GPU and no weights.

    One training step (forward, backward, optimizer) of the config's model runs on
    fake tensors; only the model's config.json is read. Prints memory by category
    and, when the config does not fit, the first variant that does (activation
    checkpointing or offloading, smaller micro-batches, QLoRA, shorter sequences).

    \b
    Examples:
      fastune plan llama3_2/1B_lora --profile rtx4090
      fastune plan my_config.yaml batch_size=8 --profile a100_40gb
      fastune plan demo --verify
    """
    from fastune.bench.plan import render_plan, run_plan

    report = run_plan(config, overrides, profile, verify, progress=lambda m: click.echo(m, err=True))
    stem = Path(config).stem.replace("/", "_")
    _write(out, f"plan_{stem}_{report['profile']['key']}", report, render_plan(report))


@main.group(cls=_Group)
def bench() -> None:
    """Measure speed and memory: fused kernels, or whole training steps against baselines."""


@bench.command(name="kernels")
@click.option("--ops", default=None, help="Comma-separated ops (default: all).")
@click.option("--dtype", default="bfloat16", type=click.Choice(["bfloat16", "float32"]), show_default=True)
@click.option("--warmup", default=3, show_default=True, help="Untimed steps first.")
@click.option("--steps", default=10, show_default=True, help="Timed steps; the median is reported.")
@click.option("--out", default="fastune_reports", show_default=True, help="Folder for kernels.json, .md, .png.")
@debug_option
def bench_kernels(ops: str | None, dtype: str, warmup: int, steps: int, out: str) -> None:
    """Each fused op's forward, backward and full step: median time, peak memory and
    max error against float64, for each implementation (CUDA: Triton, eager,
    torch.compile of the reference; CPU: compiled and eager), each in its own process.

    Rows of ops not run this time are kept from OUT/kernels.json (same device and dtype).
    """
    import json

    from fastune.bench.kernels import bench_kernels as run, chart, render

    previous = Path(out) / "kernels.json"  # other ops' rows of an earlier run are kept
    report = run(ops.split(",") if ops else None, dtype, warmup, steps,
                 previous=json.loads(previous.read_text()) if previous.exists() else None,
                 progress=lambda m: click.echo(m, err=True))
    _write(out, "kernels", report, render(report))
    png = chart(report, Path(out) / "kernels.png")
    click.echo(f"wrote {png}" if png else "no chart: pip install 'fastune[plot]'")


@bench.command(name="train", epilog=_CONFIG_HELP)
@click.argument("config")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE | ~KEY]...")
@click.option("--steps", default=20, show_default=True, help="Timed optimizer steps per configuration.")
@click.option("--warmup", default=3, show_default=True, help="Untimed steps first (compilation happens here).")
@click.option("--rounds", default=5, show_default=True, help="The timed steps run interleaved in this many rounds.")
@click.option("--compare", multiple=True, type=click.Choice(["eager", "hf", "hf-eager", "hf-compiled"]),
              help="Add a baseline: eager = fastune without kernels and compile; hf = transformers + PEFT, "
                   "eager and compiled. Repeatable.")
@click.option("--variant", "variants", multiple=True, metavar="NAME:KEY=VALUE,...",
              help="Add fastune with more overrides, e.g. 'no kernels:model.use_kernels=false'. Repeatable.")
@click.option("--random-init", is_flag=True, help="Random weights from the checkpoint's config.json (no weights needed).")
@click.option("--profile", default=None, help="Device profile for the peak FLOP/s (default: this CPU, measured, or the local GPU).")
@click.option("--out", default="fastune_reports", show_default=True, help="Folder for train_*.json, .md, .png.")
@debug_option
def bench_train(config: str, overrides: tuple[str, ...], steps: int, warmup: int, rounds: int,
                compare: tuple[str, ...], variants: tuple[str, ...], random_init: bool, profile: str | None,
                out: str) -> None:
    """Train CONFIG for a few steps and report tokens/s, peak memory, the fraction of
    peak FLOP/s and a phase breakdown, against baselines measured in the same run.

    \b
    Examples:
      fastune bench train demo --compare eager
      fastune bench train my_config.yaml --compare eager --compare hf --steps 30
      fastune bench train my_config.yaml --variant "checkpointing:activation_checkpointing=true"
    """
    from fastune.bench.train import bench_train as run, chart, render

    report = run(config, list(overrides), list(compare), steps, warmup, rounds, random_init, profile,
                 list(variants), progress=lambda m: click.echo(m, err=True))
    stem = f"train_{Path(config).stem}"
    _write(out, stem, report, render(report))
    png = chart(report, Path(out) / f"{stem}.png")
    click.echo(f"wrote {png}" if png else "no chart: pip install 'fastune[plot]'")



# --- workflow: download, generate, eval, quantize, upload ------------------------------

_TOKEN_HELP = "Hugging Face token (never printed); else HF_TOKEN or the `hf auth login` token."


def _patterns(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


@main.command()
@click.argument("repo_id")
@click.option("--output-dir", type=click.Path(), default=None,
              help="Where the files go [default: /tmp/<model name>, where the shipped configs look].")
@click.option("--ignore-patterns", default=",".join(hub.DEFAULT_DOWNLOAD_IGNORE), show_default=True,
              help="Comma-separated globs of files to skip (fastune reads safetensors only); '' skips nothing.")
@click.option("--hf-token", default=None, envvar="HF_TOKEN", show_envvar=True, help=_TOKEN_HELP)
@debug_option
def download(repo_id: str, output_dir: Optional[str], ignore_patterns: str, hf_token: Optional[str]) -> None:
    """Download model REPO_ID from the Hugging Face Hub, and record it in
    original_repo_id.json (exported adapters then name their base model).

    \b
    Examples:
      fastune download meta-llama/Llama-3.2-1B-Instruct
      fastune download Qwen/Qwen2.5-7B-Instruct --output-dir ~/models/qwen2.5-7b
    """
    from fastune.hub import download as run

    path = run(repo_id, Path(output_dir).expanduser() if output_dir else None, _patterns(ignore_patterns), hf_token)
    click.echo(f"downloaded {repo_id} to {path}")


@main.command()
@click.argument("folder", type=click.Path())
@click.argument("repo_id")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded; send nothing.")
@click.option("--private", is_flag=True, help="Create the repo as private (an existing repo is left as it is).")
@click.option("--ignore-patterns", default=",".join(hub.DEFAULT_UPLOAD_IGNORE), show_default=True,
              help="Comma-separated globs of files to leave out (the resume state is for resuming only).")
@click.option("--hf-token", default=None, envvar="HF_TOKEN", show_envvar=True, help=_TOKEN_HELP)
@debug_option
def upload(folder: str, repo_id: str, dry_run: bool, private: bool, ignore_patterns: str,
           hf_token: Optional[str]) -> None:
    """Upload FOLDER (a checkpoint: merged model, adapter/, tokenizer) to model repo REPO_ID.

    \b
    Examples:
      fastune upload out/epoch_0 me/llama3.2-1b-alpaca --dry-run
      fastune upload out/epoch_0 me/llama3.2-1b-alpaca --private
      fastune upload out/epoch_0/adapter me/llama3.2-1b-alpaca-lora
    """
    from fastune.hub import files_to_upload, upload as run

    patterns = _patterns(ignore_patterns)
    files = files_to_upload(Path(folder), patterns)
    if dry_run:
        size = sum((Path(folder) / f).stat().st_size for f in files)
        click.echo(f"would upload {len(files)} files ({size / 1e6:.1f} MB) to https://huggingface.co/{repo_id}:")
        for f in files:
            click.echo(f"  {f}")
        return
    click.echo(f"uploaded {len(files)} files: {run(Path(folder), repo_id, private, hf_token, patterns)}")


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


@main.command(epilog=_INFERENCE_HELP)
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


@main.command(name="eval", epilog=_INFERENCE_HELP)
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
    results = run(checkpoint, _patterns(tasks), limit, batch_size, max_seq_length, num_fewshot,
                  apply_chat_template, include_path, dtype, _device(device), compile_)
    click.echo(metric_table(results))
    if output:
        from lm_eval.utils import handle_non_serializable

        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
        click.echo(f"wrote {output}")


@main.command(epilog=_INFERENCE_HELP)
@click.argument("checkpoint", type=click.Path())
@click.argument("output_dir", type=click.Path())
@click.option("--scheme", type=click.Choice(["int8wo", "int4wo", "int8dq"]), default="int8wo", show_default=True,
              help="int8wo: int8 weights; int4wo: int4 weights in groups; int8dq: int8 weights and activations.")
@click.option("--group-size", type=int, default=None, help="int4wo: input channels per scale [default: 128].")
@click.option("--force", is_flag=True, help="Replace OUTPUT_DIR if it exists.")
@_device_options
@debug_option
def quantize(checkpoint: str, output_dir: str, scheme: str, group_size: Optional[int], force: bool,
             dtype: str, device: str) -> None:
    """Quantize the decoder's linear layers of CHECKPOINT with torchao and save the
    result in OUTPUT_DIR, which `fastune generate` and `fastune eval` load.

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
    click.echo(f"wrote {out}: {scheme}, weights {after / 1e6:.1f} MB on disk{ratio}")


if __name__ == "__main__":
    main()
