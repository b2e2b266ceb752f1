"""The package list: every package under fastune/, found, plus the three that live
outside it (mapped by package-dir in pyproject.toml), which discovery cannot see.
Everything else about the build is in pyproject.toml."""

from setuptools import find_packages, setup

MAPPED = ["fastune.kernels", "fastune.configs", "fastune.profiles"]

setup(packages=find_packages(".", include=["fastune", "fastune.*"]) + MAPPED)
