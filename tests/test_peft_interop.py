"""fastune LoRA/DoRA against Hugging Face PEFT: same weights give the same logits
and gradients; adapters and merged weights that fastune writes load in PEFT and
transformers, and adapters PEFT writes load in fastune.

The tiny checkpoints are written by transformers itself (tests/tiny_hf.py).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_hf import build_hf_model, random_tokens, save_hf_model

import fastune
from fastune.checkpoint import save_hf_checkpoint
from fastune.checkpoint.peft import load_peft_adapter, save_peft_adapter
from fastune.modules.lora import LoRAError
from fastune.modules.peft import apply_lora, is_lora_key, merge_lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def targets_of(hf) -> list[str]:
    """TARGETS, less lm_head where it is tied (fastune refuses LoRA on a tied head)."""
    return [t for t in TARGETS if not (t == "lm_head" and hf.config.tie_word_embeddings)]
# (variant, use_dora); qwen2 has q/k/v biases; qwen3 q/k norms and a sliding layer; the Gemmas
# four norms, GeGLU, a scaled embedding and a tied head, gemma2 both softcaps.
CASES = [("llama_gqa_llama3", False), ("llama_gqa_llama3", True), ("qwen2_bias", True), ("qwen3", False),
         ("gemma3", False), ("gemma2", True)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(variant) -> (HF model, checkpoint dir), built once per module."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            model = build_hf_model(variant)
            cache[variant] = (model, save_hf_model(model, tmp_path_factory.mktemp(variant)))
        return cache[variant]

    return get


def make_peft(hf, use_dora: bool, dropout: float = 0.0, rank: int = 4, alpha: int = 8, seed: int = 5):
    """A PEFT model on a copy of ``hf`` with non-trivial adapter weights."""
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets_of(hf),
                             use_dora=use_dora)
    model = peft.get_peft_model(copy.deepcopy(hf), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                scale = 0.1 if "magnitude" in name else 0.05
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def fastune_key(peft_key: str) -> str:
    """PEFT's in-memory key -> fastune's, spelled out here independently of fastune's mapping."""
    key = peft_key.removeprefix("base_model.model.").replace(".default", "")
    key = key.removeprefix("model.")
    return key.removesuffix(".weight") if key.endswith("lora_magnitude_vector.weight") else key


def make_fastune(path, peft_model, use_dora: bool, dropout: float = 0.0, rank: int = 4, alpha: int = 8):
    """fastune model from the checkpoint, with the PEFT model's adapter weights copied in."""
    model = fastune.from_pretrained(path)
    apply_lora(model, targets_of(peft_model), rank=rank, alpha=alpha, dropout=dropout, use_dora=use_dora)
    adapters = {fastune_key(k): v for k, v in peft_model.named_parameters() if v.requires_grad}
    params = dict(model.named_parameters())
    assert set(adapters) == {k for k, p in params.items() if p.requires_grad}
    with torch.no_grad():
        for key, value in adapters.items():
            params[key].copy_(value)
    return model


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def peft_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens).logits


@pytest.mark.parametrize(("variant", "use_dora"), CASES)
def test_forward_and_adapter_gradients_match_peft(checkpoint, variant, use_dora):
    hf, path = checkpoint(variant)
    reference = make_peft(hf, use_dora).train()
    model = make_fastune(path, reference, use_dora).train()
    tokens, labels = random_tokens(2, 13), random_tokens(2, 13, seed=2)
    ours, theirs = model(tokens), peft_logits(reference, tokens)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    loss_fn(ours, labels).backward()
    loss_fn(theirs, labels).backward()
    params = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(params[fastune_key(name)].grad, p.grad, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("use_dora", [False, True])
def test_dropout_matches_peft_under_the_same_seed(checkpoint, use_dora):
    """Dropout draws masks in the same order and applies them to the same paths."""
    hf, path = checkpoint("llama_gqa_llama3")
    reference = make_peft(hf, use_dora, dropout=0.3).train()
    model = make_fastune(path, reference, use_dora, dropout=0.3).train()
    tokens = random_tokens(2, 9)
    torch.manual_seed(11)
    ours = model(tokens)
    torch.manual_seed(11)
    theirs = peft_logits(reference, tokens)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    with torch.no_grad():  # and dropout really acted
        assert (model.eval()(tokens) - ours).abs().max() > 1e-3


@pytest.mark.parametrize(("variant", "use_dora"), CASES)
def test_exported_adapter_loads_in_peft(checkpoint, tmp_path, variant, use_dora):
    hf, path = checkpoint(variant)
    model = make_fastune(path, make_peft(hf, use_dora, seed=8), use_dora).eval()
    save_peft_adapter(model, tmp_path, base_model_name_or_path=str(path))

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (4, 8, use_dora)
    assert config["target_modules"] == targets_of(hf) and config["base_model_name_or_path"] == str(path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys
    assert ("base_model.model.lm_head.lora_B.weight" in keys) == ("lm_head" in targets_of(hf))
    magnitude = "base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector"
    assert (magnitude in keys) == use_dora
    assert len(keys) == (3 if use_dora else 2) * (2 * 7 + ("lm_head" in targets_of(hf)))

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path).eval()
    tokens = random_tokens(2, 13)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), peft_logits(loaded, tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize(("variant", "use_dora"), CASES)
def test_merged_export_loads_in_transformers(checkpoint, tmp_path, variant, use_dora):
    hf, path = checkpoint(variant)
    reference = make_peft(hf, use_dora, seed=9).eval()
    model = make_fastune(path, reference, use_dora).eval()
    merged = merge_lora(model)
    save_hf_checkpoint(merged, model.config, tmp_path / "merged")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokens = random_tokens(2, 13)
    # Against PEFT's merged model: merging rounds (on gemma3, PEFT's own merge moves its
    # logits by 2.4e-5), and the unmerged forwards are compared in the test above.
    peft_model = reference.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(peft_logits(plain, tokens), peft_logits(peft_model, tokens), atol=ATOL, rtol=0)
    # and the merged weights are PEFT's own merge
    peft_merged = peft_model.state_dict()
    for key, value in merged.items():
        hf_key = key if key.startswith("lm_head") else f"model.{key}"
        torch.testing.assert_close(value, peft_merged[hf_key], atol=ATOL, rtol=0)


@pytest.mark.parametrize(("variant", "use_dora"), [("llama_gqa_llama3", False), ("llama_gqa_llama3", True),
                                                  ("gemma2", False)])
def test_adapter_written_by_peft_loads_in_fastune(checkpoint, tmp_path, variant, use_dora):
    hf, path = checkpoint(variant)
    reference = make_peft(hf, use_dora, seed=10).eval()
    reference.save_pretrained(tmp_path)  # also writes lm_head.base_layer.weight (untied)
    model = fastune.from_pretrained(path)
    settings = load_peft_adapter(model, tmp_path)  # applies LoRA from adapter_config.json
    assert settings.targets == tuple(targets_of(hf)) and settings.use_dora == use_dora
    tokens = random_tokens(2, 13)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), peft_logits(reference, tokens), atol=ATOL, rtol=0)


def test_round_trip_restores_every_adapter_tensor(checkpoint, tmp_path):
    hf, path = checkpoint("llama_gqa_llama3")
    source = make_fastune(path, make_peft(hf, True, seed=12), True)
    save_peft_adapter(source, tmp_path)
    target = fastune.from_pretrained(path)
    apply_lora(target, TARGETS, rank=4, alpha=8, use_dora=True)
    load_peft_adapter(target, tmp_path)
    want = {k: v for k, v in source.state_dict().items() if is_lora_key(k)}
    got = {k: v for k, v in target.state_dict().items() if is_lora_key(k)}
    assert want.keys() == got.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


# ----------------------------------------------------------------------------- bad adapters


@pytest.fixture
def saved_adapter(checkpoint, tmp_path):
    hf, path = checkpoint("llama_gqa_llama3")
    model = fastune.from_pretrained(path)
    apply_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8)
    save_peft_adapter(model, tmp_path / "adapter")
    fresh = fastune.from_pretrained(path)
    apply_lora(fresh, ["q_proj", "v_proj"], rank=4, alpha=8)
    return fresh, tmp_path / "adapter"


def edit_config(adapter_dir, **changes):
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_weights(adapter_dir, change):
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_missing_config_is_a_clear_error(saved_adapter):
    model, adapter = saved_adapter
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(LoRAError, match=r"adapter_config\.json: adapter config not found"):
        load_peft_adapter(model, adapter)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(r=8), r"adapter_config\.json: rank is 8 in the adapter but 4 in the model"),
        (dict(use_rslora=True), r"adapter_config\.json: use_rslora is True in the adapter but False in the model"),
        (dict(fan_in_fan_out=True), r"adapter_config\.json: fan_in_fan_out=True is not supported"),
        (dict(init_lora_weights="pissa"), r"adapter_config\.json: init_lora_weights='pissa': save the adapter"),
        (dict(peft_type="IA3"), r"adapter_config\.json: peft_type is 'IA3'"),
        (dict(target_modules="all-linear"), r"adapter_config\.json: target_modules='all-linear'"),
    ],
)
def test_bad_config_is_a_clear_error(saved_adapter, changes, message):
    model, adapter = saved_adapter
    edit_config(adapter, **changes)
    with pytest.raises(LoRAError, match=message):
        load_peft_adapter(model, adapter)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"),
         r"missing key 'base_model\.model\.model\.layers\.1\.self_attn\.v_proj\.lora_B\.weight'"),
        (lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 3)}),
         r"key 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight' has shape \[4, 3\], "
         r"the model expects \[4, 64\]"),
        (lambda t: t.update({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)}),
         r"unexpected key 'base_model\.model\.model\.layers\.0\.mlp\.up_proj\.lora_A\.weight'"),
    ],
)
def test_bad_weights_are_a_clear_error_and_change_nothing(saved_adapter, change, message):
    model, adapter = saved_adapter
    edit_weights(adapter, change)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRAError, match=r"adapter_model\.safetensors: " + message):
        load_peft_adapter(model, adapter)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
