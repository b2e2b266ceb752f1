"""Model-family specs (registry, config dialects, state-dict adapter) and kernels
applied from outside (``apply_kernels``: per op, gated by the family's numerics,
recorded in one place)."""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import fastune
import fastune.models.spec as spec_module
from fastune.errors import ConfigError
from fastune.models.config import ModelConfig
from fastune.models.spec import (KERNEL_OPS, Fused, Numerics, StateDictAdapter, get_spec, register,
                                 supported_model_types)
from fastune.models.transformer import MLP, Attention, RMSNorm, Transformer
from fastune.modules.kernels import (FusedRMSNorm, FusedRoPEAttention, FusedSwiGLUMLP, apply_kernels,
                                     enabled_kernels)

ROOT = Path(fastune.__file__).parent
TINY = dict(vocab_size=37, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
            num_attention_heads=3, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5)
HF_TINY = {"vocab_size": 37, "hidden_size": 40, "intermediate_size": 56, "num_hidden_layers": 2,
           "num_attention_heads": 4}


def test_registry_and_unknown_model_type():
    assert {"llama", "mistral", "qwen2"} <= set(supported_model_types())
    with pytest.raises(ConfigError, match=r"^x/config.json: unsupported model_type 'gpt2'; "
                                          r"fastune supports llama, mistral, qwen2"):
        get_spec("gpt2", "x/config.json")


@pytest.mark.parametrize("model_type,arch", [("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
                                             ("qwen2", "Qwen2ForCausalLM")])
def test_architecture_and_bias_come_from_the_spec(model_type, arch):
    config = ModelConfig.from_hf_dict({**HF_TINY, "model_type": model_type})
    d = config.to_hf_dict()
    assert d["architectures"] == [arch] and d["hidden_act"] == "silu"
    assert config.attention_bias == (model_type == "qwen2")
    assert ("attention_bias" in d) == (model_type != "qwen2")


@pytest.mark.parametrize("d", [
    {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}},  # 4.x, old "type"
    {"rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},  # 4.x
    {"rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}},  # 5.x
], ids=["4.x-type", "4.x-rope_type", "5.x"])
def test_both_config_dialects(d):
    config = ModelConfig.from_hf_dict({**HF_TINY, **d})
    assert config.rope_theta == 5e5 and config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert config.head_dim == 10 and config.num_key_value_heads == 4


def test_lora_aliases_are_one_list_for_schema_and_peft():
    from fastune.config.schema import LORA_TARGETS
    from fastune.modules.peft import LORA_TARGETS as PEFT_TARGETS, TORCHTUNE_NAMES, normalize_targets

    from fastune.models.spec import all_lora_aliases, all_lora_targets

    spec = get_spec("llama")
    # One list of every family's names (llama's first), and each family's are in it.
    assert LORA_TARGETS.values == PEFT_TARGETS == all_lora_targets()
    assert PEFT_TARGETS[:len(spec.lora_targets)] == spec.lora_targets
    assert set(get_spec("phi3").lora_targets) <= set(PEFT_TARGETS)
    assert LORA_TARGETS.aliases == TORCHTUNE_NAMES == all_lora_aliases()
    assert spec.lora_aliases.items() <= TORCHTUNE_NAMES.items()
    assert normalize_targets(["output_proj", "output"]) == ("o_proj", "lm_head")
    assert LORA_TARGETS.check("output_proj", False) == "o_proj"
    assert spec.layer_projections == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_adapter_splits_fused_tensors_on_load_and_fuses_on_save():
    """A toy Phi-3-style adapter: HF's qkv_proj holds q, k and v stacked along dim 0."""
    config = ModelConfig(**TINY)
    qkv = Fused("self_attn.qkv_proj.weight",
                ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                lambda c: (c.num_attention_heads * c.head_dim,) + (c.num_key_value_heads * c.head_dim,) * 2)
    adapter = StateDictAdapter(fused=(qkv,))
    sd = Transformer(config).state_dict()
    hf = adapter.to_hf(sd, config)
    assert "model.layers.1.self_attn.qkv_proj.weight" in hf and "model.layers.1.self_attn.k_proj.weight" not in hf
    assert hf["model.layers.1.self_attn.qkv_proj.weight"].shape == (3 * 16 + 2 * 16, 40)
    layer0 = [k for k in hf if k.startswith("model.layers.0.self_attn")]
    assert layer0 == ["model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.self_attn.o_proj.weight"]
    assert "lm_head.weight" in hf
    back = {}
    for key, tensor in hf.items():
        back.update(adapter.from_hf(key, tensor, config))
    assert back.keys() == sd.keys()
    for key in sd:
        assert torch.equal(back[key], sd[key]), key
    # Shapes for load planning come from the same code on meta tensors.
    with torch.device("meta"):
        meta = adapter.to_hf(Transformer(config).state_dict(), config)
    assert {k: v.shape for k, v in meta.items()} == {k: v.shape for k, v in hf.items()}


# ----------------------------------------------------------------------------- apply_kernels


def _pair():
    torch.manual_seed(0)
    plain = Transformer(ModelConfig(**TINY))
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    fused = Transformer(ModelConfig(**TINY))
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def test_model_is_built_plain():
    model = Transformer(ModelConfig(**TINY))
    assert enabled_kernels(model) == ()
    assert type(model.norm) is RMSNorm and type(model.layers[0].mlp) is MLP
    assert type(model.layers[0].self_attn) is Attention


def test_one_op_swaps_only_that_op():
    _, model = _pair()
    assert apply_kernels(model, ["rope"]) == ("rope",) == enabled_kernels(model)
    assert all(type(layer.self_attn) is FusedRoPEAttention for layer in model.layers)
    assert type(model.norm) is RMSNorm and type(model.layers[0].mlp) is MLP
    assert apply_kernels(model, ["swiglu"]) == ("rope", "swiglu")  # a second call adds
    assert type(model.layers[1].mlp) is FusedSwiGLUMLP and type(model.layers[1].input_layernorm) is RMSNorm


def test_logits_and_state_dict_equal_with_all_and_none():
    plain, fused = _pair()
    assert apply_kernels(fused, "all") == KERNEL_OPS
    assert type(fused.norm) is FusedRMSNorm
    assert fused.state_dict().keys() == plain.state_dict().keys()
    tokens = torch.randint(0, 37, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fused(tokens), plain(tokens), rtol=1e-6, atol=1e-6)


def test_unknown_op_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"^kernels: unknown kernel op 'swiglue' \(did you mean 'swiglu'\?\)"):
        apply_kernels(Transformer(ModelConfig(**TINY)), ["swiglue"])


def test_fused_norm_computes_the_family_numerics(monkeypatch):
    """A family with Gemma's norm, (1 + w) * xhat in fp32, gets the fused RMSNorm with
    those numerics under apply_kernels (the kernel's constexpr variant)."""
    gemma_norm = Numerics(norm_weight_offset=1.0, norm_weight_in_fp32=True)
    monkeypatch.setattr(spec_module, "_REGISTRY", dict(spec_module._registry()))
    register(dataclasses.replace(get_spec("llama"), model_type="toy_gemma_norm", numerics=gemma_norm))
    config = ModelConfig(**TINY, model_type="toy_gemma_norm")
    model = Transformer(config)
    assert model.norm.numerics == gemma_norm
    x = torch.randn(3, 40)
    with torch.no_grad():
        model.norm.weight.normal_()
    want = ((1 + model.norm.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(model.norm(x), want)
    assert apply_kernels(model, "all") == KERNEL_OPS
    assert type(model.norm) is FusedRMSNorm and type(model.layers[0].post_attention_layernorm) is FusedRMSNorm
    assert type(model.layers[0].mlp) is FusedSwiGLUMLP
    torch.testing.assert_close(model.norm(x), want)


def _kernel_choice_writes(path: Path) -> list[int]:
    """Lines of ``path`` that assign the kernel record, or anything named use_kernels or
    kernels, on an object (attribute, setattr, dataclasses.replace keyword)."""
    names = ("use_kernels", "kernels", "fastune_kernels", "_RECORD")
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        attrs = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            attrs = [t.attr for t in targets if isinstance(t, ast.Attribute)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            attrs = [ast.unparse(a).strip("'\"") for a in node.args[1:2]]
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("replace"):
            attrs = [k.arg for k in node.keywords]
        if any(a in names for a in attrs):
            lines.append(node.lineno)
    return lines


def test_the_kernel_choice_is_written_in_one_place():
    """Only apply_kernels (fastune/modules/kernels.py) records which ops are on, and the
    model files know nothing of fused kernels: they import only reference formulas."""
    writers = {str(p.relative_to(ROOT.parent)): lines for p in sorted(ROOT.rglob("*.py"))
               if (lines := _kernel_choice_writes(p))}
    assert list(writers) == ["fastune/modules/kernels.py"] and len(writers["fastune/modules/kernels.py"]) == 1, writers
    for path in (ROOT / "models").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastune.kernels"):
                assert all(a.name.endswith("_reference") for a in node.names), (path.name, ast.unparse(node))
            if isinstance(node, ast.ImportFrom):
                assert node.module != "fastune.modules.kernels" and "kernels" not in [a.name for a in node.names]
        assert "use_kernels" not in path.read_text(), path.name


def test_the_scan_sees_a_second_writer(tmp_path):
    """The scan above can fail: each kind of write is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("config.use_kernels = True\nsetattr(model, 'fastune_kernels', ())\n"
                   "dataclasses.replace(c, use_kernels=False)\nm.kernels += ['rope']\n")
    assert sorted(_kernel_choice_writes(bad)) == [1, 2, 3, 4]


def test_loss_and_lora_read_the_record():
    from fastune.modules.lora import LoRALinear
    from fastune.modules.peft import apply_lora
    from fastune.training.loss import build_loss

    loss_cfg = {"chunk_size": None, "z_loss": 0.0, "label_smoothing": 0.0}
    plain, fused = _pair()
    apply_kernels(fused, ["loss", "lora"])
    assert build_loss(plain, loss_cfg).__name__ == "eager_loss"
    assert build_loss(fused, loss_cfg).__name__ == "fused_loss"
    with pytest.raises(ConfigError, match=r"^loss.z_loss: needs the loss kernel"):
        build_loss(plain, {**loss_cfg, "z_loss": 1e-4})
    hidden, labels = torch.randn(2, 7, 40), torch.randint(0, 37, (2, 7))
    want, got = build_loss(plain, loss_cfg)(hidden, labels), build_loss(fused, loss_cfg)(hidden, labels)
    torch.testing.assert_close(got[0], want[0])
    assert got[1] == want[1]
    apply_lora(fused, ["q_proj"], rank=2, alpha=4)
    apply_lora(plain, ["q_proj"], rank=2, alpha=4)
    assert fused.layers[0].self_attn.q_proj.fused and not plain.layers[0].self_attn.q_proj.fused
    apply_kernels(plain, ["lora"])  # after LoRA: the existing layers switch
    assert all(m.fused for m in plain.modules() if isinstance(m, LoRALinear))
