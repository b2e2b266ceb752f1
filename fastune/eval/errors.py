"""The evaluation error, in a module of its own so that the harness adapter
(``eval/lm.py``) and the runner (``eval/run.py``) both use it without importing each other."""

from fastune.errors import FastuneError


class EvalError(FastuneError):
    """An evaluation that cannot run as asked (lm-eval missing, unknown task, no chat template)."""
