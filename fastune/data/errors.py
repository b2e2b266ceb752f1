"""Errors for bad data and tokenizer files: one line that names the file, row and column."""

from fastune.errors import FastuneError


class DataError(FastuneError, ValueError):
    """A dataset fastune cannot train on: missing file or column, bad encoding, bad row."""


class TokenizerError(DataError):
    """A tokenizer file fastune cannot load, or messages it cannot format."""
