"""LoRA variants against Hugging Face PEFT: rsLoRA, PiSSA, OLoRA and LoftQ
initializations, LoRA+ learning rates.

Each variant's adapter, written by fastune, loads in PEFT on the original base model
with the same logits; PiSSA/OLoRA start from the same A, B and residual weight as
PEFT's on the same weights, and are written exactly as PEFT writes them with
``path_initial_model_for_weight_conversion``. The LoRA layers run the fused LoRA op
(``kernels="all"``, its reference formula on CPU) unless a test says otherwise.
"""

from __future__ import annotations

import copy
import inspect
import json
import textwrap
import types

import pytest
import torch
from safetensors.torch import load_file
from tiny_hf import build_hf_model, random_tokens, save_hf_model

import fastune
from fastune.checkpoint.peft import load_peft_adapter, save_peft_adapter
from fastune.modules.lora import LoRAError, LoRALinear
from fastune.modules.peft import apply_lora, merge_lora
from fastune.training.optim import build_optimizer

peft = pytest.importorskip("peft")

ATOL = 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    hf = build_hf_model("llama_gqa_llama3")
    return hf, save_hf_model(hf, tmp_path_factory.mktemp("base"))


def peft_model(hf, **config):
    return peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=RANK, lora_alpha=ALPHA,
                                                                   target_modules=TARGETS, **config))


def fastune_model(path, kernels="all", **lora):
    model = fastune.from_pretrained(path, kernels=kernels)
    apply_lora(model, TARGETS, rank=RANK, alpha=ALPHA, **lora)
    return model


def perturb(model, seed=3):
    """'Training': the same change to every adapter matrix, whatever the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def adapters(model):
    """Adapter and base weights by fastune key, for a fastune or a PEFT model."""
    out = {}
    for key, value in model.state_dict().items():
        key = key.removeprefix("base_model.model.").removeprefix("model.").replace(".default", "")
        out[key.replace(".base_layer.", ".")] = value
    return out


def assert_same_model_elsewhere(model, peft_base, adapter_dir, path, resumed):
    """The trained ``model``'s logits from PEFT with its adapter over ``peft_base``, from
    the merged export, and from ``resumed`` (a fresh model of the same settings) after
    loading the adapter."""
    tokens = random_tokens(2, 11)
    loaded = peft.PeftModel.from_pretrained(peft_base, adapter_dir).eval()
    load_peft_adapter(resumed, adapter_dir)
    merged = fastune.from_pretrained(path)
    merged.load_state_dict(merge_lora(model))
    with torch.no_grad():
        expected = model(tokens)
        torch.testing.assert_close(loaded(input_ids=tokens).logits, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(merged(tokens), expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(resumed(tokens), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kernels", ["all", "none"])
def test_rslora_matches_peft_and_its_adapter_loads_in_peft(base, tmp_path, kernels):
    hf, path = base
    reference = peft_model(hf, use_rslora=True)
    perturb(reference)
    model = fastune_model(path, kernels, use_rslora=True)
    ours = adapters(model)
    with torch.no_grad():
        for key, value in adapters(reference).items():
            if "lora_" in key:
                ours[key].copy_(value)
    assert model.layers[0].self_attn.q_proj.scale == pytest.approx(ALPHA / RANK**0.5)
    tokens = random_tokens(2, 11)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(input_ids=tokens).logits, atol=ATOL, rtol=0)
    save_peft_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_rslora"] is True
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), loaded(input_ids=tokens).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_init_equal_peft_and_export_as_peft_converts(base, tmp_path, init, use_rslora):
    hf, path = base
    reference = peft_model(hf, init_lora_weights=init, use_rslora=use_rslora)
    reference.save_pretrained(tmp_path / "peft_initial")  # PEFT's conversion needs the initial adapter
    model = fastune_model(path, init=init, use_rslora=use_rslora)
    theirs, ours = adapters(reference), adapters(model)
    checked = 0
    for key, value in theirs.items():  # A0, B0 and the residual weights
        if key in ours and ("lora_" in key or any(f"{t}.weight" in key for t in TARGETS)):
            torch.testing.assert_close(ours[key], value, atol=ATOL, rtol=1e-5, msg=key)
            checked += 1
    assert checked == 2 * 3 * len(TARGETS)  # 2 layers x (A, B, W_res) x targets
    # An untouched init is the base model (y = W_res x + s B0 A0 x = W x).
    tokens = random_tokens(2, 11)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(input_ids=tokens).logits, atol=1e-4, rtol=0)

    perturb(model)
    perturb(reference)
    save_peft_adapter(model, tmp_path / "ours")
    reference.save_pretrained(tmp_path / "theirs",
                              path_initial_model_for_weight_conversion=str(tmp_path / "peft_initial"))
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
        assert config[key] == pytest.approx(peft_config[key]), key
    ours_t, theirs_t = load_file(tmp_path / "ours" / "adapter_model.safetensors"), \
        load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert set(ours_t) == set(theirs_t)
    for key in ours_t:
        torch.testing.assert_close(ours_t[key], theirs_t[key], atol=ATOL, rtol=1e-5, msg=key)

    # PEFT loads it on the original base model. A resumed run rebuilds W_res, A0, B0 from
    # W and takes A, B back from the file.
    resumed = fastune_model(path, init=init, use_rslora=use_rslora)
    assert_same_model_elsewhere(model, copy.deepcopy(hf), tmp_path / "ours", path, resumed)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_pissa_with_qlora_quantizes_the_residual():
    """QLoRA + PiSSA: the init is made on the dense weight, then W_res goes to NF4."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential()
    layer.q_proj = torch.nn.Linear(128, 128, bias=False)
    dense = layer.q_proj.weight.detach().clone()
    apply_lora(layer, ["q_proj"], rank=4, alpha=8, init="pissa", quantize_base=True)
    lora = layer.q_proj
    assert lora.quantized
    residual = lora.weight.get_original_weight()
    torch.testing.assert_close(residual + lora.scale * lora.lora_B.weight @ lora.lora_A.weight, dense,
                               atol=0.05, rtol=0)  # NF4 error on the residual only


class _TorchaoParams4bit:
    """Stands in for ``bitsandbytes.nn.Params4bit``: torchao's NF4, blocks of 64."""

    def __init__(self, data, requires_grad, compress_statistics, quant_type):
        assert quant_type == "nf4" and not requires_grad
        from torchao.quantization import to_nf4

        self.data, self.quant_state = to_nf4(data, 64, 256), None

    def to(self, device):
        return self


@pytest.fixture
def peft_loftq_on_torchao(monkeypatch):
    """PEFT's own ``loftq_init`` loop, run on CPU with torchao's NF4 as its quantizer.

    PEFT's LoftQ needs bitsandbytes and a CUDA or XPU device. Its source is run as it
    is, with its compute device set to the CPU and ``bitsandbytes`` answered by torchao,
    so the alternation, the SVD split and the assignment to A and B are PEFT's code."""
    from peft.tuners.lora import layer as lora_layer
    from peft.utils import loftq_utils

    source = inspect.getsource(loftq_utils.loftq_init)
    swaps = {'"xpu" if is_xpu_available() else "cuda"': '"cpu"', "import bitsandbytes as bnb": "pass"}
    for old, new in swaps.items():
        assert old in source, "PEFT's loftq_init changed: revisit this harness"
        source = source.replace(old, new)
    bnb = types.SimpleNamespace(
        nn=types.SimpleNamespace(Params4bit=_TorchaoParams4bit),
        functional=types.SimpleNamespace(dequantize_4bit=lambda data, state: data.get_original_weight()),
    )
    namespace = {**vars(loftq_utils), "bnb": bnb, "is_bnb_available": lambda: True, "is_bnb_4bit_available": lambda: True}
    exec(textwrap.dedent(source), namespace)
    monkeypatch.setattr(lora_layer, "loftq_init", namespace["loftq_init"])


@pytest.fixture(scope="module")
def nf4_base(tmp_path_factory):
    """Every decoder projection a multiple of 64 x 256 elements, as NF4 needs."""
    hf = build_hf_model("llama_gqa_llama3", hidden_size=256, intermediate_size=512)
    return hf, save_hf_model(hf, tmp_path_factory.mktemp("nf4_base"))


def test_loftq_init_equals_peft_and_its_adapter_loads_in_peft_over_the_nf4_base(
        nf4_base, peft_loftq_on_torchao, tmp_path, caplog):
    hf, path = nf4_base
    reference = peft_model(hf, init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=4))
    with caplog.at_level("WARNING"):
        model = fastune_model(path, init="loftq", quantize_base=True)
    assert "alpha = rank makes the start exact" in caplog.text  # s = 2 here
    theirs, ours = adapters(reference), adapters(model)
    checked = 0
    for key, value in theirs.items():  # A0, B0, and PEFT's base: the dequantized NF4(W)
        if key in ours and ("lora_" in key or any(f"{t}.weight" in key for t in TARGETS)):
            mine = ours[key].get_original_weight() if "lora_" not in key else ours[key]
            torch.testing.assert_close(mine, value, atol=ATOL, rtol=1e-5, msg=key)
            checked += 1
    assert checked == 2 * 3 * len(TARGETS)  # 2 layers x (A, B, base) x targets

    # The adapter is a plain LoRA over the NF4 base: PEFT loads it there (as it would on a
    # QLoRA load of the original checkpoint) and computes the trained model's logits.
    perturb(model)
    save_peft_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (RANK, True)
    nf4_hf = reference.unload()  # the HF model on PEFT's LoftQ base, deq(NF4(W))
    resumed = fastune_model(path, init="loftq", quantize_base=True)
    assert_same_model_elsewhere(model, nf4_hf, tmp_path / "ours", path, resumed)


def test_loftq_with_alpha_equal_to_rank_starts_at_the_nf4_error_rank_r_part(nf4_base):
    hf, path = nf4_base
    model = fastune.from_pretrained(path)
    apply_lora(model, ["q_proj"], rank=RANK, alpha=RANK, init="loftq", quantize_base=True)
    layer = model.layers[1].self_attn.q_proj
    error = hf.model.layers[1].self_attn.q_proj.weight - layer.weight.get_original_weight()
    u, s, vh = torch.linalg.svd(error)
    best = u[:, :RANK] @ torch.diag(s[:RANK]) @ vh[:RANK]
    torch.testing.assert_close(layer.scale * layer.lora_B.weight @ layer.lora_A.weight, best, atol=1e-5, rtol=0)


def test_init_errors_are_one_line(base):
    _, path = base
    with pytest.raises(LoRAError, match="not supported with DoRA"):
        fastune_model(path, init="pissa", use_dora=True)
    with pytest.raises(LoRAError, match="LoRA init must be one of default, pissa, olora, loftq"):
        fastune_model(path, init="gauss")
    with pytest.raises(LoRAError, match=r"use it with QLoRA \(method: qlora\)"):
        fastune_model(path, init="loftq")
    layer = LoRALinear(torch.nn.Linear(8, 8, device="meta"), 2, 4.0, init="pissa")
    with pytest.raises(LoRAError, match="needs the loaded, unsharded weight"):
        layer.reset_lora_parameters()


def test_lora_plus_gives_b_its_own_learning_rate(base):
    _, path = base
    model = fastune_model(path)
    node = {"_component_": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 0.01}
    optimizer = build_optimizer(node, model, torch.device("cpu"), lora_plus_lr_ratio=16)
    b_params = {id(p) for n, p in model.named_parameters() if n.endswith("lora_B.weight")}
    lrs = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lrs[id(p)] = group["lr"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(lrs) == len(trainable)
    assert all(lrs[id(p)] == pytest.approx(16e-3 if id(p) in b_params else 1e-3) for p in trainable)
    # with a full fine-tune there is no B: a one-line error
    full = fastune.from_pretrained(path)
    with pytest.raises(Exception, match="lora_plus_lr_ratio: the model has no LoRA B matrices"):
        build_optimizer(node, full, torch.device("cpu"), lora_plus_lr_ratio=16)
