"""Keeping credentials out of what fastune writes: logged and saved configs."""

from __future__ import annotations

import re
from typing import Any, Mapping

# Singular words: `max_new_tokens` and `num_tokens` are counts, not credentials.
_SECRET_KEY = re.compile(r"(^|_)(token|key|secrets?|password|passwd|api_?key|credentials?)($|_)")
_SECRET_VALUE = re.compile(r"hf_[A-Za-z0-9]{30,}")


def _is_secret_key(name: str) -> bool:
    # `hf_token`, `api-key`, `wandbApiKey`; not `tokenizer`, `keep_last_n` or `max_new_tokens`.
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).replace("-", "_").replace(".", "_")
    return bool(_SECRET_KEY.search(words.lower()))


def redact_secrets(value: Any) -> Any:
    """A copy of a nested dict/list without secret-looking keys or token-looking strings."""
    if isinstance(value, Mapping):
        return {k: redact_secrets(v) for k, v in value.items()
                if not _is_secret_key(k) and not (isinstance(v, str) and _SECRET_VALUE.search(v))}
    if isinstance(value, (list, tuple)):
        return [redact_secrets(v) for v in value if not (isinstance(v, str) and _SECRET_VALUE.search(v))]
    return value
