"""Tiny checkpoints, data and configs for the training-recipe tests (tests/test_train_*.py).

The base model is a random ``transformers.LlamaForCausalLM`` saved with
``save_pretrained`` plus the demo tokenizer's files, so fastune trains on exactly
what a Hugging Face user would hand it, and the HF/PEFT reference runs start from
the same weights.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import yaml
from tiny_hf import random_hf_model

import fastune
from fastune.config import load_config
from fastune.training.loggers import MetricLogger

DEMO_TOKENIZER = Path(fastune.__file__).parent / "assets" / "demo" / "tokenizer"
VOCAB = 365  # the demo tokenizer's

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
# Every projection a multiple of 64 * 256 elements, as NF4 needs.
NF4_FRIENDLY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread while a test module runs (its module-scoped fixtures too):
    these models are so small that a second thread buys nothing, and on a machine
    shared with other processes OpenMP's waiting made each step about 8x slower.
    Import this fixture into a test module to use it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def hf_llama(seed: int = 0, tie_word_embeddings: bool = False, **shape):
    """A random LlamaForCausalLM whose weights give O(1) logits and non-unit norms, so
    that training moves the loss visibly (HF's std-0.02 init gives near-uniform logits)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, rms_norm_eps=1e-5, max_position_embeddings=256,
                                      tie_word_embeddings=tie_word_embeddings, **{**SMALL, **shape})
    return random_hf_model(transformers.LlamaForCausalLM, config, seed)


def save_base(model, out_dir: Path) -> Path:
    """``save_pretrained`` plus the demo tokenizer files: a checkpoint folder like the Hub's."""
    model.save_pretrained(out_dir)
    for f in DEMO_TOKENIZER.iterdir():
        shutil.copy2(f, out_dir / f.name)
    return out_dir


def write_rows(path: Path, n: int = 24, seed: int = 0) -> Path:
    """Instruct rows whose lengths differ a lot (1 to 14 letters), so padding and the
    per-step token count matter."""
    rng = random.Random(seed)
    tasks = [("Write the word backwards.", lambda w: w[::-1]),
             ("Write the word in capital letters.", str.upper)]
    with open(path, "w") as f:
        for _ in range(n):
            instruction, answer = rng.choice(tasks)
            word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 14)))
            f.write(json.dumps({"instruction": instruction, "input": word, "output": answer(word)}) + "\n")
    return path


def write_pairs(path: Path, n: int = 16, seed: int = 0) -> Path:
    """Preference rows (prompt, chosen, rejected) of varied lengths: the reversed word
    against it with a letter too many."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 8)))
            f.write(json.dumps({"prompt": f"Write the word backwards.\n\n{word}", "chosen": word[::-1],
                                "rejected": word[::-1] + rng.choice("xyz")}) + "\n")
    return path


def preference_dataset(folder: Path) -> dict:
    """A ``dataset`` section of preference pairs (written into ``folder`` once)."""
    if not (folder / "pairs.jsonl").exists():
        write_pairs(folder / "pairs.jsonl", 16, 0)
        write_pairs(folder / "val_pairs.jsonl", 4, 1)
    return {"source": "json", "format": "preference", "max_seq_len": 64, "val_split": "validation",
            "data_files": {"train": str(folder / "pairs.jsonl"), "validation": str(folder / "val_pairs.jsonl")}}


def make_config(tmp_path: Path, base_dir: Path, overrides: Optional[list[str]] = None,
                name: str = "cfg.yaml", **values: Any):
    """A validated config for a tiny fp32 eager run on ``base_dir``; ``values`` replace
    top-level keys of the defaults below, ``overrides`` are CLI-style ``key=value``."""
    train = tmp_path / "train.jsonl"
    if not train.exists():
        write_rows(train, 32, seed=0)
        write_rows(tmp_path / "val.jsonl", 6, seed=1)
    cfg = {
        "output_dir": str(tmp_path / "out"),
        "seed": 3,
        "method": "lora",
        "model": {"checkpoint_dir": str(base_dir), "dtype": "fp32"},
        "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q_proj", "v_proj", "down_proj"]},
        "dataset": {"source": "json", "data_files": {"train": str(train), "validation": str(tmp_path / "val.jsonl")},
                    "val_split": "validation", "max_seq_len": 64, "shuffle": True},
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        "epochs": 1,
        "optimizer": {"lr": 1e-2, "weight_decay": 0.1},
        "lr_scheduler": {"warmup_steps": 0},
        "clip_grad_norm": 1.0,
        "compile": False,
        "log_every_n_steps": 1,
        "log_peak_memory_stats": False,
        "device": "cpu",
        **values,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path, overrides or [])


class RecordingLogger(MetricLogger):
    """Keeps every ``log_dict`` call, and whether ``close`` ran."""

    def __init__(self):
        self.records: list[dict] = []
        self.checkpoints: list[tuple[Path, dict]] = []
        self.closed = False

    def log_dict(self, metrics, step):
        self.records.append({"step": step, **{k: float(v) for k, v in metrics.items()}})

    def log_checkpoint(self, path, metadata):
        self.checkpoints.append((Path(path), dict(metadata)))

    def close(self):
        self.closed = True

    def losses(self) -> list[float]:
        return [r["loss"] for r in self.records if "loss" in r]


def run(cfg, logger: Optional[RecordingLogger] = None):
    """setup + fit, with a recording logger; returns (TrainingRun, logger)."""
    from fastune.training.recipe import fit, setup

    logger = logger or RecordingLogger()
    state = setup(cfg)
    fit(state, logger)
    return state, logger


@torch.no_grad()
def recompute_greedy(model, prompts, max_new_tokens: int, stop_ids) -> list[list[int]]:
    """Greedy decoding the simplest correct way, as a reference for the KV-cache generator:
    no cache, the whole left-padded batch re-run for every new token. Padding is kept out
    of attention with ``document_ids`` (padding is document 0, the prompt document 1), and
    positions start at 0 on each prompt's first real token. Each row is cut before its
    first stop id."""
    width = max(len(p) for p in prompts)
    tokens = torch.zeros((len(prompts), width), dtype=torch.long)
    real = torch.zeros_like(tokens, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        real[row, width - len(prompt):] = True
    stops = torch.tensor(list(stop_ids), dtype=torch.long)
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    generated = []
    for _ in range(max_new_tokens):
        positions = (real.long().cumsum(1) - 1).clamp(min=0)
        next_token = model(tokens, position_ids=positions, document_ids=real.long())[:, -1].argmax(-1)
        generated.append(next_token)
        finished |= torch.isin(next_token, stops)
        if bool(finished.all()):
            break
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        real = torch.cat([real, torch.ones_like(real[:, :1])], dim=1)
    rows = torch.stack(generated, dim=1).tolist()
    return [row[:next((i for i, t in enumerate(row) if t in stop_ids), len(row))] for row in rows]
