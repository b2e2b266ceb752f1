"""`fastune export gguf`: read the files back with the gguf package and compare with
the Hugging Face weights and config (tiny random Llama, Mistral and Qwen2 checkpoints
written by transformers, and the demo model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny_hf import build_hf_model
from train_helpers import DEMO_TOKENIZER, save_base, single_thread  # noqa: F401 (autouse fixture)

import fastune
from fastune.cli import main
from fastune.export.gguf import FAMILIES, export_gguf, from_interleaved, to_interleaved
from fastune.export.gguf_vocab import _LLAMA3_REGEX, _QWEN2_REGEX, _pre_tokenizer

DEMO_MODEL = Path(fastune.__file__).parent / "assets" / "demo" / "base_model"
N_VOCAB = 384  # the demo tokenizer's 365 tokens, padded: llama.cpp needs one token per embedding row
Q_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k"}


def build_checkpoint(variant: str, out: Path, **config) -> Path:
    """A tiny random HF checkpoint of ``variant`` (tiny_hf's variants, ``config`` overriding
    its keys) with the demo tokenizer, its vocabulary padded to ``N_VOCAB``."""
    return save_base(build_hf_model(variant, vocab_size=N_VOCAB, **config), out)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cache = {"demo": DEMO_MODEL}

    def get(variant: str) -> Path:
        if variant not in cache:
            cache[variant] = build_checkpoint(variant, tmp_path_factory.mktemp(variant))
        return cache[variant]

    return get


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def tensors(reader: gguf.GGUFReader) -> dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType, np.ndarray]]:
    """GGUF name -> (values as float32 in [rows, cols] order, type, raw data)."""
    return {t.name: (np.array(gguf.quants.dequantize(t.data, t.tensor_type)), t.tensor_type, t.data)
            for t in reader.tensors}


def expected_name(hf_key: str) -> str:
    """The llama.cpp name, spelled out here independently of the exporter's table."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_key in names:
        return names[hf_key]
    _, _, layer, *rest = hf_key.split(".")
    module = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}[".".join(rest[:-1])]
    return f"blk.{layer}.{module}.{rest[-1]}"


def unpermuted(values: np.ndarray, hf_key: str, config: dict) -> torch.Tensor:
    """Undo the documented Q/K row reordering of the llama architecture."""
    t = torch.from_numpy(np.array(values))
    module = hf_key.split(".")[-2]
    if config["model_type"] in ("llama", "mistral") and module in Q_NAMES:
        heads = config["num_attention_heads"] if module == "q_proj" else config["num_key_value_heads"]
        t = from_interleaved(t, heads)
    return t


@pytest.mark.parametrize("variant,out_type", [
    ("llama_gqa_llama3", "f16"), ("llama_gqa_llama3", "bf16"), ("llama_gqa_llama3", "f32"),
    ("qwen2_bias", "f16"), ("mistral", "bf16"), ("llama_tied", "f16"), ("llama_head_dim", "f32"),
    ("demo", "f16"), ("demo", "bf16"),
])
def test_tensors_equal_the_hf_weights(checkpoint, tmp_path, variant, out_type):
    ckpt = checkpoint(variant)
    config = json.loads((ckpt / "config.json").read_text())
    hf = load_file(ckpt / "model.safetensors")
    export_gguf(ckpt, tmp_path / "m.gguf", out_type)
    got = tensors(gguf.GGUFReader(tmp_path / "m.gguf"))
    matrix_type = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[out_type]
    names = {expected_name(k) for k in hf if not (config["tie_word_embeddings"] and k == "lm_head.weight")}
    assert set(got) - {"rope_freqs.weight"} == names
    assert ("output.weight" in got) == (not config["tie_word_embeddings"])
    for key, weight in hf.items():
        if config["tie_word_embeddings"] and key == "lm_head.weight":
            continue
        values, qtype, _ = got[expected_name(key)]
        want = weight.to(matrix_type if weight.dim() == 2 else torch.float32).float()
        assert qtype.name == ({torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}[
            matrix_type] if weight.dim() == 2 else "F32"), key
        assert torch.equal(unpermuted(values, key, config), want), key


def test_progress_reports_every_tensor(tmp_path):
    calls = []
    result = export_gguf(DEMO_MODEL, tmp_path / "m.gguf", "f16", progress=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == list(range(1, len(result.tensor_types) + 1))
    assert {c[1] for c in calls} == {len(result.tensor_types)}
    assert [c[2] for c in calls] == list(result.tensor_types)


def test_sharded_checkpoint_exports_the_same_tensors(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = checkpoint("qwen2_bias")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(ckpt).save_pretrained(sharded, max_shard_size="40KB")
    for f in DEMO_TOKENIZER.iterdir():
        shutil.copy2(f, sharded / f.name)
    assert (sharded / "model.safetensors.index.json").is_file()
    export_gguf(ckpt, tmp_path / "one.gguf", "f16")
    export_gguf(sharded, tmp_path / "sharded.gguf", "f16")
    one, many = (tensors(gguf.GGUFReader(tmp_path / f)) for f in ("one.gguf", "sharded.gguf"))
    assert list(one) == list(many)
    assert all(np.array_equal(one[k][0], many[k][0]) for k in one)


@pytest.mark.parametrize("out_type,scale_error", [("q8_0", 0.5), ("q4_0", 1.0)])
def test_quantized_tensors_within_the_format_error(checkpoint, tmp_path, out_type, scale_error):
    """Each block of 32 values has one fp16 scale d: q8_0 rounds to the nearest step
    (error <= d/2), q4_0 may clip the extreme opposite to the block's max (<= d). Rounding
    d itself to fp16 adds up to 8 (q4_0) or 127 (q8_0) steps of 2^-11 d, under max|x|/1024."""
    ckpt = checkpoint("llama_gqa_llama3")
    config = json.loads((ckpt / "config.json").read_text())
    hf = load_file(ckpt / "model.safetensors")
    export_gguf(ckpt, tmp_path / "m.gguf", out_type)
    got = tensors(gguf.GGUFReader(tmp_path / "m.gguf"))
    qtype = gguf.GGMLQuantizationType[out_type.upper()]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    quantized = 0
    for key, weight in hf.items():
        values, got_type, raw = got[expected_name(key)]
        want = weight.float()
        if weight.dim() == 1 or weight.shape[1] % block:  # norms stay f32; 80-wide rows fall back to f16
            assert got_type.name == ("F32" if weight.dim() == 1 else "F16"), key
            assert torch.equal(unpermuted(values, key, config), want.to(torch.float16 if weight.dim() == 2
                                                                         else torch.float32).float()), key
            continue
        quantized += 1
        assert got_type == qtype, key
        # Blocks run along rows and the permutation moves whole rows: undo it on the scales too.
        scales = raw.reshape(-1, type_size)[:, :2].copy().view(np.float16).astype(np.float32)
        scales = unpermuted(scales.reshape(weight.shape[0], -1), key, config).reshape(-1)
        error = (unpermuted(values, key, config) - want).abs().reshape(-1, block).amax(1)
        bound = scale_error * scales.abs() + want.abs().reshape(-1, block).amax(1) / 1024
        assert (error <= bound).all(), key
        assert error.max() > 0  # really quantized
    assert quantized == 2 * 6 + 2  # q/k/v/o/gate/up per layer, embeddings and output


@pytest.mark.parametrize("variant", ["llama_gqa_llama3", "qwen2_bias", "mistral", "llama_linear_rope"])
def test_metadata(checkpoint, tmp_path, variant):
    ckpt = checkpoint(variant)
    config = json.loads((ckpt / "config.json").read_text())
    export_gguf(ckpt, tmp_path / "m.gguf", "q8_0")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    arch = "qwen2" if variant.startswith("qwen2") else "llama"
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rope = config.get("rope_parameters") or config
    assert field(r, "general.architecture") == arch
    assert field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    expected = {
        "context_length": config["max_position_embeddings"], "embedding_length": config["hidden_size"],
        "block_count": config["num_hidden_layers"], "feed_forward_length": config["intermediate_size"],
        "attention.head_count": config["num_attention_heads"],
        "attention.head_count_kv": config["num_key_value_heads"], "rope.dimension_count": head_dim,
        "attention.key_length": head_dim, "vocab_size": N_VOCAB,
    }
    for key, value in expected.items():
        assert field(r, f"{arch}.{key}") == value, key
    assert field(r, f"{arch}.rope.freq_base") == pytest.approx(rope["rope_theta"])
    assert field(r, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    tokenizer_config = json.loads((DEMO_TOKENIZER / "tokenizer_config.json").read_text())
    assert field(r, "tokenizer.chat_template") == tokenizer_config["chat_template"]
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "smollm"  # the demo's: single digits, then GPT-2's regex
    assert (field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id")) == (0, 3)
    assert field(r, "tokenizer.ggml.add_bos_token") is True
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == N_VOCAB
    assert tokens[3] == "<|eot_id|>" and types[3] == gguf.TokenType.CONTROL
    assert tokens[-1] == f"[PAD{N_VOCAB - 1}]" and types[-1] == gguf.TokenType.UNUSED
    assert types[100] == gguf.TokenType.NORMAL
    if variant == "llama_linear_rope":
        assert field(r, "llama.rope.scaling.type") == "linear"
        assert field(r, "llama.rope.scaling.factor") == pytest.approx(4.0)
    else:
        assert "llama.rope.scaling.type" not in r.fields


def test_llama3_rope_scaling_is_a_rope_freqs_tensor(checkpoint, tmp_path):
    """llama.cpp divides each frequency by rope_freqs; the result must be transformers' scaled one."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ckpt = checkpoint("llama_gqa_llama3")
    export_gguf(ckpt, tmp_path / "m.gguf", "f16")
    factors = torch.from_numpy(tensors(gguf.GGUFReader(tmp_path / "m.gguf"))["rope_freqs.weight"][0])
    config = LlamaConfig.from_pretrained(ckpt)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = config.hidden_size // config.num_attention_heads
    base = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    torch.testing.assert_close(base / factors, scaled.float(), rtol=1e-6, atol=0)
    assert factors.min() == 1.0 and factors.max() == 8.0  # all three bands present


def _rope_half(x: torch.Tensor, pos: float, theta: float) -> torch.Tensor:
    """HF's rotation of one head: dims i and i + D/2 rotate together."""
    d = x.shape[-1]
    angle = pos / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)


def _rope_adjacent(x: torch.Tensor, pos: float, theta: float) -> torch.Tensor:
    """llama.cpp's NORM rotation: dims 2i and 2i+1 rotate together."""
    d = x.shape[-1]
    angle = pos / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()
    return out


def test_permuted_qk_give_llama_cpp_the_same_attention_scores():
    """q.k under HF's rotation with the original weights equals q.k under llama.cpp's
    rotation with the permuted ones (and the permutation round-trips)."""
    torch.manual_seed(0)
    heads, kv_heads, head_dim, hidden = 4, 2, 8, 12
    wq = torch.randn(heads * head_dim, hidden, dtype=torch.float64)
    wk = torch.randn(kv_heads * head_dim, hidden, dtype=torch.float64)
    x1, x2 = torch.randn(hidden, dtype=torch.float64), torch.randn(hidden, dtype=torch.float64)

    def scores(wq, wk, rope):
        q = rope((wq @ x1).view(heads, head_dim), 7.0, 10000.0)
        k = rope((wk @ x2).view(kv_heads, head_dim), 3.0, 10000.0).repeat_interleave(heads // kv_heads, 0)
        return (q * k).sum(-1)

    hf = scores(wq, wk, _rope_half)
    ours = scores(to_interleaved(wq, heads), to_interleaved(wk, kv_heads), _rope_adjacent)
    torch.testing.assert_close(ours, hf, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(scores(wq, wk, _rope_adjacent), hf)  # without the permutation it differs
    assert torch.equal(from_interleaved(to_interleaved(wq, heads), heads), wq)


def test_pre_tokenizer_names():
    def split(regex):
        return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    cases = {
        "llama-bpe": {"type": "Sequence", "pretokenizers": [split(_LLAMA3_REGEX), byte_level]},
        "qwen2": {"type": "Sequence", "pretokenizers": [split(_QWEN2_REGEX), byte_level]},
        "gpt-2": {**byte_level, "use_regex": True},
        "smollm": json.loads((DEMO_TOKENIZER / "tokenizer.json").read_text())["pre_tokenizer"],
    }
    for name, pre in cases.items():
        assert _pre_tokenizer({"pre_tokenizer": pre}, Path("t.json")) == (name, None)
    name, warning = _pre_tokenizer({"pre_tokenizer": {"type": "Whitespace"}}, Path("t.json"))
    assert name == "default" and "t.json" in warning


def test_cli_lists_every_type():
    from fastune.export.cli import _TYPES_HELP
    from fastune.export.gguf import TYPES

    assert sorted(_TYPES_HELP.split(", ")) == sorted(TYPES)


def test_family_table():
    assert {k: (gguf.MODEL_ARCH_NAMES[f.arch], f.permute_qk) for k, f in FAMILIES.items()} == {
        "llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False),
        "phi3": ("phi3", False), "gemma2": ("gemma2", False), "gemma3_text": ("gemma3", False)}


def test_sentencepiece_tokenizer(tmp_path, checkpoint):
    """A Llama 2 style tokenizer.model: the "llama" tokenizer with sentencepiece's pieces and scores."""
    import sentencepiece as spm

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint("llama_mha"), ckpt)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / name).unlink()
    text = ["The quick brown fox jumps over the lazy dog.", "Numbers 1234 and 3.14; it's fine."] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(ckpt / "tokenizer"), vocab_size=300, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    export_gguf(ckpt, tmp_path / "m.gguf", "f16")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    processor = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    tokens, scores = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.scores")
    assert field(r, "tokenizer.ggml.model") == "llama"
    assert tokens[:300] == [processor.id_to_piece(i) for i in range(300)]
    assert scores[:300] == pytest.approx([processor.get_score(i) for i in range(300)])
    assert field(r, "tokenizer.ggml.token_type")[3] == gguf.TokenType.BYTE  # <0x00>
    assert (field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id")) == (1, 2)
    assert field(r, "tokenizer.ggml.add_bos_token") is True


def test_lora_adapter_only_checkpoint_is_merged_first(tmp_path):
    """What save_adapter_weights_only leaves (config, tokenizer, adapter/): the export
    holds base + adapter merged."""
    from fastune.checkpoint.peft import save_peft_adapter
    from fastune.modules.peft import apply_lora, merge_lora

    model = fastune.from_pretrained(DEMO_MODEL, dtype="bfloat16")
    apply_lora(model, ["q_proj", "down_proj"], rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ckpt = tmp_path / "run" / "epoch_0"
    save_peft_adapter(model, ckpt / "adapter", base_model_name_or_path=str(DEMO_MODEL))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(DEMO_MODEL / name, ckpt / name)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    export_gguf(tmp_path / "run", tmp_path / "m.gguf", "bf16")  # the run's output_dir: its latest checkpoint
    got = tensors(gguf.GGUFReader(tmp_path / "m.gguf"))
    merged = merge_lora(model)
    q = merged["layers.1.self_attn.q_proj.weight"]
    assert not torch.equal(q, load_file(DEMO_MODEL / "model.safetensors")["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(from_interleaved(torch.from_numpy(got["blk.1.attn_q.weight"][0]), 6), q.float())
    assert torch.equal(torch.from_numpy(got["blk.1.ffn_down.weight"][0]),
                       merged["layers.1.mlp.down_proj.weight"].float())


def test_an_adapter_only_checkpoint_of_the_current_layout_is_merged_first(tmp_path):
    """save_adapter_weights_only now leaves the adapter at the checkpoint's top and no
    config.json: the export reads the base model the adapter names, merged in fp32."""
    from fastune.checkpoint.peft import save_peft_adapter
    from fastune.modules.peft import apply_lora, merge_lora

    model = fastune.from_pretrained(DEMO_MODEL, dtype="float32")
    apply_lora(model, ["q_proj", "down_proj"], rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ckpt = tmp_path / "run" / "epoch_0"
    save_peft_adapter(model, ckpt, base_model_name_or_path=str(DEMO_MODEL))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(DEMO_MODEL / name, ckpt / name)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    got = tensors(gguf.GGUFReader(tmp_path / "m.gguf"))
    merged = merge_lora(model)
    assert torch.equal(torch.from_numpy(got["blk.1.ffn_down.weight"][0]), merged["layers.1.mlp.down_proj.weight"])


def _cli(*args):
    result = CliRunner().invoke(main, ["export", "gguf", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def test_cli_writes_the_demo_model_and_a_modelfile(tmp_path):
    out = tmp_path / "demo.gguf"
    code, stdout, stderr = _cli(DEMO_MODEL, out, "--type", "Q8_0", "--ollama")
    assert code == 0, stderr
    assert f"wrote {out}: q8_0, arch llama, 38 tensors" in stdout and "Modelfile" in stdout
    assert stderr == ""  # no noise from the gguf package
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./demo.gguf\n")
    assert 'PARAMETER stop "<|eot_id|>"' in modelfile
    assert '{{ if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}' in modelfile
    assert "<|begin_of_text|>" not in modelfile  # llama.cpp adds bos itself (add_bos_token)
    code, _, stderr = _cli(DEMO_MODEL, tmp_path / "other.gguf", "--ollama")  # would replace the Modelfile
    assert code == 2 and "Modelfile exists; pass --force" in stderr and not (tmp_path / "other.gguf").exists()


def test_modelfile_template_only_when_ollama_can_express_it(tmp_path):
    """The demo's (Llama 3) template translates; Llama 2's, which folds the system
    message into the first user turn, does not (then Ollama reads the GGUF's template)."""
    from fastune.data import load_tokenizer
    from fastune.export.ollama import _SAMPLES, _render_go, modelfile_template

    tok = load_tokenizer(DEMO_TOKENIZER)
    assert modelfile_template(tok) is not None
    config = json.loads((DEMO_TOKENIZER / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}"
        "{% elif m['role'] == 'user' %}{{ bos_token + '[INST] ' }}{% if loop.index0 == 1 %}"
        "{{ '<<SYS>>' + messages[0]['content'] + '<</SYS>>' }}{% endif %}{{ m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
    shutil.copy2(DEMO_TOKENIZER / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert modelfile_template(load_tokenizer(tmp_path)) is None
    assert _render_go is not None and len(_SAMPLES) == 4


@pytest.mark.parametrize("case", ["type", "missing", "model_type", "quantized", "corrupt", "exists"])
def test_cli_errors_are_one_line_with_exit_2(tmp_path, case):
    out = tmp_path / "m.gguf"
    ckpt = DEMO_MODEL
    args = []
    if case == "type":
        args = ["--type", "q3_k"]
    elif case == "missing":
        ckpt = tmp_path / "nope"
    elif case == "model_type":
        ckpt = tmp_path / "gpt2"
        ckpt.mkdir()
        (ckpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    elif case == "quantized":
        ckpt = tmp_path / "int8"
        ckpt.mkdir()
        config = json.loads((DEMO_MODEL / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "torchao"}}))
    elif case == "corrupt":
        ckpt = tmp_path / "corrupt"
        ckpt.mkdir()
        shutil.copy2(DEMO_MODEL / "config.json", ckpt / "config.json")
        (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    else:
        out.write_bytes(b"keep me")
    code, stdout, stderr = _cli(ckpt, out, *args)
    assert code == 2, stdout
    assert stderr.count("\n") == 1 and stderr.startswith("error: ")
    expected = {"type": "'q3_k'", "missing": "no such directory", "model_type": "'gpt2'", "quantized": "quantized",
                "corrupt": "unreadable weights", "exists": "--force"}[case]
    assert expected in stderr
    if case == "exists":
        assert out.read_bytes() == b"keep me"
        assert _cli(ckpt, out, "--force")[0] == 0
        assert out.read_bytes()[:4] == b"GGUF"
    else:
        assert not out.exists()


def llama_cpp_forward(path: Path, tokens: list[int]) -> torch.Tensor:
    """Logits of the GGUF file computed the way llama.cpp's llama and qwen2 graphs do
    (written from llama.cpp's semantics, not from fastune's modules): the "llama"
    architecture rotates adjacent pairs (rope NORM), "qwen2" the two halves (NEOX);
    each frequency is divided by rope_freqs when the file has it, and positions are
    scaled by 1/factor for linear scaling; output falls back to token_embd."""
    r = gguf.GGUFReader(path)
    arch = field(r, "general.architecture")
    hp = {k[len(arch) + 1:]: field(r, k) for k in r.fields if k.startswith(arch + ".")}
    w = {name: torch.from_numpy(values).double() for name, (values, _, _) in tensors(r).items()}
    n_head, n_kv, eps = hp["attention.head_count"], hp["attention.head_count_kv"], hp["attention.layer_norm_rms_epsilon"]
    d = hp["rope.dimension_count"]
    freqs = hp["rope.freq_base"] ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    if "rope_freqs.weight" in w:
        freqs = freqs / w["rope_freqs.weight"]
    scale = 1.0 / hp["rope.scaling.factor"] if hp.get("rope.scaling.type") == "linear" else 1.0
    angles = torch.arange(len(tokens), dtype=torch.float64)[:, None] * scale * freqs  # [S, d/2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]

    def rope(x):  # x [S, H, d]
        if arch == "llama":
            a, b = x[..., 0::2], x[..., 1::2]
            out = torch.empty_like(x)
            out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
            return out
        a, b = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    def norm(x, weight):
        return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight

    def linear(x, name):
        return x @ w[name + ".weight"].T + w.get(name + ".bias", 0)

    x = w["token_embd.weight"][tokens]
    causal = torch.full((len(tokens), len(tokens)), float("-inf")).triu(1).double()
    for i in range(hp["block_count"]):
        h = norm(x, w[f"blk.{i}.attn_norm.weight"])
        q = rope(linear(h, f"blk.{i}.attn_q").view(len(tokens), n_head, d))
        k = rope(linear(h, f"blk.{i}.attn_k").view(len(tokens), n_kv, d)).repeat_interleave(n_head // n_kv, 1)
        v = linear(h, f"blk.{i}.attn_v").view(len(tokens), n_kv, d).repeat_interleave(n_head // n_kv, 1)
        scores = torch.einsum("shd,thd->hst", q, k) / d ** 0.5 + causal
        attn = torch.einsum("hst,thd->shd", scores.softmax(-1), v).reshape(len(tokens), -1)
        x = x + linear(attn, f"blk.{i}.attn_output")
        h = norm(x, w[f"blk.{i}.ffn_norm.weight"])
        x = x + linear(torch.nn.functional.silu(linear(h, f"blk.{i}.ffn_gate")) * linear(h, f"blk.{i}.ffn_up"),
                       f"blk.{i}.ffn_down")
    return norm(x, w["output_norm.weight"]) @ w.get("output.weight", w["token_embd.weight"]).T


@pytest.mark.parametrize("variant", ["llama_gqa_llama3", "qwen2_bias", "mistral", "llama_linear_rope",
                                     "llama_tied", "llama_head_dim", "demo"])
def test_gguf_under_llama_cpp_semantics_gives_fastune_logits(checkpoint, tmp_path, variant):
    """End to end without llama.cpp itself: names, Q/K permutation, rope layout per
    architecture, rope_freqs and tied output, all at once."""
    ckpt = checkpoint(variant)
    export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    tokens = [0, 17, 5, 230, 99, 3, 41, 300, 8, 150, 64, 2]
    model = fastune.from_pretrained(ckpt, dtype="float32", use_kernels=False).eval()
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0].double()
    torch.testing.assert_close(llama_cpp_forward(tmp_path / "m.gguf", tokens), ours, rtol=1e-4, atol=1e-4)
