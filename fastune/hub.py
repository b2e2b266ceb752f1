"""Hugging Face Hub: download a model to fine-tune, upload a result.

Both go through ``huggingface_hub`` (``snapshot_download``, ``upload_folder``).
The token comes from ``--hf-token``, else ``HF_TOKEN`` or the login that
``huggingface_hub`` finds itself; it is never printed or written anywhere. Every
failure the user can fix (gated or missing repo, bad token, no network) becomes
one ``HubError`` line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Optional, Sequence

from fastune.checkpoint.layout import REPO_ID_FILE, RESUME_ONLY_FILES, RUN_CONFIG
from fastune.errors import FastuneError

# fastune reads safetensors only: skip Meta's consolidated .pth and PyTorch .bin copies.
DEFAULT_DOWNLOAD_IGNORE = ("*.pth", "*.pt", "*.bin")
# A training checkpoint's resume state (optimizer, RNG, loader; sharded as DCP under
# FSDP2) is only for resuming, and about twice the model's size.
# A run's config.yaml (and the config.N.yaml of earlier runs) in output_dir names local
# paths and is for resuming too.
DEFAULT_UPLOAD_IGNORE = (*RESUME_ONLY_FILES, RUN_CONFIG, "config.[0-9]*.yaml")


class HubError(FastuneError):
    """A Hub operation that failed for a reason the user can fix; one line, no token in it."""


def default_download_dir(repo_id: str) -> Path:
    """``/tmp/<model name>``, where the shipped configs look (as torchtune's download did)."""
    return Path("/tmp") / repo_id.rsplit("/", 1)[-1]


def download(
    repo_id: str,
    output_dir: Optional[Path] = None,
    ignore_patterns: Sequence[str] = DEFAULT_DOWNLOAD_IGNORE,
    token: Optional[str] = None,
) -> Path:
    """Download the files of model repo ``repo_id`` into ``output_dir`` and write
    ``original_repo_id.json`` there, so that adapters trained on it name their base model."""
    import huggingface_hub
    from huggingface_hub import errors

    check_repo_id(repo_id)  # before it names a folder: /tmp/<name>
    output_dir = Path(output_dir) if output_dir is not None else default_download_dir(repo_id)
    try:
        path = huggingface_hub.snapshot_download(
            repo_id, local_dir=output_dir, ignore_patterns=list(ignore_patterns) or None, token=token,
        )
    except errors.GatedRepoError:  # before RepositoryNotFoundError, its base class
        raise HubError(f"{repo_id} is gated: accept its license on https://huggingface.co/{repo_id}, "
                       "then pass --hf-token or set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{repo_id}: no such model repo on the Hub, or it is private "
                       "(then pass --hf-token or set HF_TOKEN)") from None
    except errors.LocalEntryNotFoundError:
        raise HubError(f"{repo_id}: cannot reach the Hugging Face Hub (no network, or HF_HUB_OFFLINE=1), "
                       "and the files are not in the local cache") from None
    except errors.HfHubHTTPError as e:
        raise HubError(f"{repo_id}: download failed: {_first_line(e)}") from None
    path = Path(path)
    (path / REPO_ID_FILE).write_text(json.dumps({"repo_id": repo_id}) + "\n")
    return path


def read_repo_id(checkpoint_dir: Path) -> Optional[str]:
    """The Hub repo a downloaded checkpoint came from (``original_repo_id.json``), or None."""
    try:
        return json.loads((Path(checkpoint_dir) / REPO_ID_FILE).read_text())["repo_id"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None


def base_model_name(checkpoint_dir: Path) -> str:
    """How an adapter trained on ``checkpoint_dir`` names its base model (PEFT's
    ``base_model_name_or_path``): the Hub repo it was downloaded from, else its local path."""
    return read_repo_id(checkpoint_dir) or str(Path(checkpoint_dir).resolve())


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if the Hub would accept it as a repo name (``name`` or ``namespace/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubError(f"{repo_id!r}: not a valid repo id; use 'namespace/name' (letters, digits, '-', '_', '.')"
                       ) from None
    return repo_id


@dataclasses.dataclass
class UploadPlan:
    """What ``upload`` sends from a folder, and what it leaves out that the user should know of."""

    files: list[str]  # relative posix paths, sorted
    hidden: list[str]  # dotfiles and files in dot-folders, left out without include_hidden
    links: list[str]  # symlinks leaving the folder (or to folders), left out


def plan_upload(folder: Path, ignore_patterns: Sequence[str] = DEFAULT_UPLOAD_IGNORE,
                include_hidden: bool = False) -> UploadPlan:
    """The regular files under ``folder`` that ``upload`` sends: none reached through a
    symlink that leaves ``folder``; none matching ``ignore_patterns`` at any depth, nor what
    ``upload_folder`` always skips (.git, caches); no hidden ones unless ``include_hidden``."""
    from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder}: not a directory")
    root = folder.resolve()
    files, hidden, links = [], [], []
    for dirpath, dirnames, filenames in os.walk(root):  # does not descend into linked folders
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            relative = path.relative_to(root).as_posix()
            if name in dirnames and not path.is_symlink():
                continue
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(root) or not target.is_file():
                    links.append(relative)
                    continue
            elif not path.is_file():  # a pipe, socket or device
                continue
            if any(part.startswith(".") for part in relative.split("/")) and not include_hidden:
                hidden.append(relative)
                continue
            files.append(relative)
    patterns = [*DEFAULT_IGNORE_PATTERNS, *ignore_patterns]
    patterns += [f"*/{p}" for p in ignore_patterns if not p.startswith(("*", "/"))]  # at every depth
    return UploadPlan(sorted(filter_repo_objects(files, ignore_patterns=patterns)),
                      sorted(filter_repo_objects(hidden, ignore_patterns=patterns)), sorted(links))


def files_to_upload(folder: Path, ignore_patterns: Sequence[str] = DEFAULT_UPLOAD_IGNORE,
                    include_hidden: bool = False) -> list[str]:
    """Paths (relative, posix) that ``upload`` sends (see ``plan_upload``)."""
    return plan_upload(folder, ignore_patterns, include_hidden).files


def upload(
    folder: Path,
    repo_id: str,
    private: bool = False,
    token: Optional[str] = None,
    ignore_patterns: Sequence[str] = DEFAULT_UPLOAD_IGNORE,
    commit_message: str = "Upload with fastune",
    include_hidden: bool = False,
) -> str:
    """Create model repo ``repo_id`` if needed and upload ``folder``'s ``files_to_upload``
    to it; return the commit URL."""
    import huggingface_hub
    from huggingface_hub import errors

    check_repo_id(repo_id)
    files = files_to_upload(folder, ignore_patterns, include_hidden)
    if not files:
        raise HubError(f"{folder}: nothing to upload")
    try:
        huggingface_hub.create_repo(repo_id, private=private, token=token, exist_ok=True, repo_type="model")
        commit = huggingface_hub.upload_folder(
            repo_id=repo_id, folder_path=Path(folder).resolve(), ignore_patterns=list(ignore_patterns),
            allow_patterns=[_literal(f) for f in files],  # exactly the files listed, nothing else
            token=token, commit_message=commit_message,
        )
    except errors.LocalTokenNotFoundError:
        raise HubError("no Hugging Face token: pass --hf-token, set HF_TOKEN, or run `hf auth login`") from None
    except errors.HfHubHTTPError as e:
        raise HubError(f"{repo_id}: upload failed: {_first_line(e)}") from None
    except _network_errors() as e:
        raise HubError(f"{repo_id}: cannot reach the Hugging Face Hub ({_first_line(e)})") from None
    return commit.commit_url


def _literal(path: str) -> str:
    """An fnmatch pattern that matches ``path`` only."""
    return re.sub(r"([*?\[])", r"[\1]", path)


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures: OSError covers requests' (huggingface_hub < 1); newer
    versions use an httpx client, exposed as ``huggingface_hub.utils.httpx``."""
    from huggingface_hub import utils

    client = getattr(utils, "httpx", None)
    return (OSError, client.TransportError) if client is not None else (OSError,)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
