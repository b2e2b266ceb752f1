"""The training loop against an independent reference: Hugging Face transformers
(+ PEFT for LoRA) trained by a plain loop written here, from the same initial
weights, on the same batches, with the same AdamW, schedule and clipping.

This checks what a loss-curve test can see of the recipe: label shifting and
masking (the reference computes the loss from full logits, not fastune's fused
kernel), loss normalization over gradient accumulation (sum over the step's
micro-batches / the step's supervised tokens), weight-decay groups, the LoRA
scaling and which parameters train.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fastune.config.sections import DataSection
from fastune.training.recipe import build_data, fit, setup
from train_helpers import single_thread  # noqa: F401 (autouse fixture)
from tiny_hf import random_hf_model
from train_helpers import SMALL, VOCAB, RecordingLogger, hf_llama, make_config, save_base

IGNORE = -100
STEPS = 4


def reference_losses(model, batches, accumulation, lr, weight_decay, total_steps, clip):
    """The reference loop: loss = sum of token losses over the step's micro-batches /
    their supervised tokens; AdamW with decay on matrices only; cosine schedule
    (transformers' own, no warm-up); global-norm clipping."""
    import transformers

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    schedule = transformers.get_cosine_schedule_with_warmup(optimizer, 0, total_steps)
    losses = []
    for start in range(0, len(batches), accumulation):
        step = batches[start:start + accumulation]
        n_tokens = sum(int((b["labels"] != IGNORE).sum()) for b in step)
        total = 0.0
        for batch in step:
            logits = model(input_ids=batch["tokens"]).logits.float()
            loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum",
                                   ignore_index=IGNORE)
            (loss / n_tokens).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(total / n_tokens)
    return losses


def fastune_run_and_batches(tmp_path, base, **values):
    """Set up fastune's run, record its batches (the loader is deterministic: a second
    loader built the same way yields the same epoch), then train."""
    cfg = make_config(tmp_path, base, max_steps_per_epoch=STEPS, **values)
    state = setup(cfg)
    loader, _ = build_data(DataSection.from_config(cfg), state.tokenizer, torch.device("cpu"))
    loader.set_epoch(0)
    batches = list(loader)[: STEPS * cfg.gradient_accumulation_steps]
    return cfg, state, batches


def assert_same_curve(ours, theirs):
    assert len(ours) == len(theirs) == STEPS
    assert ours[-1] < ours[0] - 0.05, f"the loss should fall visibly: {ours}"
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64),
                               torch.tensor(theirs, dtype=torch.float64), rtol=1e-5, atol=0)


def hf_qwen3(seed: int = 0):
    """A random tied Qwen3ForCausalLM (q/k norms) whose layers all slide over 8 tokens,
    fewer than the demo rows hold, initialized as hf_llama."""
    import transformers

    config = transformers.Qwen3Config(vocab_size=VOCAB, rms_norm_eps=1e-5, max_position_embeddings=256,
                                      tie_word_embeddings=True, use_sliding_window=True, sliding_window=8,
                                      max_window_layers=0, **SMALL)
    return random_hf_model(transformers.Qwen3ForCausalLM, config, seed)


def hf_gemma2(seed: int = 0):
    """A random tied Gemma2ForCausalLM: its first layer slides over 8 tokens, and both
    softcaps are low enough to act on these logits (fastune caps inside its fused loss).
    Weights at std 0.3: at 0.08 the tied head gives near-uniform logits, and four steps
    do not move the loss."""
    import transformers

    config = transformers.Gemma2Config(vocab_size=VOCAB, rms_norm_eps=1e-5, max_position_embeddings=256,
                                       head_dim=16, query_pre_attn_scalar=12, sliding_window=8,
                                       attn_logit_softcapping=4.0, final_logit_softcapping=5.0, **SMALL)
    return random_hf_model(transformers.Gemma2ForCausalLM, config, seed, norm_mean=0.0, std=0.3)


def hf_gemma3(seed: int = 0):
    """A random tied Gemma3ForCausalLM (q/k norms): a local layer sliding over 8 tokens
    with its own RoPE base, then a global one with linear RoPE scaling; weights as
    hf_gemma2's."""
    import transformers

    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, rms_norm_eps=1e-5, max_position_embeddings=256, head_dim=16, query_pre_attn_scalar=12,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}, **SMALL)
    return random_hf_model(transformers.Gemma3ForCausalLM, config, seed, norm_mean=0.0, std=0.3)


HF_BASES = {"qwen3": hf_qwen3, "gemma2": hf_gemma2, "gemma3": hf_gemma3}


@pytest.mark.parametrize("method, tied", [("lora", False), ("lora", True), ("dora", False), ("lora", "qwen3"),
                                          ("lora", "gemma2"), ("lora", "gemma3")])
def test_lora_loss_curve_matches_hf_peft(tmp_path, method, tied):
    import peft

    hf = HF_BASES[tied]() if tied in HF_BASES else hf_llama(tie_word_embeddings=tied)
    base = save_base(hf, tmp_path / "base")
    cfg, state, batches = fastune_run_and_batches(tmp_path, base, method=method, gradient_accumulation_steps=2)

    lora = cfg.lora
    reference = peft.get_peft_model(hf, peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=list(lora.targets),
        use_dora=method == "dora"))
    # Same adapter init: fastune drew A at random (B is zero); copy it over. DoRA
    # magnitudes are the base weights' row norms on both sides: compared, not copied.
    ours = dict(state.model.named_parameters())
    copied = 0
    for name, p in reference.named_parameters():
        if "lora_" in name:
            key = name.removeprefix("base_model.model.model.").replace(".default", "")
            if "magnitude" in key:
                torch.testing.assert_close(p, ours[key.removesuffix(".weight")].view_as(p))
            else:
                p.data.copy_(ours[key])
                copied += 1
    assert copied == 2 * len(lora.targets) * hf.config.num_hidden_layers

    logger = RecordingLogger()
    fit(state, logger)
    theirs = reference_losses(reference, batches, 2, cfg.optimizer.lr, cfg.optimizer.weight_decay,
                              STEPS, cfg.clip_grad_norm)
    assert_same_curve(logger.losses(), theirs)


def test_full_finetune_loss_curve_matches_hf(tmp_path):
    hf = hf_llama(seed=1)
    base = save_base(hf, tmp_path / "base")
    cfg, state, batches = fastune_run_and_batches(tmp_path, base, method="full",
                                                  optimizer={"lr": 1e-3, "weight_decay": 0.1})
    logger = RecordingLogger()
    fit(state, logger)
    hf.train()
    theirs = reference_losses(hf, batches, 1, 1e-3, 0.1, STEPS, cfg.clip_grad_norm)
    assert_same_curve(logger.losses(), theirs)


def test_logged_step_loss_is_token_weighted_not_a_mean_of_means(tmp_path):
    """The logged loss of a step equals the reference's token-weighted loss; a mean of
    per-micro-batch means (the 2024 HF/Unsloth bug) differs on these uneven batches."""
    hf = hf_llama(seed=2)
    base = save_base(hf, tmp_path / "base")
    cfg, state, batches = fastune_run_and_batches(tmp_path, base, method="full", gradient_accumulation_steps=2,
                                                  batch_size=1, optimizer={"lr": 1e-12, "weight_decay": 0.0})
    logger = RecordingLogger()
    fit(state, logger)
    first = batches[:2]
    with torch.no_grad():
        sums, counts = [], []
        for b in first:
            logits = hf(input_ids=b["tokens"]).logits.float()
            sums.append(F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="sum").item())
            counts.append(int((b["labels"] != IGNORE).sum()))
    token_weighted = sum(sums) / sum(counts)
    mean_of_means = sum(s / c for s, c in zip(sums, counts)) / 2
    assert counts[0] != counts[1]
    assert not math.isclose(token_weighted, mean_of_means, rel_tol=1e-3)
    assert math.isclose(logger.losses()[0], token_weighted, rel_tol=1e-5)
