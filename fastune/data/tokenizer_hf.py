"""Any Hugging Face ``tokenizer.json``, with the Jinja chat template of its checkpoint.

Encoding goes through the ``tokenizers`` library itself, so ids equal those of
``transformers``. The chat template comes from ``chat_template.jinja`` or from
``tokenizer_config.json``'s ``chat_template`` and is rendered in a sandboxed Jinja
environment set up as ``apply_chat_template`` sets up its own (same globals and
filters), then the whole string is tokenized once, as ``apply_chat_template`` does.

Masking: the trained span of assistant message ``i`` runs from the end of
``render(messages[:i], add_generation_prompt=True)`` to the end of
``render(messages[:i + 1])``: its content plus whatever closes the turn (for
example ``<|eot_id|>``). A token is trained iff it starts inside such a span. This
needs a template that renders a conversation's prefix as a prefix of the whole,
with one allowance: an earlier assistant turn may lose its head once later turns
exist (Qwen3's template drops the ``<think>`` block of turns before the last user
message); the span is then what the whole conversation keeps of that turn. Any
other rewriting of earlier turns gets a clear error.
"""

from __future__ import annotations

import bisect
import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import jinja2
import tokenizers
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fastune.data.errors import TokenizerError
from fastune.data.tokenizer_base import Message

_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class HFTokenizer:
    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        special_tokens: dict[str, Optional[str]],
        chat_template: Optional[str],
        extra_stop_ids: Sequence[int] = (),
        source: str = "tokenizer.json",
    ):
        """``special_tokens`` maps bos_token/eos_token/pad_token/unk_token to token strings."""
        self._tok = tokenizer
        self.source = source
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        if "eos_token" not in self.special_tokens:
            raise TokenizerError(f"{source}: no eos_token in tokenizer_config.json or special_tokens_map.json")
        ids = {key: self._token_id(key, tok) for key, tok in self.special_tokens.items()}
        self.bos_id: Optional[int] = ids.get("bos_token")
        self.eos_id: int = ids["eos_token"]
        # Without a pad token, pad with eos: padding is never attended to nor trained on.
        self.pad_id: int = ids.get("pad_token", self.eos_id)
        self.stop_ids = tuple(dict.fromkeys([self.eos_id, *extra_stop_ids]))
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self._template = _compile_template(chat_template, source) if chat_template else None

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "HFTokenizer":
        """Load ``tokenizer.json`` and, from the same directory, ``tokenizer_config.json``,
        ``special_tokens_map.json``, ``chat_template.jinja`` and ``generation_config.json``."""
        path = Path(path)
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exceptions
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        folder = path.parent
        config = _read_json(folder / "tokenizer_config.json")
        special = {k: _token_content(v) for k, v in _read_json(folder / "special_tokens_map.json").items()}
        special.update({k: _token_content(config[k]) for k in _SPECIAL_KEYS if k in config})
        special = {k: special.get(k) for k in _SPECIAL_KEYS}
        template_file = folder / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() \
            else _pick_template(config.get("chat_template"), folder / "tokenizer_config.json")
        eos = _read_json(folder / "generation_config.json").get("eos_token_id", [])
        extra_stop_ids = [eos] if isinstance(eos, int) else list(eos)
        return cls(tok, special, template, extra_stop_ids, source=str(path))

    def _token_id(self, key: str, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.source}: {key} {token!r} is not in the vocabulary")
        return token_id

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Special-token strings in ``text`` become special tokens, as in ``transformers``.
        ``add_bos`` does nothing for a tokenizer without a bos token (Qwen2, for example)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The chat template applied to ``messages``, as text."""
        if self._template is None:
            raise TokenizerError(
                f"{self.source}: no chat_template (in tokenizer_config.json or chat_template.jinja); "
                "use the text format, or add a template"
            )
        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except jinja2.TemplateError as e:
            raise TokenizerError(f"{self.source}: chat_template: {e.message or type(e).__name__}") from None

    def tokenize_messages(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        text = self.render(messages, add_generation_prompt)
        spans = []  # [start, end) character ranges of trained text, in order
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            last = i == len(messages) - 1 and not add_generation_prompt
            through = text if last else self.render(messages[: i + 1])
            end = len(through) if text.startswith(through) else None
            if end is None and through.startswith(before) and text.startswith(before):
                end = _rewritten_turn_end(through[len(before):], text, len(before), message)
            if end is None or not through.startswith(before):
                raise TokenizerError(
                    f"{self.source}: the chat_template renders earlier turns differently once later "
                    "turns are added, so fastune cannot tell which tokens are the assistant's"
                )
            spans.append((len(before), end))
        encoding = self._tok.encode(text, add_special_tokens=False)
        starts = [start for start, _ in encoding.offsets]  # non-decreasing
        mask = [True] * len(starts)
        for start, end in spans:
            lo, hi = bisect.bisect_left(starts, start), bisect.bisect_left(starts, end)
            mask[lo:hi] = [False] * (hi - lo)
        return encoding.ids, mask


def _rewritten_turn_end(turn: str, text: str, start: int, message: Message) -> Optional[int]:
    """Where an earlier assistant turn ends in the whole conversation ``text`` when the
    template renders it shorter once later turns exist (Qwen3 drops the ``<think>``
    block of turns before the last user message): the longest tail of the turn as
    rendered last (``turn``) that ``text`` has at ``start``. None if that tail does not
    hold the last line of the message's content (the template rewrote more than a head)."""
    content = message.get("content")
    last_line = content.strip().splitlines()[-1] if isinstance(content, str) and content.strip() else ""
    for cut in range(len(turn)):
        tail = turn[cut:]
        if text.startswith(tail, start):
            return start + len(tail) if last_line in tail else None
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None


def _token_content(value: Any) -> Optional[str]:
    """Special tokens are saved as strings or as AddedToken dicts with a 'content' key."""
    return value.get("content") if isinstance(value, dict) else value


def _pick_template(value: Any, source: Path) -> Optional[str]:
    """``chat_template`` is a string, or a list of {name, template} of which 'default' is used."""
    if value is None or isinstance(value, str):
        return value
    templates = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if "default" not in templates:
        raise TokenizerError(f"{source}: chat_template is a list without a 'default' entry")
    return templates["default"]


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for transformers'
    own masking; fastune finds the spans itself, so the tag just renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore names, which could reach Python internals."""

    def __init__(*args, **kwargs):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile_template(template: str, source: str) -> jinja2.Template:
    # Templates come from downloaded checkpoints: untrusted code, hence the sandbox.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        namespace=_Namespace,
    )
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"{source}: chat_template line {e.lineno}: {e.message}") from None
