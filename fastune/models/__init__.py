"""Model families (``spec``, ``families``), their config and the shared decoder.

Names are imported on first use (PEP 562), so ``fastune.models.spec`` (read by
the config schema) does not import torch.
"""

from fastune.lazy import lazy_attributes

# The built-in families register their specs on import (no torch at module level); any
# import of a ``fastune.models`` module runs this first, so the registry is never empty.
import fastune.models.families  # noqa: F401,E402
import fastune.models.gemma  # noqa: F401,E402
import fastune.models.phi3  # noqa: F401,E402

_LAZY = {
    "ConfigError": "fastune.models.config",
    "ModelConfig": "fastune.models.config",
    "Transformer": "fastune.models.transformer",
    "ModelSpec": "fastune.models.spec",
    "get_spec": "fastune.models.spec",
}

__all__ = list(_LAZY)


__getattr__ = lazy_attributes(__name__, _LAZY)
