"""``python -m fastune.cli``: what torchrun starts on every rank."""

from fastune.cli import main

main()
