"""Triton kernels, one op per file, each with its PyTorch reference beside it.

Installed as `coral_fast.kernels` (not a top-level `kernels`, which would shadow Hugging Face's
`kernels` package that transformers probes for).
"""
