"""Third-party noise a user cannot act on, kept off the terminal unless ``--debug``:

- torchao's "Failed to load .../torchao/_C_mxfp8...so" lines at import (binaries
  built for another Python or for CUDA; harmless, fastune does not use them), and
  torch's deprecation notice about how torchao registers an enum;
- the ``datasets`` "Generating ... split" bars, one per data file (the loader's own
  lines say what was read);
- deprecation warnings (Deprecation, PendingDeprecation, Future) raised in other
  packages; fastune's own still show.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

# logger -> the messages of it that are noise
_NOISE = {
    "torchao": re.compile(r"Failed to load .*torchao[/\\]_C\w*.*\.so"),
    "torch.utils._pytree": re.compile(r".*deprecated", re.S),
}


class _NoiseFilter(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


_FILTERS = {name: _NoiseFilter(pattern) for name, pattern in _NOISE.items()}


def quiet_dependencies() -> None:
    """Call before torchao or datasets is imported (the CLI group does)."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name, noise in _FILTERS.items():
        logger = logging.getLogger(name)
        if noise not in logger.filters:
            logger.addFilter(noise)
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("default", category=category, module=r"fastune(\.|$)")  # checked first
