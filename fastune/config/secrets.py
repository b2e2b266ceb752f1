"""Keeping credentials out of what fastune writes: saved and logged configs,
logger arguments, error lines and tracebacks.

Two kinds of values count as secrets:

- every value a config read from the environment (``${oc.env:NAME}``): the
  resolver below remembers it, and redaction writes ``${oc.env:NAME}`` back in
  its place, so a saved config still resolves to it on the next run and paths
  built from ``${oc.env:HOME}`` stay readable;
- strings shaped like known tokens (Hugging Face, W&B, OpenAI-style, AWS), under
  any key, and values of keys named like credentials.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

# Singular words: `max_new_tokens` and `num_tokens` are counts, not credentials.
_SECRET_KEY = re.compile(r"(^|_)(token|key|secrets?|password|passwd|api_?key|credentials?)($|_)")
_TOKEN_SHAPES = re.compile(
    r"hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|(?<![0-9a-fA-F])[0-9a-f]{40}(?![0-9a-fA-F])"  # W&B API key (40 hex digits)
    r"|sk-[A-Za-z0-9_-]{20,}"  # OpenAI-style
    r"|(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"  # AWS access key id
)
# AWS secret access key: 40 base64 characters; checked for mixed case and digits below,
# since a bare 40-character run also matches ordinary words and paths.
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
REDACTED = "[redacted]"
# Shorter environment values (HOME=/root, a rank number) are no credentials, and
# replacing them inside other text would garble it.
_MIN_ENV_SECRET = 8

_env_values: dict[str, str] = {}  # value -> NAME, of every ${oc.env:NAME} resolved so far


def resolve_env(key: str, *default: Any) -> Any:
    """``${oc.env:NAME[,default]}``, as OmegaConf's own, remembering the value read."""
    from omegaconf.resolvers.oc import env

    value = env(key, *default)
    if key in os.environ and len(os.environ[key]) >= _MIN_ENV_SECRET:
        _env_values[os.environ[key]] = key
    return value


def _aws_secret(match: re.Match) -> str:
    text = match.group()
    mixed = any(c.isdigit() for c in text) and any(c.isupper() for c in text) and any(c.islower() for c in text)
    return REDACTED if mixed and not text.startswith("/") else text


def redact_text(text: str) -> str:
    """``text`` with environment values as ``${oc.env:NAME}`` and token-shaped strings as [redacted]."""
    for value in sorted(_env_values, key=len, reverse=True):
        text = text.replace(value, "${oc.env:" + _env_values[value] + "}")
    text = _TOKEN_SHAPES.sub(REDACTED, text)
    return _AWS_SECRET.sub(_aws_secret, text)


def _is_secret_key(name: str) -> bool:
    # `hf_token`, `api-key`, `wandbApiKey`; not `tokenizer`, `keep_last_n` or `max_new_tokens`.
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).replace("-", "_").replace(".", "_")
    return bool(_SECRET_KEY.search(words.lower()))


def _has_token(value: Any) -> bool:
    return isinstance(value, str) and REDACTED in redact_text(value)


def redact_secrets(value: Any) -> Any:
    """A copy of a nested dict/list without secret-looking keys or token-looking strings,
    and with values read from the environment written as ``${oc.env:NAME}``."""
    if isinstance(value, Mapping):
        return {k: redact_secrets(v) for k, v in value.items() if not _is_secret_key(k) and not _has_token(v)}
    if isinstance(value, (list, tuple)):
        return [redact_secrets(v) for v in value if not _has_token(v)]
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_arguments(value: Any) -> Any:
    """A copy of keyword arguments for a third-party call (``wandb.init``), every string redacted."""
    if isinstance(value, Mapping):
        return {k: redact_arguments(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_arguments(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_exception(error: BaseException) -> None:
    """Redact the messages of ``error`` and the exceptions it chains, in place, before its
    traceback is printed."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        error.args = tuple(redact_text(a) if isinstance(a, str) else a for a in error.args)
        error = error.__cause__ or error.__context__
