"""Checkpoints and resume: what a run leaves in output_dir, that a resumed run
continues the uninterrupted one exactly, and that an interrupted save leaves nothing
a resume could pick up."""

import json
import shutil

import pytest
import torch

from fastune.training.checkpointer import TRAINER_STATE, TRAINING_STATE
from train_helpers import single_thread  # noqa: F401 (autouse fixture)
from train_helpers import RecordingLogger, hf_llama, make_config, run, save_base

# 32 rows, batch 4: 8 batches; accumulation 2: 4 optimizer steps per epoch, 2 epochs.
# Saving every 3 steps gives step_3, epoch_0 (step 4), step_6 (mid epoch 1), epoch_1.
PLAN = dict(epochs=2, gradient_accumulation_steps=2, save_every_n_steps=3)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_base(hf_llama(seed=6, tie_word_embeddings=True), tmp_path_factory.mktemp("base"))


def by_step(logger):
    return {r["step"]: r["loss"] for r in logger.records if "loss" in r}


@pytest.mark.parametrize("method, lora_dropout, starts", [
    ("lora", 0.2, ("step_3", "epoch_0", "step_6")),  # mid epoch 0, epoch boundary, mid epoch 1
    ("full", 0.0, ("step_6",)),
])
def test_resumed_run_repeats_the_uninterrupted_run_exactly(tmp_path, base, method, lora_dropout, starts):
    """LoRA with dropout draws random masks every step: the RNG state must be restored
    too. Full fine-tuning resumes its weights from the checkpoint's safetensors."""
    lora = {"rank": 4, "alpha": 8.0, "dropout": lora_dropout, "targets": ["q_proj", "v_proj"]}
    values = dict(method=method, lora=lora, optimizer={"lr": 5e-3, "weight_decay": 0.1},
                  lr_scheduler={"warmup_steps": 2}, **PLAN)
    cfg = make_config(tmp_path, base, **values)
    _, whole = run(cfg)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["epoch_0", "epoch_1", "step_3", "step_6"]
    uninterrupted = by_step(whole)
    assert sorted(uninterrupted) == list(range(1, 9))

    for start in starts:
        resumed_dir = tmp_path / f"resumed_{start}"
        resumed_dir.mkdir()
        shutil.copytree(out / start, resumed_dir / start)
        cfg = make_config(tmp_path, base, name=f"{start}.yaml", output_dir=str(resumed_dir),
                          resume_from_checkpoint="auto", **values)
        state, resumed = run(cfg)
        steps = by_step(resumed)
        first = json.loads((out / start / TRAINER_STATE).read_text())["global_step"] + 1
        assert sorted(steps) == list(range(first, 9))
        assert steps == {s: uninterrupted[s] for s in steps}, start  # exact, not close
        assert state.global_step == 8 and state.epoch == 2


def test_checkpoint_folder_loads_in_transformers_and_peft(tmp_path, base):
    """epoch_0 of a LoRA run: the PEFT adapter and tokenizer files at the top, the merged
    HF model in merged/, and resume state readable with weights_only=True. transformers'
    from_pretrained(epoch_0) gives the fine-tuned model (base + adapter once), as does
    merged/; PEFT loads epoch_0 over the base."""
    import peft
    import transformers

    cfg = make_config(tmp_path, base, max_steps_per_epoch=2)
    state, logger = run(cfg)
    ckpt = tmp_path / "out" / "epoch_0"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "merged", TRAINING_STATE, TRAINER_STATE} <= names
    assert "config.json" not in names  # beside adapter_config.json, transformers would apply the adapter twice
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (ckpt / "merged").iterdir()}
    # Weights get the folder's permissions (safetensors alone writes 0600): a serving job
    # running as another user can read them.
    for weights in (ckpt / "merged" / "model.safetensors", ckpt / "adapter_model.safetensors"):
        assert weights.stat().st_mode & 0o444 == (ckpt / "merged").stat().st_mode & 0o444
    training_state = torch.load(ckpt / TRAINING_STATE, weights_only=True)
    assert set(training_state) == {"optimizer", "lr_scheduler", "rng", "dataloader"}
    assert logger.checkpoints == [(ckpt, json.loads((ckpt / TRAINER_STATE).read_text()))]

    tokens = torch.randint(0, 365, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = state.model.eval()(tokens)
        base_logits = transformers.AutoModelForCausalLM.from_pretrained(base).eval()(input_ids=tokens).logits
        assert (ours - base_logits).abs().max() > 1e-2  # the adapter changes something
        for folder in (ckpt, ckpt / "merged"):
            model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
            torch.testing.assert_close(model(input_ids=tokens).logits, ours, rtol=1e-4, atol=1e-4)
        adapted = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(base), ckpt).eval()
        torch.testing.assert_close(adapted(input_ids=tokens).logits, ours, rtol=1e-4, atol=1e-4)


def test_adapter_only_checkpoint_and_keep_last_n(tmp_path, base):
    cfg = make_config(tmp_path, base, epochs=2, max_steps_per_epoch=3, save_every_n_steps=1,
                      keep_last_n=2, save_adapter_weights_only=True)
    run(cfg)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["epoch_1", "step_5"]
    names = {p.name for p in (out / "epoch_1").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", TRAINING_STATE} <= names
    assert not any(n.startswith("model") or n in ("config.json", "merged") for n in names)


def test_interrupted_save_leaves_no_partial_checkpoint(tmp_path, base, monkeypatch):
    """Ctrl-C while the adapter of step_2 is written: no step_2 (nor a temporary folder)
    appears, the logger is closed, and auto-resume then starts from step_1."""
    import fastune.methods.method as method
    import fastune.training.recipe as recipe

    cfg = make_config(tmp_path, base, max_steps_per_epoch=4, save_every_n_steps=1)
    calls = []
    real_save = method.save_peft_adapter

    def interrupted(model, folder, **kwargs):
        calls.append(folder)
        if len(calls) == 2:
            real_save(model, folder, **kwargs)  # half of the checkpoint is on disk
            raise KeyboardInterrupt
        return real_save(model, folder, **kwargs)

    monkeypatch.setattr(method, "save_peft_adapter", interrupted)
    logger = RecordingLogger()
    monkeypatch.setattr(recipe, "build_metric_logger", lambda section, run_config: logger)
    with pytest.raises(KeyboardInterrupt):
        recipe.train(cfg)
    assert logger.closed  # wandb.finish would have run
    out = tmp_path / "out"
    # No hidden temp folder either; logs/ holds the metrics history every run keeps.
    assert sorted(p.name for p in out.iterdir()) == ["logs", "step_1"]
    monkeypatch.undo()

    resumed = make_config(tmp_path, base, name="resume.yaml", max_steps_per_epoch=4, save_every_n_steps=1,
                          resume_from_checkpoint="auto")
    state, _ = run(resumed)
    assert state.resumed_from == out / "step_1"


def test_fresh_run_refuses_to_overwrite_checkpoints(tmp_path, base):
    from fastune.training.recipe import TrainingError, setup

    (tmp_path / "out" / "step_2").mkdir(parents=True)
    (tmp_path / "out" / "step_2" / TRAINER_STATE).write_text(json.dumps({"global_step": 2}))
    with pytest.raises(TrainingError, match=r"output_dir: .*out already holds checkpoints \(step_2\); "
                                            r"continue that run with resume_from_checkpoint=auto"):
        setup(make_config(tmp_path, base))


def test_resume_from_a_folder_that_is_not_a_checkpoint(tmp_path, base):
    from fastune.training.checkpointer import ResumeError
    from fastune.training.recipe import setup

    (tmp_path / "not_a_ckpt").mkdir()
    cfg = make_config(tmp_path, base, resume_from_checkpoint=str(tmp_path / "not_a_ckpt"))
    with pytest.raises(ResumeError, match=r"resume_from_checkpoint: .*not_a_ckpt has no training_state.pt"):
        setup(cfg)


def test_resume_with_another_method_is_refused(tmp_path, base):
    from fastune.training.checkpointer import ResumeError
    from fastune.training.recipe import setup

    run(make_config(tmp_path, base, method="full", max_steps_per_epoch=1))
    cfg = make_config(tmp_path, base, name="lora.yaml", resume_from_checkpoint=str(tmp_path / "out" / "epoch_0"))
    with pytest.raises(ResumeError, match="written by a method=full run, this run has method=lora"):
        setup(cfg)


def test_resume_with_another_global_batch_is_refused(tmp_path, base):
    """Accumulating twice as many batches per step from step_2 would skip a quarter of
    the epoch's data without a word; it is refused instead."""
    from fastune.training.checkpointer import ResumeError
    from fastune.training.recipe import setup

    run(make_config(tmp_path, base, method="full", max_steps_per_epoch=3, save_every_n_steps=2))
    cfg = make_config(tmp_path, base, name="accumulate.yaml", method="full", max_steps_per_epoch=3,
                      gradient_accumulation_steps=2, output_dir=str(tmp_path / "resumed"),
                      resume_from_checkpoint=str(tmp_path / "out" / "step_2"))
    with pytest.raises(ResumeError, match=r"stopped after 2 steps and 2 batches per rank .* keep the global batch"):
        setup(cfg)


def test_resume_from_an_earlier_checkpoint_beside_later_ones_is_refused(tmp_path, base):
    from fastune.training.checkpointer import ResumeError
    from fastune.training.recipe import setup

    run(make_config(tmp_path, base, max_steps_per_epoch=4, save_every_n_steps=2))
    cfg = make_config(tmp_path, base, name="again.yaml", max_steps_per_epoch=4,
                      resume_from_checkpoint=str(tmp_path / "out" / "step_2"))
    with pytest.raises(ResumeError, match=r"step_2 is at step 2, but .* holds epoch_0 of a later step"):
        setup(cfg)
