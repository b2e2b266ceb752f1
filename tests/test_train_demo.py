"""The offline demo: its config validates against what ships in the package, its base
model is a Hugging Face checkpoint, and a few steps of it run end to end with the
before/after evaluation. (The full demo takes minutes; its numbers are in the README.)"""

import pytest
import torch

import fastune
from fastune.config import load_config
from train_helpers import single_thread  # noqa: F401 (autouse fixture)
from train_helpers import RecordingLogger

BASE = fastune.__file__.replace("__init__.py", "assets/demo/base_model")


def test_demo_base_model_loads_in_transformers_like_in_fastune():
    import transformers

    tokens = torch.tensor([[0, 1, 324, 2, 203, 203, 69, 70, 71]])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
    ours = fastune.from_pretrained(BASE, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(input_ids=tokens).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_few_demo_steps_run_and_evaluate_before_and_after(tmp_path):
    from fastune.training.recipe import fit, setup

    cfg = load_config("demo", [f"output_dir={tmp_path / 'out'}", "epochs=1", "max_steps_per_epoch=3",
                               "eval_exact_match.max_examples=6", "eval_every_n_steps=null"])
    state = setup(cfg)
    results = fit(state, RecordingLogger())
    assert set(results) == {"val_loss_before", "exact_match_before", "val_loss_after", "exact_match_after"}
    assert results["val_loss_after"] < results["val_loss_before"]
    assert (tmp_path / "out" / "epoch_0" / "adapter_model.safetensors").is_file()
