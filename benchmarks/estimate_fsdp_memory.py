"""Per-GPU memory ESTIMATES for Llama 3.1 8B and 70B under fastune's FSDP2 setup.

Not a measurement: an analytic model of what each rank holds at its peak, printed as
the markdown table of docs/distributed.md (``python benchmarks/estimate_fsdp_memory.py``).
No GPU was used. The model follows fastune's choices:

- parameters are stored and computed in bf16 (the config's ``model.dtype``), AdamW's two
  states follow the parameter dtype (bf16), gradients are reduce-scattered in fp32
  (``distributed.reduce_dtype``);
- ``fully_shard`` per decoder layer and on the root; the root group (embeddings,
  ``lm_head``, final norm) stays gathered from forward to the end of backward, because
  the fused loss reads ``lm_head.weight`` outside the model's forward;
- two decoder layers are gathered at a time (the current one and the prefetched next);
- one unsharded layer gradient (bf16) plus its fp32 reduce-scatter copy is in flight;
- activation checkpointing of every layer, batch 1 x 2048 tokens per GPU: each layer
  keeps its input; one layer's activations are live while it is recomputed;
- the fused linear cross-entropy never builds [tokens, vocab] logits;
- QLoRA: decoder-layer projections in NF4 (4 bits + one int8 scale per 64 values + one
  scale per 256 blocks: about 4.13 bits), all-gathered in NF4 and dequantized one
  projection at a time; embeddings, norms and ``lm_head`` stay bf16;
- LoRA/QLoRA adapters: rank 16 on all seven projections, trained in bf16 with AdamW;
- a fixed 1.5 GiB for the CUDA context, NCCL buffers and allocator slack.

Not modelled: allocator fragmentation beyond that allowance, optimizer-step temporaries
(foreach AdamW allocates about one extra copy of the largest parameter group), and the
rank-0 host memory of a checkpoint export (the full model, gathered tensor by tensor).
"""

from __future__ import annotations

import dataclasses

GIB = 2**30
BF16, FP32 = 2, 4
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # packed 4-bit values, int8 block scales, fp32 group scales
RUNTIME = 1.5 * GIB
SEQ = 2048
LORA_RANK = 16


@dataclasses.dataclass(frozen=True)
class Llama:
    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hidden // self.heads

    @property
    def projections(self) -> list[tuple[int, int]]:
        """(in, out) of q, k, v, o, gate, up, down."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    @property
    def layer_projection_params(self) -> int:
        return sum(a * b for a, b in self.projections)

    @property
    def layer_params(self) -> int:
        return self.layer_projection_params + 2 * self.hidden  # two RMSNorm weights

    @property
    def root_params(self) -> int:
        return 2 * self.vocab * self.hidden + self.hidden  # embeddings, lm_head (untied), norm

    @property
    def total_params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    @property
    def adapter_params(self) -> int:
        return self.layers * sum(LORA_RANK * (a + b) for a, b in self.projections)


LLAMA_3_1_8B = Llama("Llama 3.1 8B", 128256, 4096, 14336, 32, 32, 8)
LLAMA_3_1_70B = Llama("Llama 3.1 70B", 128256, 8192, 28672, 80, 64, 8)


def activations(m: Llama) -> float:
    """Checkpointed layer inputs, plus one layer's recomputed activations and their gradients."""
    kept = m.layers * SEQ * m.hidden * BF16
    one_layer = SEQ * (6 * m.hidden + 2 * m.kv_dim + 3 * m.intermediate) * BF16
    return kept + 2 * one_layer


def per_gpu_bytes(m: Llama, method: str, gpus: int) -> dict[str, float]:
    adapters = m.adapter_params * (BF16 + BF16 + 2 * BF16)  # weights, grads, AdamW states
    if method == "full":
        sharded = m.total_params * (BF16 + BF16 + 2 * BF16) / gpus
        root = m.root_params * (BF16 + BF16 + FP32)  # gathered weights, their grads, fp32 reduce copy
        layers = 2 * m.layer_params * BF16 + m.layer_params * (BF16 + FP32)
    elif method == "lora":
        sharded = (m.total_params * BF16 + adapters) / gpus
        root = m.root_params * BF16
        layers = 2 * m.layer_params * BF16
    elif method == "qlora":
        dense = m.total_params - m.layers * m.layer_projection_params
        sharded = (m.layers * m.layer_projection_params * NF4_BYTES + dense * BF16 + adapters) / gpus
        root = m.root_params * BF16
        largest = max(a * b for a, b in m.projections)
        layers = 2 * m.layer_params * NF4_BYTES + largest * BF16  # + one dequantized projection
    else:
        raise ValueError(method)
    return {"sharded": sharded, "gathered": root + layers, "activations": activations(m), "runtime": RUNTIME}


def table() -> str:
    rows = ["| model | method | 2 GPUs | 4 GPUs | 8 GPUs |", "|---|---|---|---|---|"]
    for m in (LLAMA_3_1_8B, LLAMA_3_1_70B):
        for method in ("full", "lora", "qlora"):
            cells = [f"{sum(per_gpu_bytes(m, method, n).values()) / GIB:.0f} GiB" for n in (2, 4, 8)]
            rows.append(f"| {m.name} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def breakdown(m: Llama, method: str, gpus: int) -> str:
    parts = per_gpu_bytes(m, method, gpus)
    return ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items())


if __name__ == "__main__":
    print(table())
    print()
    for m in (LLAMA_3_1_8B, LLAMA_3_1_70B):
        print(f"{m.name}: {m.total_params / 1e9:.2f} B parameters; per GPU at 8 GPUs (GiB):")
        for method in ("full", "lora", "qlora"):
            print(f"  {method}: {breakdown(m, method, 8)}")
