"""Triton kernels with reference PyTorch implementations, imported as ``fastune.kernels``.

This package depends on torch and triton only, never on the rest of fastune.
"""
