"""The recipe's small parts on their own: schedule, weight-decay groups, RNG state
round trip, checkpoint discovery, peak memory and exact-match decoding."""

import json
import math
import random

import numpy as np
import pytest
import torch

from fastune.models import ModelConfig, Transformer
from fastune.training import checkpointer
from fastune.training.exact_match import exact_match_accuracy
from fastune.training.memory import peak_memory_stats
from fastune.training.optim import build_optimizer, warmup_cosine_lambda
from train_helpers import recompute_greedy, single_thread  # noqa: F401 (autouse fixture)


def test_warmup_then_cosine():
    f = warmup_cosine_lambda(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]  # (s + 1) / (warmup + 1): step 0 learns
    assert f(4) == 1.0
    assert math.isclose(f(9), 0.1 + 0.9 * 0.5)  # half way through the decay
    assert math.isclose(f(14), 0.1) and math.isclose(f(100), 0.1)


def test_adamw_groups_decay_matrices_only_and_picks_the_fused_step_on_cpu():
    model = Transformer(ModelConfig(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=4))
    model.embed_tokens.weight.requires_grad_(False)
    node = {"_component_": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 0.1, "fused": None}
    optimizer = build_optimizer(node, model, torch.device("cpu"))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.ndim == 1 for p in plain["params"])  # norm weights
    assert len(decayed["params"]) + len(plain["params"]) == sum(p.requires_grad for p in model.parameters())
    assert decayed["fused"] and not decayed["foreach"]
    # elsewhere (a device without a fused Adam) foreach; an explicit choice is kept
    assert build_optimizer(node, model, torch.device("meta")).param_groups[0]["foreach"]
    assert not build_optimizer({**node, "fused": False}, model, torch.device("cpu")).param_groups[0]["fused"]


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    state = checkpointer.rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.save(state, tmp_path / "rng.pt")
    checkpointer.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_latest_checkpoint_is_found_by_global_step(tmp_path):
    for name, step in [("step_10", 10), ("epoch_0", 12), ("step_2", 2), ("epoch_1", 24)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / checkpointer.TRAINER_STATE).write_text(json.dumps({"global_step": step}))
    (tmp_path / ".epoch_2.tmp-1-abc").mkdir()  # an interrupted save: hidden, never picked
    (tmp_path / "step_30").mkdir()  # no trainer_state.json: not a checkpoint
    (tmp_path / "step_40").mkdir()
    (tmp_path / "step_40" / checkpointer.TRAINER_STATE).write_text("{")  # damaged: skipped, with a warning
    assert [p.name for p in checkpointer.checkpoint_dirs(tmp_path)] == ["step_2", "step_10", "epoch_0", "epoch_1"]
    assert checkpointer.resolve_resume("auto", tmp_path) == tmp_path / "epoch_1"
    assert checkpointer.resolve_resume("auto", tmp_path / "empty") is None


def test_peak_memory_on_cpu_is_the_resident_set():
    stats = peak_memory_stats(torch.device("cpu"))
    assert set(stats) == {"peak_rss_gib"} and 0.01 < stats["peak_rss_gib"] < 64


class _Ids:
    """A tokenizer whose text is the ids themselves: exact match compares token ids."""

    def __init__(self, stop_ids=(49,)):
        self.stop_ids = stop_ids

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_exact_match_decodes_with_the_kv_cache_generator_as_greedy_recomputation_did():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=4))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [30, 31]]
    alone = [recompute_greedy(model, [p], 6, stop_ids=[49])[0] for p in prompts]
    assert recompute_greedy(model, prompts, 6, stop_ids=[49]) == alone  # the reference pads correctly
    assert len({tuple(a) for a in alone}) == len(alone), "distinct answers make the comparison strong"
    answers = [" ".join(map(str, ids)) for ids in alone]
    examples = list(zip(prompts, answers))
    assert exact_match_accuracy(model, _Ids(), examples, 6, batch_size=3) == 1.0  # padded batches of 3 and 1
    assert model.training  # restored after evaluation
    wrong = examples[:3] + [(prompts[3], answers[3] + " 0")]
    assert exact_match_accuracy(model, _Ids(), wrong, 6) == 0.75
    stop = alone[1][3]
    cut = alone[1][:alone[1].index(stop)]
    assert recompute_greedy(model, prompts[1:2], 6, stop_ids=[stop])[0] == cut
    assert exact_match_accuracy(model, _Ids((stop,)), [(prompts[1], " ".join(map(str, cut)))], 6) == 1.0


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_parameter_names(mode):
    from fastune.training.memory import apply_activation_checkpointing

    model = Transformer(ModelConfig(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=4))
    names = [n for n, _ in model.named_parameters()]
    apply_activation_checkpointing(model, mode)
    assert [n for n, _ in model.named_parameters()] == names
    with pytest.raises(ValueError, match="activation_checkpointing: expected one of"):
        apply_activation_checkpointing(model, "some")


@pytest.mark.parametrize("quantized", [False, True])
def test_activation_offloading_keeps_weights_on_the_device(quantized):
    """What a layer saves for backward, sorted as offloading sorts it: nn.Linear saves a
    view of its weight (weight.t()), an NF4 base its packed inner tensors; only the
    input is an activation to offload."""
    from fastune.modules.lora import LoRALinear
    from fastune.training.memory import weight_detector

    layer = LoRALinear(torch.nn.Linear(256, 256, bias=False), rank=4, alpha=8.0)
    if quantized:
        layer.quantize_base()
    x = torch.randn(8, 256, requires_grad=True)
    is_weight = weight_detector(layer)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    activations = sorted(tuple(t.shape) for t in saved if not is_weight(t))
    assert activations == [(8, 4), (8, 256)]  # x A^T and x; W (or NF4 W), A, B stay
    assert len(saved) == 5
    plain = torch.nn.Linear(16, 16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        plain(torch.randn(2, 16, requires_grad=True)).sum().backward()
    assert any(t._base is plain.weight for t in saved)  # the view the old filter missed
    assert [weight_detector(plain)(t) for t in saved].count(False) == 1  # only the input


def test_a_failed_prune_keeps_the_new_checkpoint_and_the_run(tmp_path, monkeypatch, caplog):
    def busy(path, *args, **kwargs):
        raise OSError(16, "Device or resource busy")

    write = lambda folder: (folder / "model.safetensors").write_bytes(b"x")  # noqa: E731
    checkpointer.save_checkpoint(tmp_path, "step_1", write, {}, {"global_step": 1}, keep_last_n=1)
    monkeypatch.setattr(checkpointer.shutil, "rmtree", busy)
    with caplog.at_level("WARNING"):
        path = checkpointer.save_checkpoint(tmp_path, "step_2", write, {}, {"global_step": 2}, keep_last_n=1)
    assert (path / checkpointer.TRAINER_STATE).is_file()
    assert "could not delete" in caplog.text and "step_1" in caplog.text
