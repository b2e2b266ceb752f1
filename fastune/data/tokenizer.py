"""``load_tokenizer``, which finds the right tokenizer in a checkpoint.

Three implementations share one interface (``fastune.data.tokenizer_base``):

- ``Llama3Tokenizer``: Meta's tiktoken ``tokenizer.model`` (base64 rank lines).
- ``Llama2Tokenizer``: Meta's sentencepiece ``tokenizer.model``.
- ``HFTokenizer``: any Hugging Face ``tokenizer.json`` plus the Jinja ``chat_template``.

``tokenize_messages`` returns ``(ids, mask)`` where ``mask[i]`` is True for a token
that must NOT be trained on: everything except assistant content and the token
that ends an assistant turn. Generation calls it with ``add_generation_prompt=True``.

Special-token strings inside text: the native Llama tokenizers follow Meta's
reference and encode them as plain text (specials only come from the chat format);
``HFTokenizer`` follows ``transformers`` and turns them into special tokens, as
``tokenizer(text)`` and ``apply_chat_template`` do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Union

from fastune.data.errors import TokenizerError
from fastune.data.tokenizer_base import Tokenizer

TokenizerKind = Literal["auto", "hf", "llama3", "llama2"]

# A tiktoken rank file is text lines "<base64 token> <rank>"; a sentencepiece
# model is a binary protobuf, so its first bytes never look like that.
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]*={0,2} \d+\r?$")


def load_tokenizer(path: Union[str, Path], kind: TokenizerKind = "auto") -> Tokenizer:
    """The tokenizer of a checkpoint directory, or of one tokenizer file.

    ``auto`` looks in this order: ``tokenizer.json`` (Hugging Face, with the chat
    template of ``tokenizer_config.json``), then ``tokenizer.model`` and
    ``original/tokenizer.model`` (Meta's format), telling Llama 3 (tiktoken) from
    Llama 2 (sentencepiece) by the file's content.
    """
    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"{path}: no such tokenizer file or directory")
    if kind not in ("auto", "hf", "llama3", "llama2"):
        raise TokenizerError(f"{path}: unknown tokenizer kind {kind!r} (auto, hf, llama3, llama2)")
    if path.is_dir():
        hf_file = path / "tokenizer.json"
        meta_file = next(
            (p for p in (path / "tokenizer.model", path / "original" / "tokenizer.model") if p.is_file()),
            None,
        )
        if kind in ("auto", "hf") and hf_file.is_file():
            path = hf_file
        elif kind != "hf" and meta_file is not None:
            path = meta_file
        else:
            wanted = "tokenizer.json" if kind == "hf" else "tokenizer.json or tokenizer.model"
            raise TokenizerError(f"{path}: no {wanted} in this directory")
    if path.suffix == ".json":
        if kind not in ("auto", "hf"):
            raise TokenizerError(f"{path}: a tokenizer.json is a Hugging Face tokenizer, not {kind}")
        from fastune.data.tokenizer_hf import HFTokenizer

        return HFTokenizer.from_file(path)
    detected = "llama3" if _looks_like_tiktoken(path) else "llama2"
    if kind in ("llama3", "llama2") and kind != detected:
        raise TokenizerError(f"{path}: asked for a {kind} tokenizer but the file is a {detected} one")
    if detected == "llama3":
        from fastune.data.tokenizer_llama3 import Llama3Tokenizer

        return Llama3Tokenizer(path)
    from fastune.data.tokenizer_llama2 import Llama2Tokenizer

    return Llama2Tokenizer(path)


def _looks_like_tiktoken(path: Path) -> bool:
    with open(path, "rb") as f:
        first_line = f.readline(4096).rstrip(b"\n")
    return bool(_TIKTOKEN_LINE.match(first_line))
