"""Test-session settings that must exist before any test module imports our kernels."""

from __future__ import annotations

import os

import torch

# Triton has no CPU backend: without a GPU its kernel bodies run in the interpreter, which
# Triton reads when @triton.jit decorates a kernel, i.e. at import of the kernel modules.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
