"""DPO step: fastune against TRL's DPOTrainer, both compiled, each in its own process.

Workload: the training benchmark's model (benchmarks/configs/train_workload.yaml: the
55M-parameter Llama, random weights), LoRA r8 on q and v (the reference is the model
with its adapter disabled on both sides), bf16, AdamW, batches of ``--pairs``
preference pairs whose prompt and answers are about ``--prompt`` and ``--answer``
tokens (demo tokenizer, one character per token), the same rows on both sides.
Reported per side: tokens/s (prompt + both answers, per second of optimizer step,
after ``--warmup`` steps) and peak memory (CUDA: max allocated; CPU: peak RSS).

    python benchmarks/bench_dpo.py                       # on an idle machine
    python benchmarks/bench_dpo.py --smoke               # 2 fp32 eager steps: both sides start

No timing runs in the test suite; the lead runs this on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time

import importlib.resources

import torch

MODEL = "model_configs/bench_llama_55m"


def asset_path(relative: str) -> str:
    return str(importlib.resources.files("fastune") / "assets" / relative)


def rows(n: int, prompt: int, answer: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(length):
        return "".join(rng.choice("abcdefghij") for _ in range(length))

    return [{"prompt": text(prompt), "chosen": text(answer), "rejected": text(answer)} for _ in range(n)]


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_fastune(args, data, device) -> dict:
    from fastune.config.sections import LoraSection
    from fastune.data import load_tokenizer
    from fastune.data.collate import collate_padded
    from fastune.data.preference import tokenize_pairs
    from fastune.methods.build import build_model
    from fastune.methods.method import LoRAMethod
    from fastune.training.compile import apply_compile
    from fastune.training.loss import build_token_loss
    from fastune.training.preference import PreferenceObjective, PreferenceOptions, build_reference

    tok = load_tokenizer((asset_path("demo/tokenizer")))
    pairs = tokenize_pairs(data, tok, format="preference", max_seq_len=4096)
    method = LoRAMethod(options=LoraSection(targets=("q_proj", "v_proj"), rank=8, alpha=16.0))
    model = build_model(asset_path(MODEL), method, args.dtype, device, kernels="all", weights="random")
    loss_fn = build_token_loss(model)
    if args.compile:
        loss_fn = apply_compile(model, loss_fn)
    objective = PreferenceObjective("dpo", loss_fn, PreferenceOptions(beta=0.1),
                                    build_reference(method, model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    batches = [collate_padded([pairs[i] for i in range(s, s + args.pairs)], pairs.pad_id)
               for s in range(0, len(pairs) - args.pairs + 1, args.pairs)]
    times, tokens = [], []
    for step in range(args.warmup + args.steps):
        batch = {k: v.to(device) for k, v in batches[step % len(batches)].items()}
        started = time.perf_counter()
        loss, count, _ = objective(model, batch)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
            tokens.append(int(sum((batch[f"{s}_tokens"] != pairs.pad_id).sum() for s in ("chosen", "rejected"))))
    return {"tokens_per_s": sum(tokens) / sum(times), "peak_memory_gib": peak_memory_gib(device)}


def run_trl(args, data, device) -> dict:
    import peft
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok = transformers.AutoTokenizer.from_pretrained((asset_path("demo/tokenizer")))
    config = transformers.AutoConfig.from_pretrained((asset_path(MODEL)))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    times, tokens = [], []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, state_args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            if state.global_step > args.warmup:
                times.append(time.perf_counter() - self.started)

    config = DPOConfig(output_dir="/tmp/fastune_bench/trl_dpo", report_to=[], max_steps=args.warmup + args.steps,
                       per_device_train_batch_size=args.pairs, learning_rate=2e-4, beta=0.1, loss_type=["sigmoid"],
                       torch_compile=args.compile, bf16=args.dtype == "bf16", use_cpu=device.type == "cpu",
                       max_length=None, logging_steps=10**9, save_strategy="no", disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(data), processing_class=tok,
                         peft_config=peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                         callbacks=[Timer()])
    trainer.train()
    sample = trainer.data_collator([trainer.train_dataset[i] for i in range(args.pairs)])
    per_step = int(sample["attention_mask"].sum())
    tokens = [per_step] * len(times)
    return {"tokens_per_s": sum(tokens) / max(sum(times), 1e-9), "peak_memory_gib": peak_memory_gib(device)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--answer", type=int, default=256)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--smoke", action="store_true", help="2 tiny fp32 eager steps per side")
    parser.add_argument("--worker", choices=["fastune", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.pairs, args.prompt, args.answer = 2, 0, 2, 8, 4
        args.dtype, args.compile = "fp32", False
    if args.worker:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        data = rows(args.pairs * (args.warmup + args.steps), args.prompt, args.answer)
        result = (run_fastune if args.worker == "fastune" else run_trl)(args, data, device)
        print("RESULT " + json.dumps(result))
        return 0
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = {}
    for side in ("fastune", "trl"):
        out = subprocess.run([sys.executable, __file__, *passed, "--worker", side], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
        results[side] = json.loads(line.removeprefix("RESULT "))
        print(f"{side:8s} {results[side]['tokens_per_s']:10.1f} tokens/s  "
              f"{results[side]['peak_memory_gib']:.2f} GiB peak", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
