"""Llama 2 tokenizer: Meta's sentencepiece ``tokenizer.model`` plus the ``[INST]`` chat format.

Chat format, as Meta's reference ``chat_completion`` builds it: the system prompt
goes inside the first user turn, and each user/assistant pair is one sentencepiece
string between ``<s>`` and ``</s>``::

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s><s>[INST] {user} [/INST]

Roles must alternate user, assistant, user, ... after an optional system message.
The `` {assistant} `` part and its ``</s>`` are trained on; the rest is masked.
Each pair is encoded as one string (not prompt and answer apart), so the ids equal
Meta's; the prompt/answer boundary is found from sentencepiece's byte offsets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import sentencepiece

from fastune.data.errors import TokenizerError
from fastune.data.tokenizer_base import Message, check_roles

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
ROLES = ("system", "user", "assistant")


class Llama2Tokenizer:
    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError):
            raise TokenizerError(f"{self.path}: neither a tiktoken rank file nor a sentencepiece model") from None
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(f"{self.path}: the sentencepiece model defines no <s> or </s> token")
        # Llama 2 has no pad token; padding is never attended to nor trained on,
        # so any id works and 0 (<unk>) is the usual choice.
        pad = self._sp.pad_id()
        self.pad_id = pad if pad >= 0 else 0
        self.stop_ids = (self.eos_id,)
        self.vocab_size = self._sp.vocab_size()

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Special-token strings in ``text`` are encoded as plain text, as in Meta's reference."""
        ids = self._sp.encode(text)
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # sentencepiece drops control tokens (<s>, </s>) when decoding; spell them
        # out on request. Each run between them decodes on its own, so (like the
        # start of a text) it loses its leading space: this is for display only.
        if skip_special_tokens:
            return self._sp.decode(list(ids))
        out, run = [], []
        for i in ids:
            if self._sp.is_control(i):
                out += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out) + self._sp.decode(run)

    def tokenize_messages(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        turns = self._turns(messages)
        ids: list[int] = []
        mask: list[bool] = []
        for user, answer in turns:
            prompt = f"{B_INST} {user.strip()} {E_INST}"
            if answer is None:
                body = self._sp.encode(prompt)
                ids += [self.bos_id, *body]
                mask += [True] * (1 + len(body))
                continue
            text = f"{prompt} {answer.strip()} "
            pieces = self._sp.encode(text, return_type="proto").pieces
            answer_start = len(prompt.encode("utf-8"))
            ids += [self.bos_id, *(p.id for p in pieces), self.eos_id]
            mask += [True, *(p.begin < answer_start for p in pieces), False]
        if add_generation_prompt and (not turns or turns[-1][1] is not None):
            raise TokenizerError(f"{self.path}: a Llama 2 generation prompt must end with a user message")
        return ids, mask

    def _turns(self, messages: Sequence[Message]) -> list[tuple[str, str | None]]:
        """(user, assistant or None) pairs, with the system prompt folded into the first user turn."""
        check_roles(messages, ROLES, str(self.path))
        messages = list(messages)
        system = None
        if messages and messages[0]["role"] == "system":
            system = messages.pop(0)["content"]
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise TokenizerError(
                    f"{self.path}: Llama 2 chat needs roles to alternate user/assistant after an "
                    f"optional system message; message {i + (system is not None)} is {message['role']!r}"
                )
        users = [m["content"] for m in messages[0::2]]
        answers: list[str | None] = [m["content"] for m in messages[1::2]]
        answers += [None] * (len(users) - len(answers))
        if system is not None and users:
            users[0] = B_SYS + system + E_SYS + users[0]
        return list(zip(users, answers))
