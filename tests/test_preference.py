"""Preference training end to end: the config (objective, preference options, the
dpo_demo config), the preference data formats and their errors, the metrics every logger
gets, and exact resume. Parity with TRL is in tests/test_preference_trl.py, the per-token
kernel in tests/kernels/test_linear_cross_entropy_tokens.py."""

import shutil

import pytest
import torch

from fastune.config import load_config
from fastune.data import DataError, load_tokenizer
from fastune.data.preference import FIELDS, tokenize_pairs
from fastune.errors import ConfigError
from fastune.training.preference import build_reference, sequence_labels
from train_helpers import single_thread  # noqa: F401 (autouse fixture)
from train_helpers import DEMO_TOKENIZER, hf_llama, make_config, preference_dataset, run, save_base

METRICS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected"}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(DEMO_TOKENIZER))


# ---------------------------------------------------------------------------- config


def test_dpo_demo_config_validates_and_objective_overrides_like_optimizer():
    cfg = load_config("dpo_demo")
    assert cfg.objective == "dpo" and cfg.dataset.format == "preference"
    assert cfg.preference.beta == 0.1 and cfg.preference.label_smoothing == 0.0
    cfg = load_config("dpo_demo", ["objective=simpo", "preference.gamma=1.0", "preference.beta=2.0"])
    assert (cfg.objective, cfg.preference.gamma, cfg.preference.beta) == ("simpo", 1.0, 2.0)
    assert load_config("demo").objective == "sft"


@pytest.mark.parametrize("override, message", [
    ("objective=kto", r"objective: expected one of .*'dpo'.*got 'kto'"),
    ("preference.label_smoothing=0.5", r"preference.label_smoothing"),
    ("preference.beta=0", r"preference.beta"),
    ("dataset.max_prompt_len=0", r"dataset.max_prompt_len"),
])
def test_bad_preference_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config("dpo_demo", [override])
    assert "\n" not in str(e.value)


def test_objective_and_dataset_format_must_fit(tmp_path):
    from fastune.training.recipe import setup

    for overrides, message in ((["objective=sft"], "does not fit objective=sft"),
                               (["dataset.format=instruct"], "does not fit objective=dpo"),
                               (["dataset.packed=true"], "preference pairs are not packed")):
        cfg = load_config("dpo_demo", [f"output_dir={tmp_path / 'out'}"] + overrides)
        with pytest.raises(ConfigError, match=message):
            setup(cfg)


# ------------------------------------------------------------------------------ data


def test_string_pairs_mask_the_prompt_and_pad_the_pair_to_one_length(tok):
    rows = [{"prompt": "Add the two numbers.\n\n3 + 4", "chosen": "7", "rejected": "12"}]
    data = tokenize_pairs(rows, tok, format="preference")
    sample = data[0]
    assert set(sample) == set(FIELDS)
    assert len({len(v) for v in sample.values()}) == 1
    # The supervised labels are the answer and the closing token, nothing of the prompt.
    for side, answer in (("chosen", "7"), ("rejected", "12")):
        labels = sample[f"{side}_labels"]
        supervised = labels[labels != -100].tolist()
        assert tok.decode(supervised) == answer
        assert supervised[-1] == tok.eos_id
        # The same prompt, then the answer, as the chat format renders it.
        ids, _ = tok.tokenize_messages([{"role": "user", "content": rows[0]["prompt"]},
                                        {"role": "assistant", "content": answer}])
        assert sample[f"{side}_tokens"][:len(ids)].tolist() == ids


def test_chat_pairs_as_ultrafeedback_and_with_a_prompt_column(tok):
    user = {"role": "user", "content": "What color is the bazo?"}
    good, bad = {"role": "assistant", "content": "red"}, {"role": "assistant", "content": "blue"}
    ultra = tokenize_pairs([{"prompt": user["content"], "chosen": [user, good], "rejected": [user, bad]}],
                           tok, format="chat_preference")
    plain = tokenize_pairs([{"prompt": user["content"], "chosen": "red", "rejected": "blue"}],
                           tok, format="preference")
    hh = tokenize_pairs([{"chosen": [user, good], "rejected": [user, bad]}], tok, format="chat_preference")
    for name in FIELDS:
        assert ultra[0][name].tolist() == plain[0][name].tolist() == hh[0][name].tolist()


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, r"row 1, column 'rejected': chosen and rejected are identical"),
    ({"prompt": "p", "chosen": "a", "rejected": " "}, r"row 1, column 'rejected': the rejected answer is empty"),
    ({"prompt": "p", "chosen": "a"}, r"missing column 'rejected'"),
])
def test_bad_rows_are_one_line_errors(tok, row, message):
    with pytest.raises(DataError, match=message) as e:
        tokenize_pairs([row], tok, format="preference", source="pairs.jsonl")
    assert "\n" not in str(e.value)


def test_truncation_keeps_the_prompt_end_and_reports_an_emptied_answer(tok):
    row = {"prompt": "Sort the letters in alphabetical order.\n\n" + "dcba" * 5, "chosen": "abcd", "rejected": "x"}
    whole = tokenize_pairs([row], tok, format="preference")[0]
    prompt_len = int((whole["chosen_labels"] != -100).nonzero()[0][0]) + 1
    cut = tokenize_pairs([row], tok, format="preference", max_prompt_len=6)[0]
    assert int((cut["chosen_labels"] != -100).nonzero()[0][0]) + 1 == 6
    assert cut["chosen_tokens"][:6].tolist() == whole["chosen_tokens"][prompt_len - 6:prompt_len].tolist()
    with pytest.raises(DataError, match=r"row 1: the chosen answer is empty after truncation to max_seq_len=10"):
        tokenize_pairs([row], tok, format="preference", max_seq_len=10)


def test_exact_match_reads_a_preference_row_as_prompt_and_chosen_answer(tok):
    from fastune.data import prompt_answer_pairs

    pairs = prompt_answer_pairs([{"prompt": "Add the two numbers.\n\n3 + 4", "chosen": "7", "rejected": "8"}],
                                tok, format="preference")
    ids, _ = tok.tokenize_messages([{"role": "user", "content": "Add the two numbers.\n\n3 + 4"}],
                                   add_generation_prompt=True)
    assert pairs == [(ids, "7")]


def test_sequence_labels_supervise_the_whole_sequence():
    tokens = torch.tensor([[5, 6, 7, 8, 0, 0]])
    labels = torch.tensor([[-100, -100, 8, -100, -100, -100]])
    assert sequence_labels(tokens, labels).tolist() == [[6, 7, 8, -100, -100, -100]]


# ------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_base(hf_llama(seed=7), tmp_path_factory.mktemp("base"))


def dpo_config(tmp_path, base, name="cfg.yaml", **values):
    dataset = preference_dataset(tmp_path)
    values = {"objective": "dpo", "optimizer": {"lr": 5e-3, "weight_decay": 0.0}, **values}
    return make_config(tmp_path, base, name=name, dataset=dataset, **values)


def test_dpo_run_logs_trl_metrics_and_resumes_exactly(tmp_path, base):
    values = dict(epochs=2, gradient_accumulation_steps=2, save_every_n_steps=3,
                  lora={"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": ["q_proj", "v_proj"]})
    _, whole = run(dpo_config(tmp_path, base, **values))
    steps = [r for r in whole.records if "loss" in r]
    assert len(steps) == 4 and all(METRICS <= set(r) for r in steps)
    assert all(0 <= r["rewards/accuracies"] <= 1 for r in steps)
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at first
    assert steps[-1]["rewards/margins"] > 0
    uninterrupted = {r["step"]: r["loss"] for r in steps}

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "out" / "step_3", resumed_dir / "step_3")
    cfg = dpo_config(tmp_path, base, name="resume.yaml", output_dir=str(resumed_dir),
                     resume_from_checkpoint="auto", **values)
    _, resumed = run(cfg)
    again = {r["step"]: r["loss"] for r in resumed.records if "loss" in r}
    assert sorted(again) == [4] and again == {4: uninterrupted[4]}  # exact, not close
    # The layout is SFT's: the PEFT adapter at the top of the checkpoint, which
    # transformers loads (base + adapter) with the logits of fastune's merged model.
    import transformers

    import fastune

    epoch = tmp_path / "out" / "epoch_1"
    assert (epoch / "adapter_model.safetensors").is_file()
    tokens = torch.tensor([[1, 5, 9, 2, 7]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(epoch).eval()
    ours = fastune.from_pretrained(epoch, dtype="fp32").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective, method", [("ipo", "full"), ("orpo", "lora"), ("simpo", "lora")])
def test_each_objective_trains(tmp_path, base, objective, method):
    state, logger = run(dpo_config(tmp_path, base, objective=objective, method=method, epochs=2))
    losses = logger.losses()
    assert losses[-1] < losses[0]
    assert METRICS <= set(next(r for r in logger.records if "loss" in r))


def test_dpo_demo_smoke(tmp_path):
    from fastune.training.recipe import setup, fit
    from train_helpers import RecordingLogger

    cfg = load_config("dpo_demo", [f"output_dir={tmp_path / 'out'}", "max_steps_per_epoch=2",
                                   "batch_size=4", "dataset.val_split=null", "log_every_n_steps=1",
                                   "eval_exact_match.max_examples=2", "eval_exact_match.max_new_tokens=2"])
    state = setup(cfg)
    logger = RecordingLogger()
    results = fit(state, logger)
    assert {"exact_match_before", "exact_match_after"} <= set(results)
    first = next(r for r in logger.records if "loss" in r)
    assert first["loss"] == pytest.approx(0.6931, abs=1e-4)  # LoRA B = 0: policy = reference
    assert METRICS <= set(first)


def test_fused_and_eager_log_probs_agree_in_a_model(tmp_path, base, tok):
    """The fused per-token loss (the loss kernel on) against eager F.linear +
    F.cross_entropy (off): the same DPO loss and LoRA gradients, fp32 (bf16 is held to the bf16
    rule at the kernel level, tests/kernels/test_linear_cross_entropy_tokens.py)."""
    from fastune.config.sections import LoraSection
    from fastune.data.collate import collate_padded
    from fastune.methods.build import build_model
    from fastune.training.loss import build_token_loss
    from fastune.methods.method import LoRAMethod
    from fastune.training.preference import PreferenceObjective, PreferenceOptions

    rows = [{"prompt": f"Write the word backwards.\n\n{w}", "chosen": w[::-1], "rejected": w}
            for w in ("abc", "hgfedcba", "ij")]
    data = tokenize_pairs(rows, tok, format="preference")
    batch = collate_padded([data[i] for i in range(len(data))], data.pad_id)
    method = LoRAMethod(options=LoraSection(targets=("q_proj", "v_proj"), rank=4, alpha=8.0))
    results = []
    # Only the loss op differs between the two models.
    for kernels in ("all", ["rms_norm", "rope", "swiglu", "lora"]):
        torch.manual_seed(0)
        model = build_model(base, method, "fp32", "cpu", kernels=kernels)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        objective = PreferenceObjective("dpo", build_token_loss(model), PreferenceOptions(beta=0.5),
                                        build_reference(method, model))
        loss, _, metrics = objective(model, batch)
        loss.backward()
        results.append((loss.detach(), metrics,
                         {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (fused_loss, fused_metrics, fused_grads), (eager_loss, eager_metrics, eager_grads) = results
    torch.testing.assert_close(fused_loss, eager_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_metrics, eager_metrics, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_grads, eager_grads, rtol=1e-5, atol=1e-5)
