"""The Objective seam of the training step: train_step divides the loss and the
objective's metrics by the normalizer summed over the step's micro-batches."""

from __future__ import annotations

import contextlib
import types

import torch

from fastune.data import IGNORE_INDEX
from fastune.models import ModelConfig, Transformer
from fastune.training.loop import train_step
from fastune.training.objective import SFTObjective, hidden_states
from train_helpers import single_thread  # noqa: F401 (autouse fixture)

SHAPE = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=1, head_dim=8)


def eager_loss(model):
    def loss_fn(hidden, labels):
        logits = model.lm_head(hidden).float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="sum",
                                                 ignore_index=IGNORE_INDEX)
        return loss, (labels != IGNORE_INDEX).sum()
    return loss_fn


class Recording(SFTObjective):
    """SFT plus a metric: the summed loss again, so its step value must equal the loss."""

    def __call__(self, model, batch, forward_context=contextlib.nullcontext()):
        loss_sum, count, _ = super().__call__(model, batch, forward_context)
        return loss_sum, count, {"again": loss_sum.detach()}


def batches():
    gen = torch.Generator().manual_seed(0)
    out = []
    for n_masked in (1, 5):
        tokens = torch.randint(0, SHAPE["vocab_size"], (2, 7), generator=gen)
        labels = tokens.clone()
        labels[:, :n_masked] = IGNORE_INDEX
        out.append({"tokens": tokens, "labels": labels})
    return out


def test_train_step_normalizes_loss_gradients_and_metrics_over_the_step():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHAPE))
    reference = Transformer(ModelConfig(**SHAPE))
    reference.load_state_dict(model.state_dict())
    micro = batches()
    objective = Recording(eager_loss(model))
    assert [objective.normalizer(b) for b in micro] == [12, 4]

    # The expected step: every token's loss over the step's 16 supervised tokens.
    total = sum(eager_loss(reference)(hidden_states(reference, b), b["labels"])[0] for b in micro)
    (total / 16).backward()

    grads = {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    run = types.SimpleNamespace(
        model=model, cfg=types.SimpleNamespace(clip_grad_norm=None), objective=objective, world=None,
        device=torch.device("cpu"), forward_context=contextlib.nullcontext(), optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0))
    optimizer.register_step_pre_hook(
        lambda *_: grads.update({k: p.grad.clone() for k, p in model.named_parameters()}))
    loss, grad_norm, metrics = train_step(run, micro)
    torch.testing.assert_close(loss, total.detach() / 16)
    torch.testing.assert_close(metrics["again"].float(), loss)
    for key, p in reference.named_parameters():
        torch.testing.assert_close(grads[key], p.grad)
