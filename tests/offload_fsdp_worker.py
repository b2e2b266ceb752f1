"""torchrun worker for tests/test_activation_memory.py: which saved tensors activation
offloading moves off the device in a QLoRA forward, sharded by FSDP2 over 2 gloo ranks
and unsharded. Rank 0 prints one JSON line: the offloaded (dtype, shape) of each run, and
of the sharded run with the weight storages known only from before sharding (the old
detector, which missed the all-gathered NF4 tensors)."""

import json
import sys

import torch
import torch.distributed as dist

import fastune.training.memory as memory
from fastune.distributed import apply_fsdp
from fastune.models import ModelConfig, Transformer
from fastune.modules.kernels import apply_kernels
from fastune.modules.peft import apply_lora, quantize_base_weights

# NF4 shards over 2 ranks need every projection to hold a multiple of 2 * 64 * 256 elements.
CONFIG = dict(vocab_size=67, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def qlora_model():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CONFIG)).to(torch.bfloat16)
    apply_kernels(model, "all")
    apply_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8.0)
    quantize_base_weights(model)
    return model


def offloaded(model, static_weights=False):
    is_weight = memory.weight_detector(model)
    if static_weights:  # the storages of before the forward only (the old detector)
        is_weight.refresh = None
        is_weight = is_weight.__call__
    hooks = memory._OffloadHooks(torch.device("cpu"), 0, is_weight)
    found = []
    pack = hooks.pack

    def recorded(t):
        out = pack(t)
        if not isinstance(out, torch.Tensor):
            found.append((str(t.dtype), list(t.shape)))
        return out

    hooks.pack = recorded
    tokens = torch.randint(0, 67, (1, 8), generator=torch.Generator().manual_seed(1))
    with memory._Offloading(hooks, model):
        model(tokens, return_hidden=True).float().square().sum().backward()
    return sorted(found)


def main():
    dist.init_process_group("gloo")
    single = offloaded(qlora_model())
    sharded = qlora_model()
    apply_fsdp(sharded, param_dtype=torch.bfloat16)
    result = dict(single=single, sharded=offloaded(sharded),
                  sharded_static=offloaded(sharded, static_weights=True))
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
