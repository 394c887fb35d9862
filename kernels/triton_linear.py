"""One custom op for a dual-sparse linear on GPU: the decode kernel for few tokens, the many-token
kernel otherwise.

The choice by token count is made inside the op, not in the caller: vLLM compiles the model for a
symbolic token count and drops shape guards, so a Python branch on ``x.shape[0]`` in the caller
would be frozen at trace time for every batch size.
"""

from __future__ import annotations

import torch

from vllm_duogpt.kernels.triton_decode import MAX_DECODE_TOKENS, triton_dual_sparse_decode
from vllm_duogpt.kernels.triton_decode import unavailable_reason as decode_unavailable_reason
from vllm_duogpt.kernels.triton_prefill import triton_dual_sparse_prefill
from vllm_duogpt.kernels.triton_prefill import unavailable_reason as prefill_unavailable_reason


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot run on ``device`` with ``dtype``, or None."""
    if device.type != "cuda":
        return f"device {device} is not a CUDA GPU"
    return decode_unavailable_reason(device, dtype) or prefill_unavailable_reason(device, dtype)


# x: [M, K]; values/bitmap/offsets: a GpuSparseWeight's tensors; bias: [N] or None
# out: [M, N] in x.dtype
@torch.library.custom_op("duogpt::triton_dual_sparse_linear", mutates_args=())
def triton_dual_sparse_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    bitmap: torch.Tensor,
    offsets: torch.Tensor,
    n: int,
    threshold: float,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``sparsify(x, threshold) @ W.T + bias`` with the kernel that fits ``x``'s token count."""
    if x.shape[0] <= MAX_DECODE_TOKENS:
        return triton_dual_sparse_decode(x, values, bitmap, offsets, n, threshold, bias)
    return triton_dual_sparse_prefill(x, values, bitmap, offsets, n, threshold, bias)


@triton_dual_sparse_linear.register_fake
def _linear_fake(
    x: torch.Tensor,
    values: torch.Tensor,
    bitmap: torch.Tensor,
    offsets: torch.Tensor,
    n: int,
    threshold: float,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)
