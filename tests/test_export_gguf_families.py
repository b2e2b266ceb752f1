"""`fastune export gguf` of the families past Llama and Qwen2 (Qwen3, Phi-3, Gemma 2,
Gemma 3): read the files back with the gguf package and compare with the Hugging Face
weights and config.json, after the documented transforms (Gemma's norms +1, Gemma's Q
scale fold). llama.cpp itself runs them in tests/test_export_gguf_llamacpp.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_hf import YARN
from test_export_gguf import build_checkpoint as build_variant_checkpoint
from train_helpers import save_base, single_thread  # noqa: F401 (autouse fixture)

from fastune.export.gguf import GGUFExportError, export_gguf

# name -> (tiny_hf variant, overrides). Gemma 3 with 6 layers: llama.cpp's fixed pattern of five
# sliding layers then one full one (tiny_hf's 2-layer gemma3 alternates, which llama.cpp cannot run).
CASES = {
    "qwen3": ("qwen3", {}),
    "qwen3_tied": ("qwen3_tied", {}),
    "phi3": ("phi3", {}),
    "phi3_longrope": ("phi3_longrope", {}),
    "phi4_mini": ("phi4_mini", {}),
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3", dict(num_hidden_layers=6, layer_types=None)),
}
FAMILY_CASES = list(CASES)
# YaRN as llama.cpp applies it (whole-dim ramp ends, default attention factor), and as it does not.
CASES.update({"llama_yarn": ("llama_yarn", {}), "qwen2_yarn": ("qwen2_yarn_mscale", dict(rope_scaling=YARN)),
              "qwen2_yarn_mscale": ("qwen2_yarn_mscale", {})})
ARCH = {"qwen3": "qwen3", "phi3": "phi3", "gemma2": "gemma2", "gemma3": "gemma3"}
GEMMA_NAMES = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"}
LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "self_attn.qkv_proj": "attn_qkv", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def build_checkpoint(case: str, out: Path) -> Path:
    """A tiny random HF checkpoint of ``case`` with the demo tokenizer, in a folder whose
    name says nothing of the family (llama.cpp special-cases Phi-3 by general.name)."""
    variant, config = CASES[case]
    return build_variant_checkpoint(variant, out, **config)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cache = {}

    def get(case: str) -> Path:
        if case not in cache:
            cache[case] = build_checkpoint(case, tmp_path_factory.mktemp("tiny"))
        return cache[case]

    return get


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def tensors(reader: gguf.GGUFReader) -> dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]:
    return {t.name: (np.array(gguf.quants.dequantize(t.data, t.tensor_type)), t.tensor_type) for t in reader.tensors}


def expected_name(hf_key: str, gemma: bool) -> str:
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_key in names:
        return names[hf_key]
    _, _, layer, *rest = hf_key.split(".")
    module = ".".join(rest[:-1])
    name = GEMMA_NAMES[module] if gemma and module in GEMMA_NAMES else LAYER_NAMES[module]
    return f"blk.{layer}.{name}.{rest[-1]}"


def expected_values(hf_key: str, weight: torch.Tensor, config: dict) -> torch.Tensor:
    """The documented transforms: Gemma's (1 + w) norms stored as 1 + w, and Gemma's
    query_pre_attn_scalar folded into Q (its per-head norm in Gemma 3): llama.cpp scales
    scores by 1/sqrt(head_dim), here sqrt(head_dim / query_pre_attn_scalar) times too little."""
    w = weight.float()
    if not config["model_type"].startswith("gemma"):
        return w
    if hf_key.endswith("norm.weight"):
        w = w + 1
    q_module = "self_attn.q_norm" if config["model_type"] == "gemma3_text" else "self_attn.q_proj"
    if f".{q_module}." in hf_key:
        w = w * math.sqrt(config["head_dim"] / config["query_pre_attn_scalar"])
    return w


@pytest.mark.parametrize("case,out_type", [(c, t) for c in FAMILY_CASES for t in ("f32", "f16")])
def test_tensors_equal_the_hf_weights(checkpoint, tmp_path, case, out_type):
    ckpt = checkpoint(case)
    config = json.loads((ckpt / "config.json").read_text())
    hf = load_file(ckpt / "model.safetensors")
    tied = config["tie_word_embeddings"]
    export_gguf(ckpt, tmp_path / "m.gguf", out_type)
    got = tensors(gguf.GGUFReader(tmp_path / "m.gguf"))
    gemma = config["model_type"].startswith("gemma")
    names = {expected_name(k, gemma) for k in hf if not (tied and k == "lm_head.weight")}
    assert set(got) - {"rope_factors_long.weight", "rope_factors_short.weight"} == names
    assert ("output.weight" in got) == (not tied)
    for key, weight in hf.items():
        if tied and key == "lm_head.weight":
            continue
        values, qtype = got[expected_name(key, gemma)]
        want = expected_values(key, weight, config)
        if weight.dim() == 2 and out_type == "f16":
            want = want.half().float()
        assert qtype.name == ("F16" if weight.dim() == 2 and out_type == "f16" else "F32"), key
        assert torch.equal(torch.from_numpy(values), want), key


def _exported(checkpoint, tmp_path, case):
    ckpt = checkpoint(case)
    config = json.loads((ckpt / "config.json").read_text())
    result = export_gguf(ckpt, tmp_path / "m.gguf", "f16")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    arch = field(r, "general.architecture")
    return config, result, r, arch, {k[len(arch) + 1:]: field(r, k) for k in r.fields if k.startswith(arch + ".")}


@pytest.mark.parametrize("case", ["qwen3", "qwen3_tied"])
def test_qwen3_metadata(checkpoint, tmp_path, case):
    config, result, r, arch, hp = _exported(checkpoint, tmp_path, case)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    assert arch == "qwen3"
    assert hp["attention.key_length"] == hp["attention.value_length"] == hp["rope.dimension_count"] == head_dim
    assert hp["rope.freq_base"] == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert "rope.scaling.type" not in hp
    # llama.cpp's qwen3 graph never slides: the one sliding config says so.
    assert bool(result.warnings) == (case == "qwen3")


@pytest.mark.parametrize("case", ["phi3", "phi3_longrope", "phi4_mini"])
def test_phi3_metadata_and_longrope_tensors(checkpoint, tmp_path, case):
    config, _, r, arch, hp = _exported(checkpoint, tmp_path, case)
    rope = config["rope_parameters"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert arch == "phi3"
    assert hp["rope.dimension_count"] == int(head_dim * config.get("partial_rotary_factor", 1.0))
    assert hp["context_length"] == 256 and hp["rope.scaling.original_context_length"] == 32
    assert hp["attention.sliding_window"] == 0
    got = tensors(r)
    if rope.get("rope_type") == "longrope":
        # transformers' LongRoPE attention factor for a context extended 256 / 32 = 8 times
        assert hp["rope.scaling.attn_factor"] == pytest.approx(math.sqrt(1 + math.log(8) / math.log(32)))
        assert got["rope_factors_long.weight"][0].tolist() == pytest.approx(rope["long_factor"])
        assert got["rope_factors_short.weight"][0].tolist() == pytest.approx(rope["short_factor"])
        assert len(rope["long_factor"]) == hp["rope.dimension_count"] // 2
    else:
        assert "rope.scaling.attn_factor" not in hp and "rope_factors_long.weight" not in got


@pytest.mark.parametrize("case", ["gemma2", "gemma3"])
def test_gemma_metadata(checkpoint, tmp_path, case):
    config, _, r, arch, hp = _exported(checkpoint, tmp_path, case)
    assert arch == case
    assert hp["attention.key_length"] == hp["attention.value_length"] == config["head_dim"]
    assert hp["attention.sliding_window"] == config["sliding_window"]
    assert "output.weight" not in {t.name for t in r.tensors}
    rope = config["rope_parameters"]
    if case == "gemma2":
        assert hp["attn_logit_softcapping"] == pytest.approx(4.0)
        assert hp["final_logit_softcapping"] == pytest.approx(3.0)
        assert hp["rope.freq_base"] == pytest.approx(rope["rope_theta"])
    else:
        assert "attn_logit_softcapping" not in hp and "final_logit_softcapping" not in hp
        assert hp["rope.freq_base"] == pytest.approx(rope["full_attention"]["rope_theta"])
        assert hp["rope.freq_base_swa"] == pytest.approx(rope["sliding_attention"]["rope_theta"])
        assert (hp["rope.scaling.type"], hp["rope.scaling.factor"]) == ("linear", pytest.approx(4.0))


def test_gemma3_layer_pattern_llama_cpp_cannot_run_is_refused(tmp_path):
    """llama.cpp slides on five layers of six; tiny_hf's gemma3 alternates."""
    CASES["gemma3_alternating"] = ("gemma3", {})
    try:
        ckpt = build_checkpoint("gemma3_alternating", tmp_path / "ckpt")
    finally:
        del CASES["gemma3_alternating"]
    with pytest.raises(GGUFExportError, match="fixes which layers slide"):
        export_gguf(ckpt, tmp_path / "m.gguf")


@pytest.mark.parametrize("case", ["llama_yarn", "qwen2_yarn"])
def test_yarn_metadata(checkpoint, tmp_path, case):
    config, _, r, arch, hp = _exported(checkpoint, tmp_path, case)
    rope = config["rope_parameters"]
    assert (hp["rope.scaling.type"], hp["rope.scaling.factor"]) == ("yarn", pytest.approx(rope["factor"]))
    assert hp["rope.scaling.original_context_length"] == rope["original_max_position_embeddings"]
    assert hp["rope.scaling.yarn_beta_fast"] == pytest.approx(rope["beta_fast"])
    assert hp["rope.scaling.yarn_beta_slow"] == pytest.approx(rope["beta_slow"])


def test_yarn_llama_cpp_cannot_apply_is_refused(checkpoint, tmp_path):
    """DeepSeek's mscale attention factor and an unrounded ramp: llama.cpp would rotate otherwise."""
    with pytest.raises(GGUFExportError, match="YaRN"):
        export_gguf(checkpoint("qwen2_yarn_mscale"), tmp_path / "m.gguf")


@pytest.mark.parametrize("layout", ["saved", "module_names"])
def test_multimodal_gemma3_exports_its_language_model(checkpoint, tmp_path, layout):
    """A Gemma3ForConditionalGeneration checkpoint (4.x's saved keys, or transformers 5's module
    names) whose language model is the text-only one: the same file but for general.name."""
    import transformers
    from test_gemma import as_module_names

    text_ckpt = checkpoint("gemma3")
    text = transformers.Gemma3TextConfig.from_pretrained(text_ckpt).to_dict()
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4, image_token_index=95,
        boi_token_index=93, eoi_token_index=94))
    language = {k.removeprefix("model."): v for k, v in load_file(text_ckpt / "model.safetensors").items()}
    model.model.language_model.load_state_dict(language)
    path = tmp_path / "mm"
    save_base(model, path)
    if layout == "module_names":
        as_module_names(path)
    export_gguf(path, tmp_path / "mm.gguf", "f16")
    export_gguf(text_ckpt, tmp_path / "text.gguf", "f16")
    got, want = gguf.GGUFReader(tmp_path / "mm.gguf"), gguf.GGUFReader(tmp_path / "text.gguf")
    assert [t.name for t in got.tensors] == [t.name for t in want.tensors]
    for a, b in zip(got.tensors, want.tensors):
        assert np.array_equal(a.data, b.data), a.name
    assert field(got, "gemma3.attention.sliding_window") == field(want, "gemma3.attention.sliding_window")
