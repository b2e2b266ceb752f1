"""Ways of running the same training that must give the same loss curve:
gradient accumulation vs a bigger batch, activation checkpointing, torch.compile,
and QLoRA against LoRA on the dequantized weights."""

import pytest
import torch

from train_helpers import single_thread  # noqa: F401 (autouse fixture)
from train_helpers import NF4_FRIENDLY, hf_llama, make_config, run, save_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_base(hf_llama(seed=4), tmp_path_factory.mktemp("base"))


def curve(tmp_path, base, name, **values):
    cfg = make_config(tmp_path, base, name=f"{name}.yaml", output_dir=str(tmp_path / name), **values)
    state, logger = run(cfg)
    return logger.losses(), state.model


def test_accumulation_equals_a_bigger_batch(tmp_path, base):
    """batch 4 x 1 micro-batch == batch 1 x 4 micro-batches: the same samples per step
    (no shuffle), each step normalized by its own supervised-token count. The samples
    differ in length, so a per-micro-batch mean would not match."""
    common = dict(method="full", max_steps_per_epoch=3, optimizer={"lr": 1e-3, "weight_decay": 0.1})
    big, model_big = curve(tmp_path, base, "big", batch_size=4, gradient_accumulation_steps=1,
                           overrides=["dataset.shuffle=false"], **common)
    acc, model_acc = curve(tmp_path, base, "acc", batch_size=1, gradient_accumulation_steps=4,
                           overrides=["dataset.shuffle=false"], **common)
    torch.testing.assert_close(torch.tensor(acc), torch.tensor(big), rtol=1e-5, atol=0)
    # Adam divides by sqrt(v): where a gradient is near zero, summation-order noise in it
    # moves the update by a fraction of lr (seen: 3.7e-6 after 3 steps at lr 1e-3), so
    # the weights are compared to 1% of lr. A per-micro-batch mean moves the losses above.
    for (name, a), b in zip(model_acc.named_parameters(), model_big.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_changes_nothing(tmp_path, base, mode):
    common = dict(max_steps_per_epoch=3, lora={"rank": 4, "alpha": 8.0, "dropout": 0.1,
                                               "targets": ["q_proj", "v_proj", "down_proj"]})
    plain, _ = curve(tmp_path, base, "plain", **common)
    checkpointed, _ = curve(tmp_path, base, mode, activation_checkpointing=mode, **common)
    # Recomputation replays the same ops with the same dropout masks (RNG state restored).
    assert checkpointed == plain


def test_activation_offloading_is_a_warned_no_op_on_cpu(tmp_path, base):
    plain, _ = curve(tmp_path, base, "plain", max_steps_per_epoch=2)
    with pytest.warns(UserWarning, match="activation_offloading: only useful on CUDA"):
        offloaded, _ = curve(tmp_path, base, "offload", max_steps_per_epoch=2, activation_offloading=True)
    assert offloaded == plain


@pytest.mark.slow
def test_compiled_matches_eager(tmp_path):
    """One tiny run with the decoder layer and the loss compiled. One layer, packed rows
    of one shape and no validation pass: each graph compiles once (forward and backward)."""
    base = save_base(hf_llama(seed=4, num_hidden_layers=1), tmp_path / "base")
    common = dict(max_steps_per_epoch=2, batch_size=2,
                  overrides=["dataset.packed=true", "dataset.val_split=null"])
    eager, _ = curve(tmp_path, base, "eager", **common)
    compiled, _ = curve(tmp_path, base, "compiled", compile=True, **common)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=0)


@pytest.fixture(scope="module")
def nf4_bases(tmp_path_factory):
    """(original, dequantized): the second holds dequantize(to_nf4(W)) for every decoder
    projection, i.e. exactly the weights QLoRA computes with."""
    from torchao.quantization import to_nf4

    model = hf_llama(seed=5, **NF4_FRIENDLY)
    original = save_base(model, tmp_path_factory.mktemp("nf4_original"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(to_nf4(p.detach(), 64, 256).get_original_weight())
    return original, save_base(model, tmp_path_factory.mktemp("nf4_dequantized"))


def test_qlora_trains_and_matches_lora_on_dequantized_weights(tmp_path, nf4_bases):
    original, dequantized = nf4_bases
    common = dict(max_steps_per_epoch=4, optimizer={"lr": 2e-2, "weight_decay": 0.0})
    qlora, model = curve(tmp_path, original, "qlora", method="qlora", **common)
    reference, _ = curve(tmp_path, dequantized, "lora", method="lora", **common)
    assert type(model.layers[0].self_attn.q_proj.weight).__name__ == "NF4Tensor"
    assert qlora[-1] < qlora[0] - 0.1, qlora
    torch.testing.assert_close(torch.tensor(qlora), torch.tensor(reference), rtol=1e-4, atol=0)


def test_each_packed_epoch_runs_all_of_its_own_batches(tmp_path, base):
    """Reshuffled, the same samples pack into 13 batches of 2 in epoch 0 and 14 in
    epoch 1: every epoch trains on all of its own packs, none dropped or borrowed."""
    from fastune.training.recipe import setup, steps_in_epoch

    cfg = make_config(tmp_path, base, batch_size=2, epochs=2,
                      overrides=["dataset.packed=true", "dataset.max_seq_len=64"])
    loader = setup(cfg).train_loader
    per_epoch = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        per_epoch.append(steps_in_epoch(loader, cfg))
    assert per_epoch == [13, 14]
    state, logger = run(make_config(tmp_path, base, name="run.yaml", batch_size=2, epochs=2,
                                    output_dir=str(tmp_path / "run"), eval_every_n_steps=9,
                                    overrides=["dataset.packed=true", "dataset.max_seq_len=64"]))
    assert state.global_step == 27 and len(logger.losses()) == 27
    # Validation before training, at steps 9 and 18, and once at the end (step 27 is the last).
    assert [r["step"] for r in logger.records if "val_loss" in r] == [0, 9, 18, 27]
