"""Read a DCP checkpoint (``distributed_checkpoint/``) without running code from it.

``torch.distributed.checkpoint`` reads its ``.metadata`` with ``pickle.load`` and
each non-tensor item (an optimizer's ``lr``, ``betas``...) with
``torch.load(weights_only=False)``: a crafted checkpoint folder would run its
payload on resume. Here the metadata goes through an unpickler that resolves only
the classes DCP's own metadata is made of, and non-tensor items through
``torch.load(weights_only=True)``, as the tensors already are.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from fastune.errors import FastuneError

# What a DCP .metadata holds (torch 2.x): its dataclasses, torch.Size, dtypes, layouts, paths.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class UnsafeCheckpointError(FastuneError):
    """A checkpoint file that asks to load something other than plain checkpoint data."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_dcp_metadata(path: Path) -> Metadata:
    """The ``Metadata`` in DCP file ``path``, or an ``UnsafeCheckpointError`` naming it."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except OSError as e:
        raise UnsafeCheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # unpickling fails with many types; the reason is what matters
        raise UnsafeCheckpointError(f"{path}: not a DCP metadata file, refusing it ({e})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path}: not a DCP metadata file (holds a {type(metadata).__name__})")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` goes through the allow-list unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_dcp_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` reading non-tensor items with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"{read_item.dest_index.fqn}: checkpoint item is not plain data, refusing it ({_first_line(e)})"
            ) from None
        # As DefaultLoadPlanner.load_bytes, with the object loaded above.
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def dcp_reader_kwargs(path: Path) -> dict[str, Any]:
    """Arguments for ``dcp.load`` that read ``path`` safely.

    The metadata is checked here first: inside ``dcp.load`` a refused file would be
    logged with a traceback and retried as rank-local metadata before the error came out."""
    if (Path(path) / ".metadata").exists():
        read_dcp_metadata(Path(path) / ".metadata")
    return {"storage_reader": SafeFileSystemReader(str(path)), "planner": SafeLoadPlanner()}
