"""Exceptions for bad user input.

The CLI prints a ``FastuneError`` as one line, ``error: <message>``, and exits
with status 2; any other exception is a bug and keeps its traceback. So raise a
``FastuneError`` (or a subclass) exactly when the user can fix the problem,
and make the message name the file and the key or row.
"""


class FastuneError(Exception):
    """A problem with the user's input (file, key, value), printed without a traceback."""


class ConfigError(FastuneError, ValueError):
    """A config fastune cannot use: a YAML recipe, a command-line override, or a model config.json."""
