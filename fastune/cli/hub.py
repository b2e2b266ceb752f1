"""``fastune download`` and ``fastune upload``: the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from fastune import hub
from fastune.cli.group import comma_list, debug_option
from fastune.errors import FastuneError


_TOKEN_HELP = "Hugging Face token (never printed); else HF_TOKEN or the `hf auth login` token."


@click.command()
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

    path = run(repo_id, Path(output_dir).expanduser() if output_dir else None, comma_list(ignore_patterns), hf_token)
    click.echo(f"downloaded {repo_id} to {path}")


@click.command()
@click.argument("folder", type=click.Path())
@click.argument("repo_id")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded; send nothing.")
@click.option("--private", is_flag=True, help="Create the repo as private (an existing repo is left as it is).")
@click.option("--ignore-patterns", default=",".join(hub.DEFAULT_UPLOAD_IGNORE), show_default=True,
              help="Comma-separated globs of files to leave out, at any depth (the resume state is for resuming only).")
@click.option("--include-hidden", is_flag=True, help="Also upload dotfiles and files in dot-folders (.env is skipped otherwise).")
@click.option("--hf-token", default=None, envvar="HF_TOKEN", show_envvar=True, help=_TOKEN_HELP)
@debug_option
def upload(folder: str, repo_id: str, dry_run: bool, private: bool, ignore_patterns: str,
           include_hidden: bool, hf_token: Optional[str]) -> None:
    """Upload FOLDER (a checkpoint: model or adapter, merged/, tokenizer) to model repo REPO_ID.

    Only regular files inside FOLDER go: no symlink leading out of it, no hidden file
    unless --include-hidden; what is skipped is said on stderr.

    \b
    Examples:
      fastune upload out/epoch_0 me/llama3.2-1b-alpaca --dry-run
      fastune upload out/epoch_0 me/llama3.2-1b-alpaca --private
      fastune upload out/epoch_0/merged me/llama3.2-1b-alpaca-merged
    """
    from fastune.hub import check_repo_id, plan_upload, upload as run

    check_repo_id(repo_id)
    patterns = comma_list(ignore_patterns)
    plan = plan_upload(Path(folder), patterns, include_hidden)
    if not plan.files:
        skipped = f" (skipped hidden files: {', '.join(plan.hidden)}; --include-hidden sends them)" if plan.hidden else ""
        raise FastuneError(f"{folder}: nothing to upload{skipped}")
    if plan.hidden:
        click.echo(f"skipped {len(plan.hidden)} hidden file(s) (--include-hidden sends them): "
                   f"{', '.join(plan.hidden)}", err=True)
    if plan.links:
        click.echo(f"skipped {len(plan.links)} symlink(s) leading out of {folder}: {', '.join(plan.links)}", err=True)
    files = plan.files
    if dry_run:
        size = sum((Path(folder) / f).stat().st_size for f in files)
        click.echo(f"would upload {len(files)} files ({size / 1e6:.1f} MB) to https://huggingface.co/{repo_id}:")
        for f in files:
            click.echo(f"  {f}")
        return
    url = run(Path(folder), repo_id, private, hf_token, patterns, include_hidden=include_hidden)
    click.echo(f"uploaded {len(files)} files: {url}")
