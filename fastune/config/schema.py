"""The schema of a training config: every key the recipe reads, its type and its default.

Adding a key is one line in ``SCHEMA``. ``fastune.config.load_config`` checks a
config against it before any heavy work: unknown keys (with the nearest valid
key suggested), types, ranges, choices, required keys and, optionally, that the
named files exist. Defaults are filled in, so the recipe can read every key
below without ``.get``.

Sections marked *component* may hold ``_component_: dotted.path.to.callable``;
``instantiate(section, ...)`` then calls it with the section's other keys as
keyword arguments. The keys listed for such a section are the defaults of its
default component: they are filled in only while that component is in use
(choosing ``torch.optim.SGD`` does not inherit AdamW's ``betas``). Any other key
of a component section must be a parameter of the callable.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import operator
import os
from typing import Any, Callable, Iterable, Optional

from omegaconf import MISSING

from fastune.models.spec import KERNEL_OPS, all_lora_aliases, all_lora_targets
from fastune.data.formats import FORMATS


class Mismatch(Exception):
    """A value that does not fit its type; the message says what was expected and what came.
    ``right_kind``: the value had the right kind (a number, a string) but broke a
    constraint (a bound, a choice, a missing path), which is the better message
    when several types were allowed."""

    def __init__(self, message: str, right_kind: bool = False):
        super().__init__(message)
        self.right_kind = right_kind


def show(value: Any) -> str:
    """A value as an error message shows it: ``'abc' (str)``."""
    return f"{value!r} ({type(value).__name__})"


def closest(word: str, candidates) -> Optional[str]:
    """The candidate nearest to ``word`` (difflib), or None when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, candidates) -> str:
    """`` (did you mean 'x'?)`` for the nearest candidate, or nothing."""
    match = closest(word, candidates)
    return f" (did you mean {match!r}?)" if match else ""


class Type:
    """A value type. ``check`` returns the value, coerced where that loses nothing,
    or raises ``Mismatch``; ``str(type)`` reads as the end of "expected ...".
    ``paths`` says whether file-system paths must exist."""

    def check(self, value: Any, paths: bool) -> Any:
        raise NotImplementedError


_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"),
           "le": (operator.le, "<="), "lt": (operator.lt, "<")}


class _Number(Type):
    def __init__(self, **bounds: float):
        self.bounds = bounds

    def _check_bounds(self, value):
        for name, limit in self.bounds.items():
            compare, symbol = _BOUNDS[name]
            if not compare(value, limit):
                raise Mismatch(f"must be {symbol} {limit}, got {value}", right_kind=True)
        return value


class Int(_Number):
    def __str__(self):
        return "an integer"

    def check(self, value, paths):
        # bool is an int subclass in Python; `true` is not a batch size.
        if isinstance(value, bool) or not isinstance(value, int):
            raise Mismatch(f"expected {self}, got {show(value)}")
        return self._check_bounds(value)


class Float(_Number):
    def __str__(self):
        return "a number"

    def check(self, value, paths):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Mismatch(f"expected {self}, got {show(value)}")
        return self._check_bounds(float(value))


class Bool(Type):
    def __str__(self):
        return "true or false"

    def check(self, value, paths):
        if not isinstance(value, bool):
            raise Mismatch(f"expected {self}, got {show(value)}")
        return value


class Str(Type):
    def __str__(self):
        return "a string"

    def check(self, value, paths):
        if not isinstance(value, str):
            raise Mismatch(f"expected {self}, got {show(value)}")
        return value


class Choice(Type):
    """One of a few strings; ``aliases`` map other spellings to them."""

    def __init__(self, *values: str, aliases: Optional[dict[str, str]] = None):
        self.values = values
        self.aliases = aliases or {}

    def __str__(self):
        return "one of " + ", ".join(repr(v) for v in self.values)

    def check(self, value, paths):
        if isinstance(value, str):
            value = self.aliases.get(value, value)
            if value in self.values:
                return value
            hint = did_you_mean(value, [*self.values, *self.aliases])
            raise Mismatch(f"expected {self}, got {value!r}{hint}", right_kind=True)
        raise Mismatch(f"expected {self}, got {show(value)}")


class Registered(Choice):
    """One of the names in a registry, read when a value is checked: a name registered
    after this schema was built (by a plugin, or a test) is accepted too."""

    def __init__(self, registry: Callable[[], Iterable[str]]):
        self._registry = registry
        self.aliases = {}

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(self._registry())


class ListOf(Type):
    def __init__(self, item: Type):
        self.item = item

    def __str__(self):
        return f"a list of {self.item}"

    def check(self, value, paths):
        if not isinstance(value, (list, tuple)):
            hint = " (write a list as [a, b])" if isinstance(value, str) else ""
            raise Mismatch(f"expected {self}, got {show(value)}{hint}")
        return [self.item.check(v, paths) for v in value]


class MapOf(Type):
    """A mapping from strings to values of one type (``column_map``)."""

    def __init__(self, item: Type):
        self.item = item

    def __str__(self):
        return f"a mapping of names to {self.item}"

    def check(self, value, paths):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise Mismatch(f"expected {self}, got {show(value)}")
        return {k: self.item.check(v, paths) for k, v in value.items()}


class PathTo(Type):
    """A file-system path (``~`` expanded); with ``paths``, it must exist.
    ``kind`` is "dir", "file", or "any"; "glob" also accepts a pattern that matches."""

    def __init__(self, kind: str):
        self.kind = kind

    def __str__(self):
        return {"dir": "a directory", "file": "a file"}.get(self.kind, "a path")

    def check(self, value, paths):
        if not isinstance(value, str):
            raise Mismatch(f"expected {self}, got {show(value)}")
        path = os.path.expanduser(value)
        if paths:
            require_path(path, self.kind)
        return path


def require_path(path: str, kind: str) -> None:
    """Raise ``Mismatch`` unless ``path`` exists as ``kind`` ("dir", "file",
    "any", or "glob": a pattern that matches at least one file)."""
    if kind == "glob" and glob.has_magic(path):
        problem = None if glob.glob(path, recursive=True) else f"no file matches {path}"
    elif not os.path.exists(path):
        problem = f"no such {_KIND_NAMES.get(kind, 'file or directory')}: {path}"
    elif kind == "dir" and not os.path.isdir(path):
        problem = f"not a directory: {path}"
    elif kind == "file" and not os.path.isfile(path):
        problem = f"not a file: {path}"
    else:
        problem = None
    if problem:
        raise Mismatch(problem, right_kind=True)


_KIND_NAMES = {"dir": "directory", "file": "file"}


class AnyOf(Type):
    """The first of several types that accepts the value. When none does, the
    last option that had the right kind of value explains why (a bound, a
    missing path); otherwise all options are listed."""

    def __init__(self, *options: Type):
        self.options = options

    def __str__(self):
        return " or ".join(str(o) for o in self.options)

    def check(self, value, paths):
        closest = None
        for option in self.options:
            try:
                return option.check(value, paths)
            except Mismatch as e:
                if e.right_kind:
                    closest = e
        raise closest or Mismatch(f"expected {self}, got {show(value)}")


class Null(Type):
    def __str__(self):
        return "null"

    def check(self, value, paths):
        if value is not None:
            raise Mismatch(f"expected {self}, got {show(value)}")
        return value


def Maybe(t: Type) -> Type:
    """``t`` or null."""
    return AnyOf(Null(), t)


@dataclasses.dataclass(frozen=True)
class Key:
    type: Type
    default: Any = MISSING  # MISSING: the user must set it
    doc: str = ""


@dataclasses.dataclass(frozen=True)
class Section:
    keys: dict[str, Any]  # name -> Key | Section
    doc: str = ""
    component: bool = False  # may hold `_component_`
    default_component: Optional[str] = None  # None: the recipe's built-in behaviour
    # Short names a user may give instead of the section (`metric_logger=wandb`).
    aliases: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


COMPONENT = "_component_"

# Every family's LoRA targets and their other spellings (torchtune's), from the
# model-family specs; the loaded model's own names are checked by apply_lora.
LORA_TARGETS = Choice(*all_lora_targets(), aliases=all_lora_aliases())
# model.kernels: all, none, or a list of the ops apply_kernels can swap in.
KERNELS = AnyOf(Choice("all", "none"), ListOf(Choice(*KERNEL_OPS)))
_LOGGERS = "fastune.training.loggers."
_LOGGER_ALIASES = {
    "disk": {COMPONENT: _LOGGERS + "DiskLogger"},
    "jsonl": {COMPONENT: _LOGGERS + "DiskLogger"},
    "stdout": {COMPONENT: _LOGGERS + "StdoutLogger"},
    "wandb": {COMPONENT: _LOGGERS + "WandBLogger"},
    "tensorboard": {COMPONENT: _LOGGERS + "TensorBoardLogger", "log_dir": "${output_dir}/tensorboard"},
}
DATA_FILES = AnyOf(Str(), ListOf(Str()), MapOf(AnyOf(Str(), ListOf(Str()))))

SCHEMA = Section({
    "output_dir": Key(Str(), MISSING, "folder for checkpoints (epoch_N/, step_N/), logs and the resolved config.yaml"),
    "seed": Key(Int(ge=0), 0, "seeds torch, numpy and random"),
    "method": Key(Choice("full", "lora", "dora", "qlora"), "lora", "full fine-tuning, LoRA, DoRA, or LoRA on an NF4 base (QLoRA)"),
    "model": Section({
        "checkpoint_dir": Key(PathTo("dir"), MISSING, "HF-format checkpoint folder (config.json + *.safetensors), e.g. from `fastune download`"),
        "dtype": Key(Choice("bf16", "fp16", "fp32", aliases={"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}),
                     "bf16", "parameter and compute dtype; fp16 (cards without bf16): fp16 frozen base, fp32 adapters "
                     "and optimizer state, dynamic loss scaling (LoRA methods)"),
        "kernels": Key(Maybe(KERNELS), None, f"fused kernels to swap in: all, none, or a list of {', '.join(KERNEL_OPS)}; null: all"),
        "use_kernels": Key(Maybe(Bool()), None, "old alias of kernels: true = all, false = none"),
    }),
    "lora": Section({
        "rank": Key(Int(ge=1), 8, "rank r of the adapter matrices"),
        "alpha": Key(Float(gt=0), 16.0, "scale = alpha / rank"),
        "dropout": Key(Float(ge=0, lt=1), 0.0, "dropout on the adapter input"),
        "targets": Key(ListOf(LORA_TARGETS), ["q_proj", "v_proj"], "linear layers that get adapters"),
        "use_rslora": Key(Bool(), False, "rsLoRA: scale = alpha / sqrt(rank)"),
        "lora_plus_lr_ratio": Key(Maybe(Float(gt=0)), None, "LoRA+: the B matrices learn at optimizer.lr * this ratio (e.g. 16)"),
        "init": Key(Choice("default", "pissa", "olora", "loftq"), "default",
                    "default (B = 0, as PEFT); PiSSA / OLoRA: A and B from the base weight, which keeps the residual; "
                    "LoftQ (qlora): A and B from the NF4 error of the base weight (best with alpha = rank)"),
    }, "used by method lora, dora and qlora"),
    "tokenizer": Key(PathTo("any"), "${model.checkpoint_dir}", "tokenizer folder or file; defaults to the checkpoint's"),
    "dataset": Section({
        "source": Key(Str(), MISSING, "a hub dataset name, a local file or folder, or a builder (json, csv, parquet, text, arrow) with data_files"),
        "data_files": Key(Maybe(DATA_FILES), None, "files for a builder source: a path, a list, or {split: paths}"),
        "format": Key(Registered(lambda: FORMATS), "instruct", "a format of fastune.data.formats: instruct (Alpaca columns), chat (messages / ShareGPT), text, or one added with register_format"),
        "column_map": Key(Maybe(MapOf(Str())), None, "expected column -> column in the data, e.g. {output: response}"),
        "split": Key(Str(), "train", "split to train on"),
        "train_on_input": Key(Bool(), False, "also train on prompt tokens"),
        "packed": Key(Bool(), False, "pack samples into max_seq_len rows (document-masked attention)"),
        "max_seq_len": Key(Int(ge=1), 2048, "samples are truncated (or packed) to this many tokens"),
        "truncation": Key(Bool(), True, "false: a sample longer than max_seq_len is an error"),
        "max_prompt_len": Key(Maybe(Int(ge=1)), None, "preference formats: keep only the last N prompt tokens; null: no limit"),
        "shuffle": Key(Bool(), True, "reshuffle every epoch (seeded)"),
        "val_split": Key(Maybe(Str()), None, "split to validate on"),
        "val_fraction": Key(Maybe(Float(gt=0, lt=1)), None, "or: hold out this fraction of the training split"),
    }, "built-in: source, data_files, format, ...; or `_component_` for a builder called with the tokenizer", component=True),
    "batch_size": Key(Int(ge=1), 4, "sequences per micro-batch (per rank)"),
    "gradient_accumulation_steps": Key(Int(ge=1), 1, "micro-batches per optimizer step"),
    "epochs": Key(Int(ge=1), 1, ""),
    "max_steps_per_epoch": Key(Maybe(Int(ge=1)), None, "stop an epoch after this many optimizer steps"),
    "optimizer": Section({
        "lr": Key(Float(gt=0), 2e-4, "peak learning rate"),
        "weight_decay": Key(Float(ge=0), 0.01, ""),
        "fused": Key(Maybe(Bool()), None, "null: fused on CUDA, foreach elsewhere"),
    }, "an optimizer class, called with the trainable parameters", component=True, default_component="torch.optim.AdamW",
        aliases={"adamw": {COMPONENT: "torch.optim.AdamW"}, "adam": {COMPONENT: "torch.optim.Adam"},
                 "sgd": {COMPONENT: "torch.optim.SGD"},
                 # Memory-saving AdamW (fastune/training/memory_optim.py): torchao's low-bit states,
                 # and torchao's CPU offload for one GPU.
                 "adamw8bit": {COMPONENT: "torchao.optim.AdamW8bit"},
                 "adamw4bit": {COMPONENT: "torchao.optim.AdamW4bit"},
                 "adamw_fp8": {COMPONENT: "torchao.optim.AdamWFp8"},
                 "cpu_offload_adamw": {COMPONENT: "fastune.training.memory_optim.cpu_offload_adamw"}}),
    "optimizer_in_backward": Key(Bool(), False, "step each parameter in its backward hook and free its gradient "
                                 "at once (one process; no clipping, no accumulation)"),
    "lr_scheduler": Section({
        "warmup_steps": Key(Int(ge=0), 0, "linear warm-up over this many optimizer steps, then cosine decay"),
        "min_lr_ratio": Key(Float(ge=0, le=1), 0.0, "the cosine ends at min_lr_ratio * lr"),
    }, "built-in warm-up + cosine; or `_component_` called as fn(optimizer, num_training_steps=N, **rest)", component=True),
    "clip_grad_norm": Key(Maybe(Float(gt=0)), 1.0, "clip the global gradient norm; null: no clipping (grad_norm is still logged)"),
    "compile": Key(Bool(), True, "torch.compile each decoder layer and the loss"),
    "activation_checkpointing": Key(AnyOf(Bool(), Choice("full", "selective")), False, "false, true (= full), full, or selective"),
    "activation_offloading": Key(Bool(), False, "offload saved activations to CPU (CUDA only)"),
    "chunked_mlp": Key(Maybe(Int(ge=1)), None, "run each MLP over the tokens in chunks of this many (long context: no full-length [tokens, intermediate] tensor)"),
    "objective": Key(Choice("sft", "dpo", "ipo", "simpo", "orpo"), "sft",
                     "sft (next-token loss), or a preference loss over chosen/rejected pairs: dpo, ipo, simpo, orpo"),
    "preference": Section({
        "beta": Key(Float(gt=0), 0.1, "dpo/ipo/simpo: reward scale (ipo: its tau); orpo: weight of the odds-ratio term"),
        "label_smoothing": Key(Float(ge=0, lt=0.5), 0.0, "dpo/simpo: conservative-DPO label noise"),
        "gamma": Key(Float(ge=0), 0.5, "simpo: target reward margin"),
    }, "options of the preference objectives"),
    "loss": Section({
        "chunk_size": Key(Maybe(Int(ge=1)), None, "tokens per chunk of the fused output-projection + cross-entropy; null: kernel default"),
        "z_loss": Key(Float(ge=0), 0.0, "weight of the z-loss (logsumexp^2) term"),
        "label_smoothing": Key(Float(ge=0, lt=1), 0.0, ""),
    }),
    "eval_every_n_steps": Key(Maybe(Int(ge=1)), None, "validation loss every N optimizer steps; null: at the end of each epoch"),
    "eval_exact_match": Section({
        "source": Key(Maybe(PathTo("file")), None, "held-out rows in the dataset's format and column_map; null: off"),
        "max_examples": Key(Maybe(Int(ge=1)), None, "use only the first N rows; null: all"),
        "max_new_tokens": Key(Int(ge=1), 32, "longest answer greedy decoding may give"),
    }, "exact-match accuracy of greedy answers, evaluated with the validation loss"),
    "save_every_n_steps": Key(Maybe(Int(ge=1)), None, "checkpoint every N optimizer steps, besides each epoch's end"),
    "keep_last_n": Key(Maybe(Int(ge=1)), None, "delete older step/epoch checkpoints; null: keep all"),
    "save_adapter_weights_only": Key(Bool(), False, "LoRA: write only the PEFT adapter, not the merged model"),
    "resume_from_checkpoint": Key(AnyOf(Null(), Choice("auto"), PathTo("dir")), None, "a checkpoint folder, or auto: the latest in output_dir"),
    "metric_logger": Section({
        "log_dir": Key(Str(), "${output_dir}/logs", "where metrics.jsonl goes"),
    }, "a logger from fastune.training.loggers, or a short name: disk (jsonl), stdout, wandb, tensorboard", component=True,
        default_component="fastune.training.loggers.DiskLogger", aliases=_LOGGER_ALIASES),
    "log_every_n_steps": Key(Int(ge=1), 1, "the recipe logs metrics every N optimizer steps"),
    "log_peak_memory_stats": Key(Bool(), True, "log peak memory (CUDA allocator, or RSS on CPU)"),
    "device": Key(Choice("auto", "cpu", "cuda"), "auto", "auto: cuda when available"),
    "host_memory": Key(Choice("keep", "release"), "keep", "CPU runs (glibc): keep freed buffers in the heap for the "
                       "next step (no page faults each step; the process holds its high-water mark), or release "
                       "them to the OS at once (glibc's default)"),
    "num_workers": Key(Int(ge=0), 0, "data-loader worker processes"),
    "distributed": Section({
        "fsdp_reshard_after_forward": Key(Bool(), True, "FSDP2: free gathered parameters after forward"),
        "fsdp_cpu_offload": Key(Bool(), False, "FSDP2: keep parameters, gradients and optimizer state on CPU"),
        "reduce_dtype": Key(Choice("fp32", "bf16", aliases={"float32": "fp32", "bfloat16": "bf16"}), "fp32", "dtype of gradient reduce-scatter"),
        "timeout_s": Key(Int(ge=1), 1800, "collective timeout: a rank waiting longer on the others fails the job; must exceed rank 0's checkpoint export"),
        "async_save": Key(Bool(), False, "write the DCP resume state in the background while training goes on"),
    }, "multi-process training (torchrun)"),
})


def walk_keys(section: Section = SCHEMA, prefix: str = ""):
    """Yield ``(dotted_name, Key | Section)`` for every entry, depth first."""
    for name, entry in section.keys.items():
        dotted = prefix + name
        yield dotted, entry
        if isinstance(entry, Section):
            yield from walk_keys(entry, dotted + ".")
