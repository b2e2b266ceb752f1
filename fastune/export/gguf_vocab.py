"""The tokenizer of a checkpoint as GGUF metadata, the way llama.cpp reads it.

Two kinds, as in llama.cpp's own converter:

- a Hugging Face ``tokenizer.json`` byte-level BPE (Llama 3, Qwen2, the demo model):
  ``tokenizer.ggml.model = "gpt2"`` with the tokens as tokenizer.json spells them
  (byte-level characters), their types, the merges, and ``tokenizer.ggml.pre``,
  the name of the pre-tokenizer llama.cpp must apply (its regexes are built in,
  keyed by that name);
- a SentencePiece ``tokenizer.model`` (Llama 2): ``"llama"`` with scores and types.

Special token ids, add-bos/eos flags, merges and the chat template come from the
``gguf`` package's ``SpecialVocab``, which reads tokenizer.json,
tokenizer_config.json and config.json as llama.cpp's converter does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional

import gguf

from fastune.data.tokenizer_llama3 import LLAMA3_PATTERN
from fastune.errors import FastuneError


class TokenizerExportError(FastuneError):
    """A tokenizer that cannot be written as GGUF metadata."""


# The pre-tokenizer regexes of tokenizer.json that llama.cpp has built in, by its name for them
# (the comments above its regexes in llama-vocab.cpp quote these tokenizer.json patterns).
_LLAMA3_REGEX = LLAMA3_PATTERN
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Pre-tokenizer steps (see _pre_steps) -> llama.cpp's name. "smollm" splits every digit,
# then applies GPT-2's regex: Digits(individual_digits) + ByteLevel(use_regex), the demo's.
_PRE_TOKENIZERS = {
    (("split", _LLAMA3_REGEX), ("byte_level", False)): "llama-bpe",
    (("split", _QWEN2_REGEX), ("byte_level", False)): "qwen2",
    (("byte_level", True),): "gpt-2",
    (("digits", True), ("byte_level", True)): "smollm",
}


@dataclasses.dataclass
class GGUFVocab:
    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    scores: Optional[list[float]]
    special: gguf.SpecialVocab
    warning: Optional[str] = None  # something the user should know (printed by the CLI)

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        self.special.add_to_gguf(writer, quiet=True)


def read_vocab(folder: Path, n_vocab: int) -> GGUFVocab:
    """The vocabulary of ``folder``, padded to ``n_vocab`` entries (the embedding's rows)."""
    hf_file, spm_file = folder / "tokenizer.json", folder / "tokenizer.model"
    if hf_file.is_file():
        tokenizer = json.loads(hf_file.read_text(encoding="utf-8"))
        if _is_byte_level_bpe(tokenizer):
            return _bpe_vocab(folder, tokenizer, n_vocab)
    if spm_file.is_file() and not _is_tiktoken(spm_file):
        return _sentencepiece_vocab(folder, n_vocab)
    raise TokenizerExportError(
        f"{folder}: GGUF export needs a byte-level BPE tokenizer.json or a SentencePiece tokenizer.model; "
        "a Meta tiktoken tokenizer.model alone is not supported (use the checkpoint's Hugging Face version)"
    )


def _is_byte_level_bpe(tokenizer: dict) -> bool:
    model, decoder = tokenizer.get("model") or {}, tokenizer.get("decoder") or {}
    return model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel"


def _is_tiktoken(path: Path) -> bool:
    from fastune.data.tokenizer import _looks_like_tiktoken

    return _looks_like_tiktoken(path)


def _bpe_vocab(folder: Path, tokenizer: dict, n_vocab: int) -> GGUFVocab:
    vocab: dict[str, int] = dict(tokenizer["model"]["vocab"])
    special_ids = set()
    user_defined_ids = set()
    for added in tokenizer.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        (special_ids if added.get("special") else user_defined_ids).add(added["id"])
    if len(vocab) > n_vocab or max(vocab.values()) >= n_vocab:
        raise TokenizerExportError(f"{folder / 'tokenizer.json'}: {len(vocab)} tokens (largest id "
                                   f"{max(vocab.values())}) do not fit the model's {n_vocab} embedding rows")
    by_id = {i: token for token, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # rows the embedding has and the tokenizer never produces (llama.cpp's padding)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(gguf.TokenType.CONTROL if i in special_ids
                     else gguf.TokenType.USER_DEFINED if i in user_defined_ids else gguf.TokenType.NORMAL)
    pre, warning = _pre_tokenizer(tokenizer, folder / "tokenizer.json")
    special = _special_vocab(folder, load_merges=True, n_vocab=n_vocab)
    return GGUFVocab("gpt2", pre, tokens, [int(t) for t in types], None, special, warning)


def _special_vocab(folder: Path, load_merges: bool, n_vocab: int) -> gguf.SpecialVocab:
    """gguf's reading of the special tokens, without its log warnings about post-processor
    templates it cannot fully parse (the demo's pair template): noise a user cannot act on."""
    log = logging.getLogger("gguf")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return gguf.SpecialVocab(folder, load_merges=load_merges, n_vocab=n_vocab)
    finally:
        log.setLevel(level)


def _pre_steps(node: Optional[dict]) -> tuple:
    """A tokenizer.json pre_tokenizer as a tuple of comparable steps."""
    if not node:
        return ()
    kind = node.get("type")
    if kind == "Sequence":
        return tuple(step for child in node.get("pretokenizers", []) for step in _pre_steps(child))
    if kind == "Split":
        pattern = node.get("pattern", {})
        return (("split", pattern.get("Regex", pattern.get("String"))),)
    if kind == "ByteLevel":
        return (("byte_level", bool(node.get("use_regex", True))),)
    if kind == "Digits":
        return (("digits", bool(node.get("individual_digits", False))),)
    return ((kind,),)


def _pre_tokenizer(tokenizer: dict, source: Path) -> tuple[str, Optional[str]]:
    """llama.cpp's name for the pre-tokenizer, and a warning when it has none."""
    name = _PRE_TOKENIZERS.get(_pre_steps(tokenizer.get("pre_tokenizer")))
    if name is not None:
        return name, None
    return "default", (f"{source}: llama.cpp has no built-in pre-tokenizer matching this one; "
                       "wrote 'default', so llama.cpp may split some text into other tokens than fastune")


def _sentencepiece_vocab(folder: Path, n_vocab: int) -> GGUFVocab:
    from sentencepiece import SentencePieceProcessor

    spm = gguf.vocab.SentencePieceVocab(folder)
    tokens, scores, types = [], [], []
    for text, score, token_type in spm.all_tokens():
        tokens.append(text.decode("utf-8"))
        scores.append(score)
        types.append(int(token_type))
    if len(tokens) > n_vocab:
        raise TokenizerExportError(f"{spm.fname_tokenizer}: {len(tokens)} tokens do not fit the model's "
                                   f"{n_vocab} embedding rows")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    special = _special_vocab(folder, load_merges=False, n_vocab=n_vocab)
    # A bare tokenizer.model (no tokenizer_config.json) names its special tokens itself;
    # Llama 2 adds bos and not eos.
    processor = SentencePieceProcessor(model_file=str(spm.fname_tokenizer))
    for kind, token_id in (("bos", processor.bos_id()), ("eos", processor.eos_id()), ("unk", processor.unk_id())):
        if token_id >= 0:
            special.special_token_ids.setdefault(kind, token_id)
    special.add_special_token.setdefault("bos", True)
    special.add_special_token.setdefault("eos", False)
    return GGUFVocab("llama", "default", tokens, types, scores, special)
