"""Text in and out of generation: prompts in the model's chat format, streamed output."""

from __future__ import annotations

from typing import Callable, Optional

from fastune.data import Tokenizer, TokenizerError


def has_chat_format(tokenizer: Tokenizer) -> bool:
    """Meta's Llama tokenizers always have one; a tokenizer.json needs a chat template."""
    return getattr(tokenizer, "chat_template", "built-in") is not None


def prompt_ids(tokenizer: Tokenizer, prompt: str, chat: Optional[bool] = None,
               system: Optional[str] = None) -> list[int]:
    """Token ids of ``prompt``: a user turn in the chat format, ending with the
    assistant's header (``chat``; None: when the tokenizer has a chat format), or
    plain text after bos."""
    if chat is None:
        chat = has_chat_format(tokenizer)
    if not chat:
        if system is not None:
            raise TokenizerError("--system needs the chat format (drop --no-chat)")
        return tokenizer.encode(prompt, add_bos=True)
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": prompt})
    ids, _ = tokenizer.tokenize_messages(messages, add_generation_prompt=True)
    return ids


class TextStream:
    """Decodes one sequence's tokens as they come and passes on the new text.

    Each step decodes everything so far and emits what was not emitted yet, so a
    character spread over several byte tokens comes out whole: text that ends in
    an incomplete character (U+FFFD) is held back until the next token, or until
    ``flush`` at the end. Stop tokens are never shown.
    """

    def __init__(self, tokenizer: Tokenizer, write: Callable[[str], None], stop_ids=()):
        self.tokenizer = tokenizer
        self.write = write
        self.stop_ids = set(stop_ids)
        self.ids: list[int] = []
        self.shown = 0
        self.stopped = False

    def __call__(self, tokens: list[int]) -> None:
        """``tokens``: the new token of each row (``Generator`` callback); row 0 is shown."""
        token = tokens[0]
        if self.stopped or token in self.stop_ids:
            self.stopped = True
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.write(text[self.shown:])
        self.shown = len(text)

    def flush(self) -> None:
        """Pass on what was held back (generation ended inside a character)."""
        text = self.tokenizer.decode(self.ids)
        if len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)
