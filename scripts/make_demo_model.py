"""Build the demo base model in ``fastune/assets/demo/base_model/``, deterministically.

    python scripts/make_demo_model.py [--out DIR] [--epochs N]

The demo (``fastune train demo``) fine-tunes a "real small Llama", not random
weights, so that what LoRA adds is visible. This script makes that model:

1. a Llama of about 1.6M parameters around the demo tokenizer (vocab 365),
   initialized like Hugging Face's (normal, std 0.02; norms at 1), seeded;
2. pre-trained with fastune's own training loop (full fine-tuning, fp32, CPU) on
   the demo training rows written as plain text, one ``instruction / input /
   output`` per line, with no chat format. It learns the tasks' language, not the
   chat format the demo then teaches it;
3. saved in Hugging Face format in bf16 (about 3 MB), with the tokenizer files.

The committed model was made with ``OMP_NUM_THREADS=1 python
scripts/make_demo_model.py`` (20 epochs, 740 steps: 19 minutes on a busy 2-core
CPU). Run the same way on the same machine and torch version it gives the same
bytes; other thread counts or CPUs may round differently in the last bits.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

DEMO = Path(__file__).resolve().parent.parent / "fastune" / "assets" / "demo"
SEED = 0
ARCHITECTURE = dict(
    hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
    num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=256, tie_word_embeddings=True,
)


def initial_checkpoint(out_dir: Path) -> Path:
    """The random model, saved with the demo tokenizer's files."""
    from fastune.checkpoint import save_hf_checkpoint
    from fastune.data import load_tokenizer
    from fastune.models import ModelConfig, Transformer

    vocab = load_tokenizer(DEMO / "tokenizer").vocab_size
    config = ModelConfig(vocab_size=vocab, **ARCHITECTURE)
    torch.manual_seed(SEED)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return save_hf_checkpoint(model, config, out_dir, source_dir=DEMO / "tokenizer")


def pretraining_corpus(out_file: Path) -> Path:
    """The training rows as plain text: the content of the tasks without the chat format."""
    with open(DEMO / "data" / "train.jsonl") as rows, open(out_file, "w") as out:
        for line in rows:
            row = json.loads(line)
            text = "\n".join(part for part in (row["instruction"], row["input"], row["output"]) if part)
            out.write(json.dumps({"text": text}) + "\n")
    return out_file


def pretrain(init: Path, corpus: Path, work: Path, epochs: int) -> Path:
    """fastune's training loop, full fine-tuning from the random model; returns the last
    epoch's checkpoint folder."""
    from fastune.config import load_config
    from fastune.training.recipe import train

    cfg = {
        "output_dir": str(work / "run"),
        "seed": SEED,
        "method": "full",
        "model": {"checkpoint_dir": str(init), "dtype": "fp32"},
        "dataset": {"source": str(corpus), "format": "text", "packed": True, "max_seq_len": 128},
        "batch_size": 16,
        "epochs": epochs,
        "optimizer": {"lr": 3e-3, "weight_decay": 0.1},
        "lr_scheduler": {"warmup_steps": 20, "min_lr_ratio": 0.1},
        "compile": False,
        "log_every_n_steps": 20,
        "metric_logger": {"_component_": "fastune.training.loggers.StdoutLogger"},
        "device": "cpu",
    }
    path = work / "pretrain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train(load_config(path))
    return work / "run" / f"epoch_{epochs - 1}"


def export(checkpoint: Path, out_dir: Path) -> None:
    """The pre-trained weights in bf16, with config.json and the tokenizer files."""
    import fastune

    model = fastune.from_pretrained(checkpoint, dtype=torch.bfloat16)
    fastune.save_pretrained(model, out_dir, source_dir=DEMO / "tokenizer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO / "base_model")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fastune_demo_model_"))
    try:
        init = initial_checkpoint(work / "init")
        corpus = pretraining_corpus(work / "corpus.jsonl")
        export(pretrain(init, corpus, work, args.epochs), args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
