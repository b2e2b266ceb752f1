"""Dataset rows to training samples: messages (or plain text), then ids and labels.

Formats are a registry (``FORMATS``, filled by ``register_format``), which the
config schema reads for ``dataset.format``. The built-in ones and the columns they
read (rename with ``column_map={"field": "my_column"}``):

- ``instruct`` (Alpaca): ``instruction``, optional ``input``, ``output``. Becomes a
  user message ``instruction`` (plus ``"\\n\\n" + input`` when there is one) and an
  assistant message ``output``, formatted by the tokenizer's chat format.
- ``chat``: ``messages`` (or, when there is no such column, ``conversations``), a
  list of OpenAI ``{"role", "content"}`` messages or ShareGPT ``{"from", "value"}``
  ones, ``from`` being human, gpt or system (user and assistant are accepted too).
- ``text``: ``text``, trained on whole, between bos and eos.
- ``preference``: ``prompt``, ``chosen``, ``rejected`` strings: a user message and two
  assistant answers (for the preference objectives; ``fastune.data.preference``).
- ``chat_preference``: ``chosen`` and ``rejected`` message lists (UltraFeedback-binarized,
  HH-RLHF as chat): the last message of each is the assistant's answer, the ones before
  it the prompt, unless an optional ``prompt`` column (text or messages) gives it.

Masking: with ``train_on_input=False`` (the default) only assistant messages and
the token closing each of them are trained on; ``True`` trains on every token.

Labels are shifted here (docs/architecture.md): ``labels[i]`` is the target for
``tokens[i]``, i.e. ``tokens[i + 1]`` unless that token is masked, and -100 for
the last token. Nothing ever predicts across the end of a sample.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from fastune.data.errors import DataError
from fastune.data.tokenizer_base import Message, Tokenizer

IGNORE_INDEX = -100
CHAT_ROLES = ("system", "user", "assistant", "tool", "ipython")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}

_CHAT_ROLE_MAP = {r: r for r in CHAT_ROLES}

Sample = Union[list[Message], str]


@dataclasses.dataclass(frozen=True)
class DatasetFormat:
    """How a row becomes a sample: the fields (columns) the format reads, and
    ``to_sample(row, columns)`` (``columns``: field -> the row's key for it), which
    returns the chat messages, or for a plain-text format the text."""

    name: str
    required: tuple[str, ...]
    to_sample: Callable[[Mapping[str, Any], Mapping[str, str]], Sample]
    optional: tuple[str, ...] = ()
    # field -> a column read when the field's own column is absent (ShareGPT's "conversations").
    fallback_columns: Mapping[str, str] = dataclasses.field(default_factory=dict)
    messages: bool = True  # False: a plain-text format, with no assistant answer to score
    # True: ``to_sample`` gives a ``{"prompt", "chosen", "rejected"}`` dict of message
    # lists, for the preference objectives (fastune.data.preference tokenizes it);
    # elsewhere (exact match) a row reads as the prompt and its chosen answer.
    preference: bool = False

    @property
    def fields(self) -> tuple[str, ...]:
        return self.required + self.optional


FORMATS: dict[str, DatasetFormat] = {}


def register_format(fmt: DatasetFormat) -> DatasetFormat:
    """Make ``fmt`` a ``dataset.format`` choice; a name is registered once."""
    if fmt.name in FORMATS:
        raise ValueError(f"dataset format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str, source: str) -> DatasetFormat:
    if name not in FORMATS:
        raise DataError(f"{source}: unknown format {name!r} (expected one of {', '.join(FORMATS)})")
    return FORMATS[name]


class RowError(Exception):
    """A bad value in one column of a row; the caller adds the file and row number."""

    def __init__(self, column: str, message: str):
        super().__init__(message)
        self.column = column


def resolve_columns(
    fmt: str, column_map: Optional[Mapping[str, str]], available: Sequence[str], source: str
) -> dict[str, str]:
    """Field -> column name for ``fmt``, checked against the dataset's columns."""
    spec = get_format(fmt, source)
    column_map = dict(column_map or {})
    for field in column_map:
        if field not in spec.fields:
            raise DataError(f"{source}: column_map key {field!r} is not a field of the {fmt} format "
                            f"(fields: {', '.join(spec.fields)})")
    columns = {}
    for field in spec.fields:
        column = column_map.get(field, field)
        fallback = spec.fallback_columns.get(field)
        if field not in column_map and column not in available and fallback in available:
            column = fallback
        if column in available:
            columns[field] = column
        elif field in spec.required or field in column_map:
            raise DataError(
                f"{source} row 1: missing column {column!r} for the {fmt} format's {field!r} field "
                f"(columns: {', '.join(available)}); rename it with column_map={{{field!r}: ...}}"
            )
    return columns


def row_to_sample(
    fmt: str, row: Mapping[str, Any], columns: Mapping[str, str], system_prompt: Optional[str] = None
) -> Optional[Sample]:
    """The messages (or text) of one row; None for an empty sample, with nothing to train on."""
    sample = FORMATS[fmt].to_sample(row, columns)
    if FORMATS[fmt].preference:  # as a conversation: the prompt and the chosen answer
        sample = sample["prompt"] + sample["chosen"]
    if isinstance(sample, str):
        return sample if sample.strip() else None
    messages = sample
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return None
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _text(row: Mapping[str, Any], column: str) -> str:
    """A text cell; None reads as empty and a number as its decimal form (JSON and CSV give both)."""
    value = row.get(column)
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise RowError(column, f"expected text, got {type(value).__name__}")
    return value


def _instruct_messages(row: Mapping[str, Any], columns: Mapping[str, str]) -> list[Message]:
    instruction = _text(row, columns["instruction"])
    extra = _text(row, columns["input"]) if "input" in columns else ""
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(row, columns["output"])}]


def _chat_messages(row: Mapping[str, Any], columns: Mapping[str, str]) -> list[Message]:
    return _messages(row.get(columns["messages"]), columns["messages"])


def _messages(value: Any, column: str) -> list[Message]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RowError(column, f"expected a list of messages, got {type(value).__name__}")
    messages: list[Message] = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or not ("role" in item or "from" in item):
            raise RowError(column, f"message {i} is not an object with role/content (or from/value)")
        # Arrow gives every message of a column the union of keys, so test for a value.
        sharegpt = item.get("role") is None
        role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
        roles = SHAREGPT_ROLES if sharegpt else _CHAT_ROLE_MAP
        role = item[role_key]
        if role not in roles:
            raise RowError(column, f"message {i} has unknown {role_key} {role!r} "
                                   f"(expected one of {', '.join(roles)})")
        try:
            content = _text(item, content_key)
        except RowError as e:
            raise RowError(column, f"message {i} {content_key}: {e}") from None
        messages.append({"role": roles[role], "content": content})
    return messages


def _check_pair(sample: dict, columns: Mapping[str, str]) -> dict:
    for side in ("chosen", "rejected"):
        if not sample[side] or not sample[side][-1]["content"].strip():
            raise RowError(columns[side], f"the {side} answer is empty")
    if sample["chosen"] == sample["rejected"]:
        raise RowError(columns["rejected"], "chosen and rejected are identical")
    return sample


def _preference_strings(row: Mapping[str, Any], columns: Mapping[str, str]) -> dict:
    return _check_pair({
        "prompt": [{"role": "user", "content": _text(row, columns["prompt"])}],
        "chosen": [{"role": "assistant", "content": _text(row, columns["chosen"])}],
        "rejected": [{"role": "assistant", "content": _text(row, columns["rejected"])}],
    }, columns)


def _preference_chat(row: Mapping[str, Any], columns: Mapping[str, str]) -> dict:
    sample = {}
    for side in ("chosen", "rejected"):
        messages = _messages(row.get(columns[side]), columns[side])
        if not messages or messages[-1]["role"] != "assistant":
            raise RowError(columns[side], "the last message must be the assistant's answer")
        sample[side] = messages[-1:]
        sample[side + "_prefix"] = messages[:-1]
    if "prompt" in columns and row.get(columns["prompt"]) is not None:
        value = row[columns["prompt"]]
        prompt = (_messages(value, columns["prompt"]) if isinstance(value, list)
                  else [{"role": "user", "content": _text(row, columns["prompt"])}])
        # UltraFeedback repeats the prompt in both lists; a prompt column alone is fine too.
        for side in ("chosen", "rejected"):
            if sample[side + "_prefix"] not in ([], prompt):
                raise RowError(columns[side], "its messages before the answer differ from the prompt")
    else:
        prompt = sample["chosen_prefix"]
        if sample["rejected_prefix"] != prompt:
            raise RowError(columns["rejected"], "its messages before the answer differ from the chosen ones")
    return _check_pair({"prompt": prompt, "chosen": sample["chosen"], "rejected": sample["rejected"]},
                       columns)


register_format(DatasetFormat("instruct", ("instruction", "output"), _instruct_messages, optional=("input",)))
register_format(DatasetFormat("chat", ("messages",), _chat_messages, fallback_columns={"messages": "conversations"}))
register_format(DatasetFormat("text", ("text",), lambda row, columns: _text(row, columns["text"]), messages=False))
register_format(DatasetFormat("preference", ("prompt", "chosen", "rejected"), _preference_strings,
                              preference=True))
register_format(DatasetFormat("chat_preference", ("chosen", "rejected"), _preference_chat,
                              optional=("prompt",), preference=True))


def tokenize_sample(
    sample: Sample, tokenizer: Tokenizer, train_on_input: bool
) -> tuple[list[int], list[bool]]:
    """Token ids and mask (True = not trained on) of one sample."""
    if isinstance(sample, str):
        ids = tokenizer.encode(sample, add_bos=True, add_eos=True)
        return ids, [False] * len(ids)
    ids, mask = tokenizer.tokenize_messages(sample)
    return ids, ([False] * len(ids) if train_on_input else mask)


def shift_labels(tokens: np.ndarray, mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Labels of samples stored back to back (sample ``i`` is ``offsets[i]:offsets[i+1]``):
    ``labels[j] = tokens[j + 1]`` where that token is trained on, else -100, and -100
    for each sample's last token."""
    labels = np.full(len(tokens), IGNORE_INDEX, dtype=tokens.dtype)
    labels[:-1] = np.where(mask[1:], IGNORE_INDEX, tokens[1:])
    labels[offsets[1:] - 1] = IGNORE_INDEX
    return labels
