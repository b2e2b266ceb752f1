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
    def loss_fn(hidden, labels, num_supervised=None):
        logits = model.lm_head(hidden).float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="sum",
                                                 ignore_index=IGNORE_INDEX)
        return loss, (labels != IGNORE_INDEX).sum()
    return loss_fn


class Recording(SFTObjective):
    """SFT plus a metric: the summed loss again, so its step value must equal the loss."""

    def __call__(self, model, batch, forward_context=contextlib.nullcontext(), normalizer=None):
        loss_sum, count, _ = super().__call__(model, batch, forward_context, normalizer)
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


def _kernel_run(model, objective):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return types.SimpleNamespace(
        model=model, cfg=types.SimpleNamespace(clip_grad_norm=1.0), objective=objective, world=None,
        device=torch.device("cpu"), forward_context=contextlib.nullcontext(), optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0))


def test_train_step_forward_and_backward_make_no_host_sync(monkeypatch):
    """With every kernel on and the Triton path forced, nothing in a step's forward or
    backward reads a device value back: the loop hands each micro-batch's supervised
    count (counted on the host before the batches move) to the fused loss. Only the
    logging reads the step's results (loss, grad norm), once per logged step."""
    from fastune.bench.counting import HostSyncs
    from fastune.kernels.dispatch import force_triton
    from fastune.modules.kernels import apply_kernels
    from fastune.modules.peft import apply_lora
    from fastune.training.loss import build_loss

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHAPE))
    apply_kernels(model, "all")
    apply_lora(model, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], rank=4, alpha=8.0)
    loss_cfg = {"chunk_size": None, "z_loss": 0.0, "label_smoothing": 0.0}
    objective = SFTObjective(build_loss(model, loss_cfg))
    inside = []  # the syncs made inside the objective (forward + loss) and backward

    class Counted:
        normalizer = staticmethod(objective.normalizer)

        def __call__(self, *args, **kwargs):
            with HostSyncs() as syncs:
                out = objective(*args, **kwargs)
            inside.extend(syncs.calls)
            return out

    backward = torch.Tensor.backward

    def counted_backward(t, *args, **kwargs):
        with HostSyncs() as syncs:
            backward(t, *args, **kwargs)
        inside.extend(syncs.calls)

    monkeypatch.setattr(torch.Tensor, "backward", counted_backward)
    run = _kernel_run(model, Counted())
    with force_triton(True):
        loss, grad_norm, _ = train_step(run, batches())
    print(f"\nhost syncs in forward and backward of a 2-micro-batch step: {inside}")
    assert inside == []
    assert torch.isfinite(loss) and torch.isfinite(grad_norm)  # the logging reads these two


def test_compiled_loss_compiles_twice_over_changing_supervised_counts():
    """The count the loop hands the fused loss changes every micro-batch. Compiled (as
    ``apply_compile`` does), the first count is traced as a constant, the second makes
    Dynamo mark it dynamic: at most two graphs for any number of counts (0 and 1 included),
    not one per count up to the recompile limit and then eager."""
    from fastune.modules.kernels import apply_kernels
    from fastune.training.loss import build_loss

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHAPE))
    apply_kernels(model, "all")
    loss_fn = build_loss(model, {"chunk_size": None, "z_loss": 0.0, "label_smoothing": 0.0})
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(loss_fn, backend=counting_backend)
    counts = (1, 9, 31, 0, 64)
    for n in counts:
        hidden = torch.randn(4, 16, SHAPE["hidden_size"], requires_grad=True)
        labels = torch.randint(0, SHAPE["vocab_size"], (4, 16))
        labels.view(-1)[n:] = IGNORE_INDEX
        loss, _ = compiled(hidden, labels, num_supervised=n)
        torch.testing.assert_close(loss, loss_fn(hidden, labels)[0])
        loss.backward()
    print(f"\ngraphs compiled for {len(counts)} supervised counts: {len(graphs)}")
    # One when an earlier test compiled the same loss code and Dynamo already knows the
    # count as dynamic.
    assert 1 <= len(graphs) <= 2
