"""Llama 3 tokenizer: Meta's tiktoken ``tokenizer.model`` plus the Llama 3 chat format.

The file holds only the byte-level BPE ranks, one ``<base64 bytes> <rank>`` line per
token. The 256 special tokens come after them (ids 128000..128255 for the real
vocabulary), in the order of Meta's Llama 3.1 reference tokenizer.

Chat format (Meta's and the Hugging Face template's)::

    <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>...

Assistant content and its ``<|eot_id|>`` are trained on; headers, system and user
turns are masked.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from typing import Sequence, Union

import tiktoken

from fastune.data.errors import TokenizerError
from fastune.data.tokenizer_base import Message, check_roles

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
_NAMED_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
ROLES = ("system", "user", "assistant", "ipython")

# tiktoken's regex backtracks through a whitespace run and overflows its stack
# somewhere between 400k and 1M characters, so longer runs are cut at this length
# (Meta's reference cuts at the same length).
_MAX_WHITESPACE_RUN = 25_000
_LONG_WHITESPACE = re.compile(r"\s{%d,}" % (_MAX_WHITESPACE_RUN + 1))


def llama3_special_tokens(num_base_tokens: int) -> dict[str, int]:
    """Meta's 256 special tokens, numbered from the end of the base vocabulary."""
    reserved = [
        f"<|reserved_special_token_{3 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(_NAMED_SPECIALS))
    ]
    return {tok: num_base_tokens + i for i, tok in enumerate(_NAMED_SPECIALS + reserved)}


def load_tiktoken_ranks(path: Union[str, Path]) -> dict[bytes, int]:
    """Read a tiktoken rank file, naming the line of any malformed entry."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise TokenizerError(
                    f"{path} line {lineno}: expected '<base64 token> <rank>', got {line[:60]!r}"
                ) from None
    if not ranks:
        raise TokenizerError(f"{path}: empty tiktoken rank file")
    return ranks


class Llama3Tokenizer:
    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        ranks = load_tiktoken_ranks(self.path)
        self.num_base_tokens = len(ranks)
        self.special_tokens = llama3_special_tokens(self.num_base_tokens)
        try:
            self._enc = tiktoken.Encoding(
                name=self.path.name,
                pat_str=LLAMA3_PATTERN,
                mergeable_ranks=ranks,
                special_tokens=self.special_tokens,
            )
        except ValueError as e:  # e.g. ranks that are not 0..n-1
            raise TokenizerError(f"{self.path}: not a valid tiktoken rank file ({e})") from None
        sp = self.special_tokens
        self.bos_id = sp["<|begin_of_text|>"]
        self.eos_id = sp["<|end_of_text|>"]
        self.pad_id = sp["<|finetune_right_pad_id|>"]
        self.start_header_id = sp["<|start_header_id|>"]
        self.end_header_id = sp["<|end_header_id|>"]
        self.eot_id = sp["<|eot_id|>"]
        self.eom_id = sp["<|eom_id|>"]
        self.stop_ids = (self.eot_id, self.eom_id, self.eos_id)
        self.vocab_size = self._enc.n_vocab

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Special-token strings in ``text`` are encoded as plain text, as in Meta's reference."""
        ids = [self.bos_id] if add_bos else []
        for piece in _cut_long_whitespace(text):
            ids += self._enc.encode(piece, allowed_special=set(), disallowed_special=())
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i < self.num_base_tokens]
        return self._enc.decode(list(ids))

    def _header(self, role: str) -> list[int]:
        return [self.start_header_id, *self.encode(role, add_bos=False), self.end_header_id,
                *self.encode("\n\n", add_bos=False)]

    def tokenize_messages(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        check_roles(messages, ROLES, str(self.path))
        ids, mask = [self.bos_id], [True]
        for message in messages:
            header = self._header(message["role"])
            body = self.encode(message["content"].strip(), add_bos=False) + [self.eot_id]
            ids += header + body
            mask += [True] * len(header) + [message["role"] != "assistant"] * len(body)
        if add_generation_prompt:
            header = self._header("assistant")
            ids += header
            mask += [True] * len(header)
        return ids, mask


def _cut_long_whitespace(text: str) -> list[str]:
    """``text`` split so that no piece holds a whitespace run longer than the regex can take."""
    if len(text) <= _MAX_WHITESPACE_RUN:
        return [text]
    pieces, start = [], 0
    for run in _LONG_WHITESPACE.finditer(text):
        pieces.append(text[start:run.start()])
        pieces += [text[i:min(i + _MAX_WHITESPACE_RUN, run.end())]
                   for i in range(run.start(), run.end(), _MAX_WHITESPACE_RUN)]
        start = run.end()
    pieces.append(text[start:])
    return [p for p in pieces if p]
