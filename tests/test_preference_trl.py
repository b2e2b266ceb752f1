"""Preference objectives against TRL 1.16, step by step, fp32, tiny Llama.

For each objective, one batch of pairs tokenized by fastune (``tokenize_pairs`` on the
demo tokenizer's chat format) is handed to both sides: fastune's
``PreferenceObjective`` on fastune's model (fused per-token log-probs), and TRL's own
trainer's ``compute_loss`` on the transformers model (DPOTrainer with loss_type sigmoid
and ipo: its batch of input_ids/attention_mask/completion_mask; CPOTrainer with
loss_type simpo and cpo_alpha=0, and ORPOTrainer: their chosen_*/rejected_* batches).
The loss and every trainable gradient must agree to 1e-5; then both models take the
same plain SGD step with their own gradients, three times. For DPO the reference is
TRL's frozen copy against fastune's (full), and TRL + PEFT with the adapter disabled
against fastune's ``disable_adapters`` (LoRA).

ORPO's SFT term (the NLL of the whole chosen sequence, prompt included, in both): fastune
takes each pair's mean token NLL, TRL the mean over all chosen tokens of the batch; they
agree when the chosen sequences have one length, as in the ORPO batch here (the per-pair form keeps the loss a sum over pairs, so
accumulation and ranks do not change it).
"""

import pytest
import torch

from fastune.data import load_tokenizer
from fastune.data.preference import tokenize_pairs
from fastune.data.collate import collate_padded
from fastune.methods.build import build_model
from fastune.training.loss import build_token_loss
from fastune.methods.method import LoRAMethod, Method
from fastune.config.sections import LoraSection
from fastune.training.preference import PreferenceObjective, PreferenceOptions, build_reference
from train_helpers import single_thread  # noqa: F401 (autouse fixture)
from train_helpers import DEMO_TOKENIZER, hf_llama, save_base

PAIRS = [("Write the word backwards.\n\nabc", "cba", "abc"),
         ("Add the two numbers.\n\n3 + 4", "7", "8"),
         ("Sort the letters in alphabetical order.\n\ndcab", "abcd", "dcab x"),
         ("What color is the bazo?", "red", "blue green")]
ORPO_PAIRS = [("Write the word backwards.\n\nabc", "cba", "abcde"),
              ("Write the word backwards.\n\nxyz", "zyx", "y")]
STEPS, LR = 3, 0.5


def our_batch(pairs):
    tok = load_tokenizer(str(DEMO_TOKENIZER))
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs]
    data = tokenize_pairs(rows, tok, format="preference", max_seq_len=64)
    return collate_padded([data[i] for i in range(len(data))], data.pad_id), tok.pad_id


def unshift(labels):
    """fastune's shifted labels -> HF/TRL's unshifted ones (labels[i] targets token i)."""
    out = torch.full_like(labels, -100)
    out[:, 1:] = labels[:, :-1]
    return out


def dpo_inputs(batch, pad_id):
    ids = torch.cat([batch["chosen_tokens"], batch["rejected_tokens"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    return {"input_ids": ids, "attention_mask": (ids != pad_id).long(),
            "completion_mask": (unshift(labels) != -100).long()}


def paired_inputs(batch, pad_id):
    out = {}
    for side in ("chosen", "rejected"):
        ids = batch[f"{side}_tokens"]
        out[f"{side}_input_ids"] = ids
        out[f"{side}_attention_mask"] = (ids != pad_id).long()
        out[f"{side}_labels"] = unshift(batch[f"{side}_labels"])
    return out


def trl_trainer(kind, model, tmp_path, beta, peft_config=None):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER))
    dataset = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
    common = dict(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, beta=beta, bf16=False,
                  per_device_train_batch_size=len(PAIRS))
    if kind in ("dpo", "ipo"):
        from trl import DPOConfig, DPOTrainer
        args = DPOConfig(loss_type=["sigmoid" if kind == "dpo" else "ipo"], **common)
        # Full: a path, from which TRL loads the policy and its frozen reference. PEFT: a
        # new adapter (peft_config), so TRL's reference is the model with it disabled (an
        # adapter passed in would be its own reference, copied as "ref").
        return DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                          peft_config=peft_config)
    if kind == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.5, **common)
        return CPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    args = ORPOConfig(**common)
    return ORPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)


def our_name(hf_name):
    return hf_name.removeprefix("base_model.model.").removeprefix("model.").replace(".default", "")


def run_parity(kind, tmp_path, lora):
    hf = hf_llama(seed=2)
    base = save_base(hf, tmp_path / "base")
    method = (LoRAMethod(options=LoraSection(targets=("q_proj", "v_proj"), rank=4, alpha=8.0))
              if lora else Method())
    ours = build_model(base, method, "fp32", "cpu", kernels="all")
    beta = 0.1 if kind != "ipo" else 0.5
    objective = PreferenceObjective(kind, build_token_loss(ours), PreferenceOptions(beta=beta),
                                    build_reference(method, ours) if kind in ("dpo", "ipo") else None)
    peft_config = None
    if lora:
        import peft
        peft_config = peft.LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0,
                                      target_modules=["q_proj", "v_proj"])
    trainer = trl_trainer(kind, str(base) if kind in ("dpo", "ipo") else hf, tmp_path, beta,
                          peft_config)
    if lora:
        mine = dict(ours.named_parameters())
        for name, p in trainer.model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(p.data, std=0.1)  # B = 0 would make step 1 trivial
                mine[our_name(name)].data.copy_(p.data)
    model = trainer.model
    batch, pad_id = our_batch(ORPO_PAIRS if kind == "orpo" else PAIRS)
    inputs = (dpo_inputs if kind in ("dpo", "ipo") else paired_inputs)(batch, pad_id)
    ours.train()
    model.train()
    mine = dict(ours.named_parameters())
    for step in range(STEPS):
        loss_sum, count, metrics = objective(ours, batch)
        our_loss = loss_sum / int(count)
        our_loss.backward()
        their_loss = trainer.compute_loss(model, dict(inputs))
        their_loss.backward()
        torch.testing.assert_close(our_loss, their_loss, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{kind} step {step} loss: {m}")
        compared = 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                q = mine[our_name(name)]
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{kind} step {step} grad {name}: {m}")
                p -= LR * p.grad
                q -= LR * q.grad
                p.grad = q.grad = None
                compared += 1
        assert compared == (8 if lora else len(mine))
    return metrics, int(count)


@pytest.mark.parametrize("kind", ["dpo", "ipo", "simpo", "orpo"])
def test_full_matches_trl(kind, tmp_path):
    metrics, pairs = run_parity(kind, tmp_path, lora=False)
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies",
                            "rewards/margins", "logps/chosen", "logps/rejected"}


def test_lora_dpo_matches_trl_peft_with_adapter_disabled_reference(tmp_path):
    run_parity("dpo", tmp_path, lora=True)
