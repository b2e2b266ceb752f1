"""RoPE scaling (YaRN, LongRoPE, partial rotary) and the Phi-3 / Phi-4-mini family
against transformers 5 and PEFT, on tiny random checkpoints (tiny_hf.ROPE_VARIANTS).

- fp32 logits equal transformers' to 1e-5, in both config.json dialects, with
  LongRoPE in its short (<= 32 positions) and long regimes;
- a checkpoint saved by fastune loads in transformers with equal logits, and the
  fused qkv_proj / gate_up_proj come back with the original keys and shapes;
- LoRA on the fused names: adapters move both ways with PEFT with equal logits,
  gradients equal PEFT's, and a few SGD steps stay equal.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_hf import ROPE_VARIANTS, build_hf_model, hf_logits, random_tokens, save_hf_model

import fastune
from fastune.checkpoint import save_hf_checkpoint
from fastune.checkpoint.peft import load_peft_adapter, save_peft_adapter
from fastune.kernels.dispatch import force_triton
from fastune.models.config import ModelConfig
from fastune.modules.kernels import apply_kernels
from fastune.modules.lora import LoRAError
from fastune.modules.peft import apply_lora, merge_lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5
PHI_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
SHORT, LONG = 20, 45  # LongRoPE switches past original_max_position_embeddings = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = {}

    def get(variant: str):
        if variant not in cache:
            model = build_hf_model(variant)
            cache[variant] = (model, save_hf_model(model, tmp_path_factory.mktemp(variant)))
        return cache[variant]

    return get


def max_abs(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def logits(model, tokens, **kwargs):
    with torch.no_grad():
        return model(tokens, **kwargs)


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
@pytest.mark.parametrize("seqlen", [SHORT, LONG])
def test_fp32_logits_match_transformers(tiny, variant, seqlen):
    hf, path = tiny(variant)
    model = fastune.from_pretrained(path)
    tokens = random_tokens(2, seqlen)
    assert max_abs(logits(model, tokens), hf_logits(hf, tokens)) <= ATOL


def test_longrope_switches_to_long_factors_past_the_original_context(tiny):
    """The first 20 positions of a 45-token forward use the long factors, so they
    differ from a 20-token forward (short factors); transformers agrees on both."""
    hf, path = tiny("phi4_mini")
    model = fastune.from_pretrained(path)
    tokens = random_tokens(1, LONG)
    long_run, short_run = logits(model, tokens)[:, :SHORT], logits(model, tokens[:, :SHORT])
    assert max_abs(long_run, short_run) > 1e-2
    # Selection by the longest position: packed rows restart, so a 45-token row of two
    # documents of <= 32 positions stays short.
    pos = torch.cat([torch.arange(SHORT), torch.arange(LONG - SHORT)])[None]
    assert max_abs(logits(model, tokens, position_ids=pos), hf_logits(hf, tokens, pos)) <= ATOL


def test_rope_config_parsing():
    base = dict(vocab_size=8, hidden_size=64, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4)
    phi = ModelConfig.from_hf_dict({**base, "model_type": "phi3", "partial_rotary_factor": 0.75,
                                    "max_position_embeddings": 128, "original_max_position_embeddings": 32,
                                    "sliding_window": 64, "rope_scaling": {"type": "su", "short_factor": [1] * 6,
                                                                           "long_factor": [2] * 6}})
    assert (phi.rotary_dim, phi.sliding_window) == (12, 64)
    assert phi.rope_scaling["rope_type"] == "longrope"
    assert phi.rope_scaling["original_max_position_embeddings"] == 32
    # yarn without original_max_position_embeddings: transformers takes max_position_embeddings
    qwen = ModelConfig.from_hf_dict({**base, "model_type": "qwen2", "max_position_embeddings": 64,
                                     "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    assert qwen.rope_scaling["original_max_position_embeddings"] == 64
    back = ModelConfig.from_hf_dict(phi.to_hf_dict())
    assert (back.rope_scaling, back.rotary_dim, back.sliding_window) == (phi.rope_scaling, 12, 64)


def _write_4x_config(path) -> None:
    """transformers 4.x dialect: top-level rope_theta, rope_scaling with "type", no
    rope_parameters, partial_rotary_factor at the top level."""
    cfg = json.loads((path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    partial = params.pop("partial_rotary_factor", None)
    if partial is not None:
        cfg["partial_rotary_factor"] = partial
    kind = params.pop("rope_type")
    cfg["rope_scaling"] = None if kind == "default" else {"type": kind, **params}
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("variant", ["llama_yarn", "phi4_mini"])
def test_transformers_4x_config_dialect(tiny, tmp_path, variant):
    hf, _ = tiny(variant)
    path = save_hf_model(hf, tmp_path / "ckpt")
    _write_4x_config(path)
    model = fastune.from_pretrained(path)
    for seqlen in (SHORT, LONG):
        tokens = random_tokens(2, seqlen)
        assert max_abs(logits(model, tokens), hf_logits(hf, tokens)) <= ATOL


@pytest.mark.parametrize("variant", ["phi3_longrope", "phi4_mini", "qwen2_yarn_mscale"])
def test_saved_by_fastune_loads_in_transformers_with_fused_weights(tiny, tmp_path, variant):
    hf, path = tiny(variant)
    model = fastune.from_pretrained(path)
    save_hf_checkpoint(model.state_dict(), model.config, tmp_path / "out")
    original, saved = load_file(path / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in original.items()}
    for key, value in original.items():
        assert torch.equal(saved[key], value), key
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = random_tokens(2, LONG)
    assert max_abs(hf_logits(reloaded, tokens), logits(model, tokens)) <= ATOL


@pytest.mark.parametrize("triton_path", [False, True], ids=["reference", "triton"])
def test_kernels_on_equal_kernels_off_with_partial_rotary(tiny, triton_path):
    """Phi-4-mini's partial rotary through the fused RoPE op (the Triton kernel under
    the interpreter): logits and LoRA gradients equal the plain model's."""
    _, path = tiny("phi4_mini")
    plain, fused = fastune.from_pretrained(path), fastune.from_pretrained(path)
    apply_kernels(fused, "all")
    for model in (plain, fused):
        torch.manual_seed(0)
        apply_lora(model, PHI_TARGETS, rank=2, alpha=4)
        torch.nn.init.normal_(model.layers[0].self_attn.q_proj.lora_B.weight, std=0.1)
    tokens, labels = random_tokens(1, LONG), random_tokens(1, LONG, seed=2)
    with force_triton(triton_path):
        outs = []
        for model in (plain, fused):
            out = model(tokens)
            F.cross_entropy(out.flatten(0, 1), labels.flatten()).backward()
            outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    grads = [m.layers[0].self_attn.q_proj.lora_A.weight.grad for m in (plain, fused)]
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)


def test_fused_targets_only(tiny):
    """Phi's LoRA targets are its checkpoint's names; q_proj has no PEFT counterpart."""
    _, path = tiny("phi3")
    with pytest.raises(LoRAError, match="LoRA target 'q_proj' is not a layer of phi3 checkpoints"):
        apply_lora(fastune.from_pretrained(path), ["q_proj"], rank=2, alpha=4)
    llama = fastune.from_pretrained(tiny("llama_yarn")[1])
    with pytest.raises(LoRAError, match="LoRA target 'qkv_proj' is not a layer of llama"):
        apply_lora(llama, ["qkv_proj"], rank=2, alpha=4)


def make_peft(hf, use_dora: bool, seed: int, targets=PHI_TARGETS):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora)
    model = peft.get_peft_model(copy.deepcopy(hf), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_((0.1 if "magnitude" in name else 0.05) * torch.randn(p.shape, generator=gen))
    return model


def fastune_with_peft_adapter(path, peft_model, tmp_path, use_dora, targets=PHI_TARGETS):
    """fastune model with the PEFT model's adapter, moved through PEFT's own files."""
    peft_model.save_pretrained(tmp_path / "peft")
    model = fastune.from_pretrained(path)
    apply_lora(model, targets, rank=4, alpha=8, use_dora=use_dora)
    load_peft_adapter(model, tmp_path / "peft")
    return model


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_adapter_loads_in_fastune_and_back(tiny, tmp_path, use_dora):
    hf, path = tiny("phi4_mini")
    reference = make_peft(hf, use_dora, seed=3).eval()
    model = fastune_with_peft_adapter(path, reference, tmp_path, use_dora).eval()
    attn = model.layers[1].self_attn
    assert attn.q_proj.lora_A is attn.k_proj.lora_A is attn.v_proj.lora_A
    tokens = random_tokens(2, LONG)
    with torch.no_grad():
        assert max_abs(model(tokens), reference(input_ids=tokens).logits) <= ATOL

    save_peft_adapter(model, tmp_path / "ours", base_model_name_or_path=str(path))
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(PHI_TARGETS)
    ours, theirs = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(
        tmp_path / "peft" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    with torch.no_grad():
        assert max_abs(model(tokens), loaded(input_ids=tokens).logits) <= ATOL


def test_merged_export_equals_peft_merge(tiny, tmp_path):
    hf, path = tiny("phi3_longrope")
    reference = make_peft(hf, False, seed=4).eval()
    model = fastune_with_peft_adapter(path, reference, tmp_path, False).eval()
    save_hf_checkpoint(merge_lora(model), model.config, tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    for key, value in reference.merge_and_unload().state_dict().items():
        torch.testing.assert_close(merged[key], value, atol=ATOL, rtol=0)


def test_lora_training_matches_peft_over_steps(tiny, tmp_path):
    """Gradients of the shared A equal PEFT's on the fused layer; three SGD steps
    keep the two in step (loss and every adapter tensor)."""
    hf, path = tiny("phi3_longrope")
    targets = PHI_TARGETS + ["lm_head"]
    reference = make_peft(hf, False, seed=6, targets=targets).train()
    model = fastune_with_peft_adapter(path, reference, tmp_path, False, targets=targets).train()
    ours_opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    theirs_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5)
    # The same trainable elements: a shared A is one parameter, like PEFT's fused A.
    assert sum(p.numel() for p in ours_opt.param_groups[0]["params"]) == sum(
        p.numel() for p in theirs_opt.param_groups[0]["params"])
    for step in range(3):
        tokens, labels = random_tokens(2, LONG, seed=10 + step), random_tokens(2, LONG, seed=20 + step)
        ours = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten())
        theirs = F.cross_entropy(reference(input_ids=tokens).logits.flatten(0, 1), labels.flatten())
        assert abs(ours.item() - theirs.item()) <= ATOL
        for loss, opt in ((ours, ours_opt), (theirs, theirs_opt)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_peft_adapter(model, tmp_path / "trained")
    trained = load_file(tmp_path / "trained" / "adapter_model.safetensors")
    for name, p in reference.named_parameters():
        if p.requires_grad:
            key = name.replace(".default", "")
            torch.testing.assert_close(trained[key], p.detach(), atol=1e-5, rtol=1e-4)


def test_greedy_generation_across_the_longrope_switch_equals_transformers(tiny, monkeypatch):
    """A 26-token prompt and 14 new tokens cross original_max_position_embeddings = 32:
    the decode steps past it switch to the long factors (over a cache written with the
    short ones), as transformers' generate does: same tokens, same logits each step."""
    import importlib

    from fastune.generation import generate

    generate_module = importlib.import_module("fastune.generation.generate")
    seen = []

    def recording_sample(logits, params, generator=None):
        seen.append(logits.clone())
        return generate_module_sample(logits, params, generator)

    generate_module_sample = generate_module.sample
    monkeypatch.setattr(generate_module, "sample", recording_sample)
    hf, path = tiny("phi4_mini")
    model = fastune.from_pretrained(path).eval()
    prompt = random_tokens(1, 26, seed=7)[0].tolist()
    ours = generate(model, [prompt], max_new_tokens=14).tokens[0]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=14, do_sample=False, eos_token_id=None,
                         pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    assert ours == theirs.sequences[0, len(prompt):].tolist()
    assert max_abs(torch.cat(seen), torch.cat(theirs.scores)) <= ATOL
    assert len(set(ours)) > 2, "degenerate outputs would make the comparison weak"


def test_training_run_resumes_exactly_and_its_adapter_loads_in_peft(tmp_path):
    """A LoRA run on the fused targets through the recipe: resuming mid-run repeats the
    uninterrupted losses exactly (the shared A is saved and restored once), and the
    checkpoint's adapter loads in PEFT on the base with the merged weights' logits."""
    import shutil

    from train_helpers import VOCAB, make_config, run, save_base

    hf_config = transformers.Phi3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256, pad_token_id=None, bos_token_id=None,
                                        eos_token_id=None, partial_rotary_factor=0.5)
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(hf_config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.08)
    base = save_base(hf, tmp_path / "base")
    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["qkv_proj", "gate_up_proj"]}
    values = dict(lora=lora, epochs=1, gradient_accumulation_steps=2, save_every_n_steps=2)
    _, whole = run(make_config(tmp_path, base, **values))
    out = tmp_path / "out"
    losses = {r["step"]: r["loss"] for r in whole.records if "loss" in r}
    (tmp_path / "resumed").mkdir()
    shutil.copytree(out / "step_2", tmp_path / "resumed" / "step_2")
    _, resumed = run(make_config(tmp_path, base, name="resume.yaml", output_dir=str(tmp_path / "resumed"),
                                 resume_from_checkpoint="auto", **values))
    again = {r["step"]: r["loss"] for r in resumed.records if "loss" in r}
    assert sorted(again) == [3, 4] and again == {s: losses[s] for s in again}

    ckpt = out / "epoch_0"
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight" in adapter
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf).eval(), ckpt).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tokens = random_tokens(2, 13, vocab=VOCAB)
    assert max_abs(hf_logits(merged, tokens), hf_logits(peft_model, tokens)) <= ATOL
    assert max_abs(hf_logits(hf, tokens), hf_logits(peft_model, tokens)) > 1e-3  # it trained


def test_gguf_export_refuses_rope_it_cannot_describe(tiny, tmp_path):
    from fastune.export.gguf import GGUFExportError, export_gguf

    _, path = tiny("qwen2_yarn_mscale")  # DeepSeek's mscale attention factor: llama.cpp applies its own
    with pytest.raises(GGUFExportError, match="llama.cpp applies YaRN"):
        export_gguf(path, tmp_path / "out.gguf")
