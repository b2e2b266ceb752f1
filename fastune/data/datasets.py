"""Load a dataset (local file or Hugging Face Hub name) and tokenize it once, up front.

``load_sft_dataset`` returns a ``TokenizedDataset``: every sample's named fields
(tokens and shifted labels) in flat int32 arrays plus offsets, which is compact, fast to
slice, and shared copy-on-write with DataLoader workers. Tokenizing up front
gives every sample's length before training, which packing, ``len()`` of the
loader and the clear too-long error need; the packing itself happens per epoch.

Truncation policy: a sample longer than ``max_seq_len`` keeps its first
``max_seq_len`` tokens; no eos is added (the model must not learn to stop where
the text was cut), and labels are shifted after the cut, so the last kept token
has no target. With ``truncation=False`` such a sample is an error naming the
file and row. Empty samples (nothing to train on) and samples left without a
supervised token after truncation are dropped and counted in one log line.

Validation: a named split (``split="validation"``, or another file), or
``holdout_split(dataset, fraction, seed)``, a deterministic random held-out part.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from fastune.data.errors import DataError, TokenizerError
from fastune.data.formats import (
    IGNORE_INDEX,
    RowError,
    get_format,
    resolve_columns,
    row_to_sample,
    shift_labels,
    tokenize_sample,
)
from fastune.data.tokenizer_base import Tokenizer

logger = logging.getLogger(__name__)

# Local data files ``load_rows`` reads: suffix -> ``datasets`` builder. The config
# loader checks ``dataset.source``/``data_files`` against the same table.
FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
              ".arrow": "arrow"}
_BINARY = ("parquet", "arrow")  # no text lines to check
_Paths = Union[str, Path, Sequence[Union[str, Path]]]
DataFiles = Union[None, _Paths, Mapping[str, _Paths]]  # paths, or {split: paths}


def _is_tokens(field: str) -> bool:
    return field == "tokens" or field.endswith("_tokens")


class TokenizedDataset:
    """Samples of named, token-aligned fields, each stored flat: sample ``i`` is
    ``{name: fields[name][offsets[i]:offsets[i+1]]}``. A supervised fine-tuning
    dataset has ``tokens`` and shifted ``labels`` (int32); the collators pad and pack
    whatever fields a sample has (see ``fastune.data.collate``). ``pad_id`` is the
    tokenizer's, for collation."""

    def __init__(self, fields: Mapping[str, np.ndarray], offsets: np.ndarray, *, source: str,
                 max_seq_len: int, pad_id: int):
        if not any(_is_tokens(k) for k in fields) or any(len(v) != offsets[-1] for v in fields.values()):
            raise ValueError(f"{source}: fields need 'tokens' (or '*_tokens'), and all as long as the samples "
                             f"({offsets[-1]} tokens): {', '.join(f'{k} {len(v)}' for k, v in fields.items())}")
        self.fields, self.offsets = dict(fields), offsets
        self.source = source
        self.max_seq_len = max_seq_len
        self.pad_id = pad_id

    @property
    def tokens(self) -> np.ndarray:
        return self.fields["tokens"]

    @property
    def labels(self) -> np.ndarray:
        return self.fields["labels"]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        start, end = self.offsets[i], self.offsets[i + 1]
        return {name: values[start:end] for name, values in self.fields.items()}

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return sum(len(v) for k, v in self.fields.items() if _is_tokens(k))

    @property
    def num_supervised_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def subset(self, indices: Sequence[int]) -> "TokenizedDataset":
        """A new dataset of the samples at ``indices``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        starts, ends = self.offsets[indices], self.offsets[indices + 1]
        flat = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(indices) \
            else np.zeros(0, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(ends - starts)])
        return TokenizedDataset({name: values[flat] for name, values in self.fields.items()}, offsets,
                                source=self.source, max_seq_len=self.max_seq_len, pad_id=self.pad_id)


def load_rows(source: Union[str, Path], split: str = "train", *, data_files: DataFiles = None,
              subset: Optional[str] = None, cache_dir: Optional[str] = None):
    """One split, as a ``datasets.Dataset``, of:

    - a local json/jsonl/csv/parquet/txt/arrow file (its only split is "train");
    - a builder name (json, csv, parquet, text, arrow) with ``data_files``: a path or a
      list of paths (split "train"), or ``{split: path or paths}``;
    - a local folder of data files (splits named by file name, as ``datasets`` does);
    - a Hugging Face Hub dataset name (``subset`` is its configuration).
    """
    import datasets

    if data_files is not None:
        if source not in FILE_TYPES.values():
            raise DataError(f"dataset source {source!r}: data_files needs a builder source "
                            f"({', '.join(sorted(set(FILE_TYPES.values())))})")
        return _load_files(str(source), _split_files(data_files, split), cache_dir)
    path = Path(source)
    if path.is_file():
        if path.suffix not in FILE_TYPES:
            raise DataError(f"{path}: unknown data file type {path.suffix!r} "
                            f"(expected one of {', '.join(FILE_TYPES)})")
        if split != "train":
            raise DataError(f"{path}: a single file has one split, so split={split!r} cannot be read "
                            "from it; name the validation file itself, or hold out a fraction")
        return _load_files(FILE_TYPES[path.suffix], [path], cache_dir)
    if path.is_dir():
        return _load_named(str(path), split, subset, cache_dir)
    if path.suffix in FILE_TYPES or str(source).startswith((".", "/", "~")):
        raise DataError(f"{source}: no such file")
    offline = datasets.config.HF_HUB_OFFLINE
    try:
        return _load_named(str(source), split, subset, cache_dir)
    except DataError:
        raise
    except Exception as e:  # connection, not found, gated: all one line for the user
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = " (HF_HUB_OFFLINE=1: only datasets already in the local cache load)" if offline else ""
        raise DataError(f"dataset {source!r} is not a local file and could not be loaded from the "
                        f"Hugging Face Hub{hint}: {reason}") from None


def _split_files(data_files: DataFiles, split: str) -> list[Path]:
    if isinstance(data_files, Mapping):
        if split not in data_files:
            raise DataError(f"data_files has no {split!r} entry (it has {', '.join(map(str, data_files))})")
        data_files = data_files[split]
    elif split != "train":
        raise DataError(f"data_files without split names hold only split 'train', not {split!r}")
    paths = [Path(p) for p in ([data_files] if isinstance(data_files, (str, Path)) else data_files)]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such file")
    return paths


def _load_named(name: str, split: str, subset: Optional[str], cache_dir: Optional[str]):
    import datasets

    try:
        return datasets.load_dataset(name, subset, split=split, cache_dir=cache_dir)
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"{name}: no split {split!r} ({str(e).splitlines()[0]})") from None
        raise


def _load_files(builder: str, paths: list[Path], cache_dir: Optional[str]):
    import datasets

    where = ", ".join(map(str, paths))
    if builder not in _BINARY and not any(_has_content(p) for p in paths):
        raise DataError(f"{where}: the dataset is empty (0 rows)")
    if builder not in _BINARY:
        for p in paths:
            _check_utf8(p)
    kwargs: dict[str, Any] = {}
    if builder == "csv":
        # Every cell as text: no "NA"/"None" turned into missing values, no "7.50" into 7.5.
        with open(paths[0], newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        kwargs = dict(features=datasets.Features({c: datasets.Value("string") for c in header}),
                      na_filter=False)
    try:
        with _quiet_datasets():
            return datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train",
                                         cache_dir=cache_dir, **kwargs)
    except Exception as e:  # the datasets/pyarrow errors do not say where: find the line ourselves
        for p in paths:
            _diagnose(p, builder)
        reason = str(e.__cause__ or e).splitlines()[0]
        raise DataError(f"{where}: could not be read as {builder} ({reason})") from None


@contextmanager
def _quiet_datasets():
    """No progress bar or log line from ``datasets`` while it reads local files: a failure
    is then the one DataError line below, not that line after datasets' own messages."""
    import datasets

    bars = not datasets.utils.are_progress_bars_disabled()
    level = logging.getLogger("datasets").level
    datasets.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logging.getLogger("datasets").setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _has_content(path: Path) -> bool:
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


def _check_utf8(path: Path) -> None:
    """Raise a DataError naming the line and column of the first byte that is not UTF-8
    (pyarrow would load such a JSON string and fail later, far from the cause)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
        return
    except UnicodeDecodeError:
        pass
    data = path.read_bytes()  # only on the error path: find the line and column
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise DataError(f"{path} line {line}, column {column}: not valid UTF-8 "
                        f"(byte 0x{data[e.start]:02x}); save the file as UTF-8") from None


def _diagnose(path: Path, builder: str) -> None:
    """Raise a DataError naming the line of malformed JSON (the file is valid UTF-8)."""
    if builder != "json":
        return
    text = path.read_text(encoding="utf-8")
    try:
        json.loads(text)
        return  # one JSON document: fine as JSON, the problem is elsewhere
    except json.JSONDecodeError:
        pass
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno}, column {e.colno}: invalid JSON ({e.msg})") from None


def load_sft_dataset(
    source: Union[str, Path],
    tokenizer: Tokenizer,
    *,
    format: str = "instruct",
    split: str = "train",
    data_files: DataFiles = None,
    subset: Optional[str] = None,
    column_map: Optional[Mapping[str, str]] = None,
    train_on_input: bool = False,
    system_prompt: Optional[str] = None,
    max_seq_len: int = 2048,
    truncation: bool = True,
    cache_dir: Optional[str] = None,
) -> TokenizedDataset:
    """Load ``source`` (see ``load_rows``) and tokenize it (see ``tokenize_rows``)."""
    rows = load_rows(source, split, data_files=data_files, subset=subset, cache_dir=cache_dir)
    # Errors name the files read, not the builder ("json") that read them.
    name = ", ".join(map(str, _split_files(data_files, split))) if data_files is not None else str(source)
    if len(rows) == 0:
        raise DataError(f"{name}: the dataset is empty (0 rows)")
    columns = resolve_columns(format, column_map, rows.column_names, name)
    rows = rows.select_columns(sorted(set(columns.values())))
    return tokenize_rows(_iter_rows(rows), tokenizer, format=format, columns=columns, source=name,
                         train_on_input=train_on_input, system_prompt=system_prompt,
                         max_seq_len=max_seq_len, truncation=truncation)


def _iter_rows(rows) -> Iterable[dict[str, Any]]:
    for batch in rows.iter(batch_size=1024):
        names = list(batch)
        for values in zip(*batch.values()):
            yield dict(zip(names, values))


def tokenize_rows(
    rows: Iterable[Mapping[str, Any]],
    tokenizer: Tokenizer,
    *,
    format: str = "instruct",
    columns: Optional[Mapping[str, str]] = None,
    source: str = "<rows>",
    train_on_input: bool = False,
    system_prompt: Optional[str] = None,
    max_seq_len: int = 2048,
    truncation: bool = True,
) -> TokenizedDataset:
    """Tokenize in-memory rows (dicts). ``columns`` maps the format's fields to row
    keys; by default each field is read from the key of the same name."""
    if max_seq_len < 2:
        raise DataError(f"{source}: max_seq_len must be at least 2, got {max_seq_len}")
    ids: list[int] = []
    mask: list[bool] = []
    offsets = [0]
    n_rows = empty = truncated = unsupervised = 0
    for n_rows, row in enumerate(rows, start=1):
        if columns is None:
            columns = resolve_columns(format, None, list(row), source)
        with _row_context(source, n_rows):
            sample = row_to_sample(format, row, columns, system_prompt)
            if sample is not None:
                sample_ids, sample_mask = tokenize_sample(sample, tokenizer, train_on_input)
        if sample is None:
            empty += 1
            continue
        if len(sample_ids) > max_seq_len:
            if not truncation:
                raise DataError(f"{source} row {n_rows}: {len(sample_ids)} tokens, more than "
                                f"max_seq_len={max_seq_len} (raise max_seq_len, or set truncation=True)")
            truncated += 1
            sample_ids, sample_mask = sample_ids[:max_seq_len], sample_mask[:max_seq_len]
        # Trained tokens other than the first: the ones some label will predict.
        if not any(not m for m in sample_mask[1:]):
            unsupervised += 1
            continue
        ids += sample_ids
        mask += sample_mask
        offsets.append(len(ids))
    if n_rows == 0:
        raise DataError(f"{source}: the dataset is empty (0 rows)")
    kept = len(offsets) - 1
    logger.info("%s: %d samples from %d rows (%d empty dropped, %d truncated to %d tokens, "
                "%d without a supervised token dropped)",
                source, kept, n_rows, empty, truncated, max_seq_len, unsupervised)
    if kept == 0:
        raise DataError(f"{source}: no usable samples: {empty} of {n_rows} rows are empty and "
                        f"{unsupervised} have no supervised token")
    tokens = np.asarray(ids, dtype=np.int32)
    offsets_arr = np.asarray(offsets, dtype=np.int64)
    labels = shift_labels(tokens, np.asarray(mask), offsets_arr)
    return TokenizedDataset({"tokens": tokens, "labels": labels}, offsets_arr, source=source,
                            max_seq_len=max_seq_len, pad_id=tokenizer.pad_id)


def holdout_split(dataset: TokenizedDataset, fraction: float, seed: int = 0
                  ) -> tuple[TokenizedDataset, TokenizedDataset]:
    """(train, validation): a random ``fraction`` of the samples held out, the same for
    the same seed and dataset. Both keep the original sample order."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"{dataset.source}: the validation fraction must be between 0 and 1, got {fraction}")
    n_val = max(1, round(len(dataset) * fraction))
    if n_val >= len(dataset):
        raise DataError(f"{dataset.source}: holding out {fraction} of {len(dataset)} samples "
                        "leaves none to train on")
    held = np.zeros(len(dataset), dtype=bool)
    held[np.random.default_rng(seed).permutation(len(dataset))[:n_val]] = True
    return dataset.subset(np.flatnonzero(~held)), dataset.subset(np.flatnonzero(held))


def prompt_answer_pairs(
    source: Union[str, Path, Sequence[Mapping[str, Any]]],
    tokenizer: Tokenizer,
    *,
    format: str = "instruct",
    column_map: Optional[Mapping[str, str]] = None,
    system_prompt: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> list[tuple[list[int], str]]:
    """(prompt ids ending with the generation prompt, expected answer) per row of a file
    (or of in-memory rows), for exact-match evaluation: the prompt is the conversation
    up to its last assistant message, the answer that message."""
    if isinstance(source, (str, Path)):
        dataset = load_rows(source, cache_dir=cache_dir)
        name, rows, available = str(source), list(_iter_rows(dataset)), dataset.column_names
    else:
        name, rows = "<rows>", list(source)
        available = list(rows[0]) if rows else []
    if not get_format(format, name).messages:
        raise DataError(f"{name}: exact-match pairs need a format with an answer, not {format!r}")
    if not rows:
        raise DataError(f"{name}: the dataset is empty (0 rows)")
    columns = resolve_columns(format, column_map, available, name)
    pairs = []
    for n, row in enumerate(rows, start=1):
        with _row_context(name, n):
            messages = row_to_sample(format, row, columns, system_prompt)
            if messages is None:
                continue
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            ids, _ = tokenizer.tokenize_messages(messages[:last], add_generation_prompt=True)
        pairs.append((ids, messages[last]["content"]))
    return pairs


@contextmanager
def _row_context(source: str, row: int) -> Iterator[None]:
    """Name the file and row (1-based) in errors raised while reading one row."""
    try:
        yield
    except RowError as e:
        raise DataError(f"{source} row {row}, column {e.column!r}: {e}") from None
    except TokenizerError as e:
        raise DataError(f"{source} row {row}: {e}") from None
