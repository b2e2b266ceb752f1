"""Security: nothing a checkpoint folder holds runs as code on resume."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch

from fastune.checkpoint.dcp_safe import UnsafeCheckpointError, read_dcp_metadata
from fastune.distributed.resume import DCP_DIR, _resume_state, load_resume_state
from fastune.errors import FastuneError


class _Payload:
    """Unpickling this writes ``marker``: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save_dcp(tmp_path, model, optimizer):
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(_resume_state(model, optimizer), checkpoint_id=str(tmp_path / DCP_DIR), no_dist=True)
    return tmp_path


def test_a_dcp_checkpoint_still_resumes_through_the_safe_reader(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    _save_dcp(tmp_path, model, optimizer)
    other, other_optimizer = _model_and_optimizer(1)
    load_resume_state(other, other_optimizer, tmp_path)
    assert torch.equal(other.weight, model.weight)
    want, got = optimizer.state_dict(), other_optimizer.state_dict()
    assert torch.equal(got["state"][0]["exp_avg"], want["state"][0]["exp_avg"])
    assert got["param_groups"][0]["lr"] == want["param_groups"][0]["lr"]


def test_crafted_dcp_metadata_runs_no_code(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    _save_dcp(tmp_path, model, optimizer)
    marker = tmp_path / "marker"
    (tmp_path / DCP_DIR / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(FastuneError, match=r"\.metadata: not a DCP metadata file, refusing it") as info:
        load_resume_state(model, optimizer, tmp_path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_crafted_dcp_item_runs_no_code(tmp_path):
    """A non-tensor item (an optimizer's lr) is read with weights_only=True."""
    model, optimizer = _model_and_optimizer(0)
    _save_dcp(tmp_path, model, optimizer)
    marker = tmp_path / "marker"
    metadata = read_dcp_metadata(tmp_path / DCP_DIR / ".metadata")
    # Point the lr item at a pickle payload appended to the data file.
    index = next(i for i in metadata.storage_data if i.fqn.endswith("param_groups.0.lr"))
    info = metadata.storage_data[index]
    data = tmp_path / DCP_DIR / info.relative_path
    payload = pickle.dumps(_Payload(marker))
    offset = data.stat().st_size
    with open(data, "ab") as f:
        f.write(payload)
    info.offset, info.length = offset, len(payload)
    (tmp_path / DCP_DIR / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(FastuneError, match="not plain data, refusing it"):
        load_resume_state(model, optimizer, tmp_path)
    assert not marker.exists()


def test_metadata_of_another_type_is_refused(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UnsafeCheckpointError, match="not a DCP metadata file"):
        read_dcp_metadata(tmp_path / ".metadata")
