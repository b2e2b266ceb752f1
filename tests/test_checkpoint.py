"""HF checkpoint save/load: round trips through transformers, every bad input
as one clear line naming the file and key, and atomic saves."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_hf import build_hf_model, hf_logits, random_tokens, save_hf_model

import fastune
from fastune.checkpoint import CheckpointError, hf, parse_size, save_hf_checkpoint
from fastune.models.config import ConfigError

TOKENIZER_FILES = {
    "tokenizer.json": '{"version": "1.0"}',
    "tokenizer_config.json": '{"model_max_length": 2048}',
    "special_tokens_map.json": '{"bos_token": "<s>"}',
    "tokenizer.model": "sentencepiece bytes",
    "original_repo_id.json": '{"repo_id": "meta-llama/Llama-3.2-1B"}',
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An HF-written untied GQA checkpoint (with tokenizer files) and its HF model."""
    model = build_hf_model("llama_gqa_llama3")
    path = save_hf_model(model, tmp_path_factory.mktemp("source") / "ckpt")
    for name, text in TOKENIZER_FILES.items():
        (path / name).write_text(text)
    (path / "README.md").write_text("not a tokenizer file")
    return model, path


@pytest.fixture(scope="module")
def tied_source(tmp_path_factory):
    model = build_hf_model("llama_tied")
    return model, save_hf_model(model, tmp_path_factory.mktemp("tied") / "ckpt")


@pytest.fixture
def ckpt(source, tmp_path):
    """A private copy of the source checkpoint, for a test to damage."""
    return shutil.copytree(source[1], tmp_path / "ckpt")


@pytest.fixture
def sharded(source, tmp_path):
    """A private sharded copy, written by transformers."""
    return save_hf_model(source[0], tmp_path / "sharded", max_shard_size="40KB")


def load_error(path, exc=CheckpointError) -> str:
    with pytest.raises(exc) as info:
        fastune.from_pretrained(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def rewrite(file, change) -> None:
    """Apply ``change`` to the tensors of one safetensors file, in place."""
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("max_shard_size", [None, "40KB"], ids=["single", "sharded"])
def test_round_trip_through_transformers(source, tmp_path, max_shard_size):
    from transformers import AutoModelForCausalLM

    hf_model, path = source
    out = tmp_path / "out"
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    fastune.save_pretrained(fastune.from_pretrained(path), out, source_dir=path, **kwargs)

    shards = sorted(out.glob("model-*-of-*.safetensors"))
    if max_shard_size:
        assert len(shards) >= 3 and not (out / "model.safetensors").exists()
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {s.name for s in shards}
        nbytes = sum(t.numel() * t.element_size() for s in shards for t in load_file(s).values())
        assert index["metadata"]["total_size"] == nbytes
    else:
        assert not shards and not (out / "model.safetensors.index.json").exists()

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    tokens = random_tokens(2, 33)
    assert torch.equal(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens))
    for name, text in TOKENIZER_FILES.items():
        assert (out / name).read_text() == text
    assert (out / "generation_config.json").is_file()
    assert not (out / "README.md").exists()
    # safetensors writes 0600 files; shards get the same permissions as config.json.
    modes = {p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(modes) == 1, modes


@pytest.mark.parametrize("variant", ["qwen2_bias", "mistral", "llama_head_dim", "llama_linear_rope"])
def test_round_trip_other_architectures(tmp_path, variant):
    from transformers import AutoModelForCausalLM

    hf_model = build_hf_model(variant)
    path = save_hf_model(hf_model, tmp_path / "src")
    fastune.save_pretrained(fastune.from_pretrained(path), tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(reloaded) is type(hf_model)
    tokens = random_tokens(2, 33)
    assert torch.equal(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens))


def test_tied_save_omits_lm_head(tied_source, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_model, path = tied_source
    fastune.save_pretrained(fastune.from_pretrained(path), tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokens = random_tokens(1, 20)
    assert torch.equal(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens))


def test_save_plain_state_dict_in_bf16(source, tmp_path):
    """The training loop saves merged or gathered weights: a plain dict, cast on save."""
    model = fastune.from_pretrained(source[1])
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    save_hf_checkpoint(state_dict, model.config, tmp_path / "out", dtype="bfloat16")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    reloaded = fastune.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, state_dict[key].to(torch.bfloat16)), key


def test_loaded_weights_are_not_file_backed(ckpt):
    """Weights are copied out of the file: overwriting it cannot change a loaded model."""
    model = fastune.from_pretrained(ckpt)
    before = model.layers[0].mlp.up_proj.weight.clone()
    rewrite(ckpt / "model.safetensors", lambda t: t.update({k: torch.zeros_like(v) for k, v in t.items()}))
    assert torch.equal(model.layers[0].mlp.up_proj.weight, before)


def test_kernels_argument(source):
    """from_pretrained swaps in the fused ops asked for; use_kernels is the old bool spelling."""
    from fastune.modules.kernels import FusedRMSNorm, FusedSwiGLUMLP, enabled_kernels
    from fastune.models.spec import KERNEL_OPS

    model = fastune.from_pretrained(source[1])
    assert enabled_kernels(model) == KERNEL_OPS and type(model.layers[0].mlp) is FusedSwiGLUMLP
    model = fastune.from_pretrained(source[1], kernels=["rms_norm"])
    assert enabled_kernels(model) == ("rms_norm",) and type(model.norm) is FusedRMSNorm
    assert not isinstance(model.layers[0].mlp, FusedSwiGLUMLP)
    assert enabled_kernels(fastune.from_pretrained(source[1], use_kernels=False)) == ()
    assert enabled_kernels(fastune.from_pretrained(source[1], kernels="none", use_kernels=True)) == KERNEL_OPS


@pytest.mark.parametrize("text,expected", [(123, 123), ("5GB", 5 * 10**9), ("500MiB", 500 * 2**20),
                                           ("40kb", 40_000), ("1.5 GB", 1_500_000_000)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


# ----------------------------------------------------------------------------- bad input


def test_missing_key(ckpt):
    rewrite(ckpt / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    message = load_error(ckpt)
    assert "model.safetensors" in message and "'model.layers.1.mlp.up_proj.weight'" in message


def test_untied_checkpoint_without_lm_head(ckpt):
    rewrite(ckpt / "model.safetensors", lambda t: t.pop("lm_head.weight"))
    message = load_error(ckpt)
    assert "model.safetensors" in message and "missing key 'lm_head.weight'" in message


def test_unexpected_key(ckpt):
    extra = "model.layers.2.mlp.up_proj.weight"  # a third layer; config.json says 2
    rewrite(ckpt / "model.safetensors", lambda t: t.update({extra: torch.zeros(80, 64)}))
    message = load_error(ckpt)
    assert "model.safetensors" in message and f"unexpected key {extra!r}" in message


def test_shape_mismatch(ckpt):
    key = "model.layers.0.self_attn.k_proj.weight"
    rewrite(ckpt / "model.safetensors", lambda t: t.update({key: torch.zeros(64, 64)}))
    message = load_error(ckpt)
    assert "model.safetensors" in message and repr(key) in message
    assert "[64, 64]" in message and "[32, 64]" in message


def test_corrupt_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage, not a safetensors file" * 4)
    message = load_error(ckpt)
    assert "model.safetensors" in message and "not a valid safetensors file" in message


def test_truncated_safetensors(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) - 100])
    message = load_error(ckpt)
    assert "model.safetensors" in message and "not a valid safetensors file" in message


def test_index_points_to_missing_shard(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    message = load_error(sharded)
    assert "model.safetensors.index.json" in message and victim.name in message and "'model." in message


def test_index_key_not_in_its_shard(sharded):
    index_file = sharded / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    key = "model.norm.weight"
    other = next(name for name in index["weight_map"].values() if name != index["weight_map"][key])
    index["weight_map"][key] = other
    index_file.write_text(json.dumps(index))
    message = load_error(sharded)
    assert other in message and repr(key) in message


def test_index_not_json(sharded):
    (sharded / "model.safetensors.index.json").write_text("{not json")
    message = load_error(sharded)
    assert "model.safetensors.index.json" in message and "not a valid index file" in message


def test_missing_key_in_sharded_checkpoint_names_the_index(sharded):
    index_file = sharded / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    del index["weight_map"]["model.embed_tokens.weight"]
    index_file.write_text(json.dumps(index))
    message = load_error(sharded)
    assert "model.safetensors.index.json" in message and "'model.embed_tokens.weight'" in message


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    message = load_error(ckpt)
    assert str(ckpt) in message and "no model.safetensors or model.safetensors.index.json" in message


def test_pickle_weights_are_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"pickle")
    message = load_error(ckpt)
    assert "only safetensors" in message


def test_unsupported_model_type(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    message = load_error(ckpt, ConfigError)
    assert "config.json" in message and "unsupported model_type 'gpt2'" in message


def test_not_a_directory(tmp_path):
    assert "no such checkpoint directory" in load_error(tmp_path / "nowhere")


def test_bad_dtype(source):
    with pytest.raises(CheckpointError, match="dtype: unsupported value 'bf17'"):
        fastune.from_pretrained(source[1], dtype="bf17")


def test_bad_max_shard_size(source, tmp_path):
    model = fastune.from_pretrained(source[1])
    with pytest.raises(CheckpointError, match="max_shard_size: cannot read '5 gigs'"):
        fastune.save_pretrained(model, tmp_path / "out", max_shard_size="5 gigs")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda sd: sd.update({"layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 64)}),
         "key 'layers.0.self_attn.q_proj.lora_A.weight' is not a parameter"),
        (lambda sd: sd.pop("norm.weight"), "lacks key 'norm.weight'"),
        (lambda sd: sd.update({"norm.weight": torch.zeros(65)}), "'norm.weight' has shape [65]"),
    ],
    ids=["unexpected", "missing", "shape"],
)
def test_save_rejects_bad_state_dict(source, tmp_path, change, expected):
    model = fastune.from_pretrained(source[1])
    state_dict = dict(model.state_dict())
    change(state_dict)
    with pytest.raises(CheckpointError) as info:
        save_hf_checkpoint(state_dict, model.config, tmp_path / "out")
    assert str(tmp_path / "out") in str(info.value) and expected in str(info.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- atomic save


def _listing(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_failed_save_leaves_destination_intact(source, tmp_path, monkeypatch):
    model = fastune.from_pretrained(source[1])
    dest = tmp_path / "step_10"
    fastune.save_pretrained(model, dest)
    (dest / "resume_state.pt").write_bytes(b"marker")
    before = _listing(dest)

    written = []

    def flaky_write(file, tensors):
        if written:
            raise OSError("disk full")
        written.append(file)
        save_file(tensors, str(file), metadata={"format": "pt"})

    monkeypatch.setattr(hf, "write_safetensors", flaky_write)
    with pytest.raises(OSError, match="disk full"):
        fastune.save_pretrained(model, dest, max_shard_size="40KB")
    assert written, "the failure must happen mid-save, after a shard was written"
    assert _listing(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10"]


def test_save_replaces_existing_destination(source, tmp_path):
    model = fastune.from_pretrained(source[1])
    dest = tmp_path / "step_10"
    dest.mkdir()
    (dest / "stale.safetensors").write_bytes(b"old")
    fastune.save_pretrained(model, dest, max_shard_size="40KB")
    assert not (dest / "stale.safetensors").exists()
    assert (dest / "model.safetensors.index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10"]
