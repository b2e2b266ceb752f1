"""A training step's forward and backward never read a device value back to the host
(each such read is a sync that stalls the GPU's queue), with the Triton path forced and
the loss given the supervised count the data loader knows on the host."""

import torch

from fastune.bench.counting import HostSyncs
from fastune.kernels import linear_cross_entropy
from fastune.kernels.dispatch import force_triton
from fastune.models import ModelConfig, Transformer
from fastune.modules.kernels import apply_kernels
from fastune.modules.peft import apply_lora


def _step_syncs(num_supervised):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=67, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8)
    model = Transformer(config)
    apply_kernels(model, "all")
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8.0)
    tokens = torch.randint(0, 67, (2, 9))
    labels = torch.randint(0, 67, (2, 9))
    labels[:, :4] = -100
    count = num_supervised(labels)
    with force_triton(True):
        with HostSyncs() as forward:
            hidden = model(tokens, return_hidden=True)
            loss, _ = linear_cross_entropy(hidden, model.lm_head.weight, labels,
                                           num_supervised=count)
        with HostSyncs() as backward:
            loss.backward()
    return forward.calls, backward.calls


def test_a_step_with_kernels_makes_no_host_sync():
    forward, backward = _step_syncs(lambda labels: 10)
    print(f"\nhost syncs with the count given: forward {forward}, backward {backward}")
    assert forward == [] and backward == []


def test_without_the_count_the_loss_makes_one():
    forward, backward = _step_syncs(lambda labels: None)
    print(f"\nhost syncs without the count: forward {forward}, backward {backward}")
    assert forward == ["__int__"] and backward == []
