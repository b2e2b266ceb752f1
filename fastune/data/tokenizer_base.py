"""The tokenizer interface the implementations share (``fastune.data.tokenizer``
picks one): the ``Tokenizer`` protocol, chat ``Message``s and their role check.
"""

from __future__ import annotations

from typing import Protocol, Sequence, TypedDict

from fastune.data.errors import TokenizerError


class Message(TypedDict):
    role: str
    content: str


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]
    vocab_size: int

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def tokenize_messages(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]: ...


def check_roles(messages: Sequence[Message], allowed: Sequence[str], source: str) -> None:
    """Raise on a message without a string role/content, or with a role the format lacks."""
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in allowed:
            raise TokenizerError(
                f"{source}: message {i} has unknown role {role!r} (expected one of {', '.join(allowed)})"
            )
        if not isinstance(content, str):
            raise TokenizerError(f"{source}: message {i} ({role}) has content of type "
                                 f"{type(content).__name__}, expected a string")
