"""An Ollama ``Modelfile`` beside an exported GGUF file.

Ollama's ``TEMPLATE`` is a Go template, not Jinja, so the model's chat template is
translated by what it renders rather than by its source: it is rendered on sample
conversations with marker contents, and the text around the markers gives each
role's prefix and suffix. The Go template built from those pieces is checked by
rendering the same conversations the way Ollama would (``_render_go``) and
comparing with the Jinja output; a template that does not fit this shape (one that
folds the system message into the first user turn, say) gets no ``TEMPLATE`` line,
and Ollama falls back on the chat template stored in the GGUF file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

_SYS, _U1, _A1, _U2 = "\x01SYSTEM\x01", "\x01USER1\x01", "\x01ASSISTANT1\x01", "\x01USER2\x01"


@dataclasses.dataclass(frozen=True)
class _Pieces:
    start: str  # before everything (bos stripped: llama.cpp adds it)
    default_system: str  # what the template writes when there is no system message
    system_prefix: str
    system_suffix: str
    user_prefix: str
    after_user: str  # between a user turn and the assistant's reply in the history
    generation: str  # after the last user turn: the assistant header the model continues
    assistant_suffix: str  # between an assistant turn and the next user turn


def write_modelfile(gguf_path: Path, tokenizer, stop_tokens: Sequence[str]) -> tuple[Path, bool]:
    """Write ``Modelfile`` beside ``gguf_path``; (its path, whether it has a TEMPLATE)."""
    lines = [f"FROM ./{gguf_path.name}", ""]
    template = modelfile_template(tokenizer)
    if template is not None:
        lines += [f'TEMPLATE """{template}"""', ""]
    lines += [f'PARAMETER stop "{_quote(s)}"' for s in dict.fromkeys(stop_tokens)]
    path = gguf_path.parent / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, template is not None


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def modelfile_template(tokenizer) -> Optional[str]:
    """The Go template equivalent to ``tokenizer``'s chat template, or None."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    bos = tokenizer.special_tokens.get("bos_token") if hasattr(tokenizer, "special_tokens") else None
    try:
        pieces = _derive(lambda msgs, gen: _strip_bos(tokenizer.render(msgs, gen), bos))
    except Exception:  # a template that fails on the sample conversations: no TEMPLATE
        return None
    if pieces is None:
        return None
    template = _go_template(pieces)
    if "{{" in "".join(dataclasses.astuple(pieces)) or '"""' in template:
        return None
    return template


def _strip_bos(text: str, bos: Optional[str]) -> str:
    return text[len(bos):] if bos and text.startswith(bos) else text


def _split(text: str, markers: Sequence[str]) -> Optional[list[str]]:
    """The text between ``markers``, which must appear in this order, once each."""
    parts = []
    for marker in markers:
        if text.count(marker) != 1:
            return None
        before, text = text.split(marker)
        parts.append(before)
    return parts + [text]


def _common_suffix(*texts: str) -> str:
    n = 0
    while all(len(t) > n for t in texts) and len({t[len(t) - n - 1] for t in texts}) == 1:
        n += 1
    return texts[0][len(texts[0]) - n:]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _derive(render) -> Optional[_Pieces]:
    history = _split(render([_user(_U1), {"role": "assistant", "content": _A1}, _user(_U2)], True), [_U1, _A1, _U2])
    with_system = _split(render([{"role": "system", "content": _SYS}, _user(_U1)], True), [_SYS, _U1])
    if history is None or with_system is None:
        return None
    x0, x1, x2, generation = history
    z0, z1, _ = with_system
    user_prefix = _common_suffix(x0, x2, z1)
    if not user_prefix:
        return None
    before_user = x0[: len(x0) - len(user_prefix)]
    start = _common_prefix(before_user, z0)
    pieces = _Pieces(
        start=start,
        default_system=before_user[len(start):],
        system_prefix=z0[len(start):],
        system_suffix=z1[: len(z1) - len(user_prefix)],
        user_prefix=user_prefix,
        after_user=x1,
        generation=generation,
        assistant_suffix=x2[: len(x2) - len(user_prefix)],
    )
    for messages in _SAMPLES:
        if _render_go(pieces, messages) != render(messages, True):
            return None
    return pieces


_SAMPLES = [
    [_user("Hi there.")],
    [{"role": "system", "content": "Be brief."}, _user("Hi.")],
    [_user("One"), {"role": "assistant", "content": "Two"}, _user("Three")],
    [{"role": "system", "content": "S"}, _user("A"), {"role": "assistant", "content": "B"}, _user("C"),
     {"role": "assistant", "content": "D"}, _user("E")],
]


def _go_template(p: _Pieces) -> str:
    """Ollama's template: .System is the system message, .Messages the conversation."""
    default = f"{{{{ else }}}}{p.default_system}" if p.default_system else ""
    return (
        f"{p.start}{{{{ if .System }}}}{p.system_prefix}{{{{ .System }}}}{p.system_suffix}{default}{{{{ end }}}}"
        "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        f'{{{{ if eq .Role "user" }}}}{p.user_prefix}{{{{ .Content }}}}'
        f"{{{{ if $last }}}}{p.generation}{{{{ else }}}}{p.after_user}{{{{ end }}}}"
        '{{ else if eq .Role "assistant" }}{{ .Content }}'
        f"{{{{ if not $last }}}}{p.assistant_suffix}{{{{ end }}}}"
        "{{ end }}{{ end }}"
    )


def _render_go(p: _Pieces, messages: list[dict]) -> str:
    """What Ollama renders from ``_go_template(p)`` for ``messages`` (ending with a user turn)."""
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    out = [p.start, p.system_prefix + system + p.system_suffix if system else p.default_system]
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        if m["role"] == "user":
            out.append(p.user_prefix + m["content"] + (p.generation if last else p.after_user))
        elif m["role"] == "assistant":
            out.append(m["content"] + ("" if last else p.assistant_suffix))
    return "".join(out)
