"""Plain-torch dual-sparse linear: the CPU fallback and the test oracle for every kernel.

A dual-sparse linear zeroes the input channels whose magnitude is below the layer's activation
threshold (``|x_j| < tau``, method.md section 3) and multiplies by a weight whose pruned entries
are zero. Here the weight is a dense tensor holding those zeros, so the result is exactly what the
sparse kernels must reproduce.
"""

from __future__ import annotations

import torch


def sparsify_activations(x: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Zero every entry of ``x`` whose magnitude is below ``threshold``.

    Args:
        x: activations, any shape.
        threshold: scalar magnitude threshold (``0`` keeps everything).

    Returns:
        A tensor like ``x`` with ``x[|x| < threshold] = 0``.
    """
    return torch.where(x.abs() < threshold, torch.zeros((), dtype=x.dtype, device=x.device), x)


# x: [M, K], weight: [N, K] (pruned entries already zero), bias: [N] or None
# out: [M, N]
def dual_sparse_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    threshold: float | torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference dual-sparse product ``sparsify(x, threshold) @ weight.T + bias``.

    Args:
        x: ``[M, K]`` activations.
        weight: ``[N, K]`` masked dense weight.
        threshold: activation threshold of this layer's input.
        bias: optional ``[N]`` bias.

    Returns:
        ``[M, N]`` output in ``x``'s dtype.
    """
    assert x.shape[-1] == weight.shape[1], f"x {tuple(x.shape)} vs weight {tuple(weight.shape)}"
    return torch.nn.functional.linear(sparsify_activations(x, threshold), weight, bias)


@torch.library.custom_op("duogpt::reference_dual_sparse_linear", mutates_args=())
def reference_dual_sparse_linear_op(
    x: torch.Tensor, weight: torch.Tensor, threshold: float, bias: torch.Tensor | None
) -> torch.Tensor:
    """The reference product as a torch custom op, so torch.compile traces it as one node."""
    return dual_sparse_linear_reference(x, weight, threshold, bias).contiguous()


@reference_dual_sparse_linear_op.register_fake
def _reference_fake(
    x: torch.Tensor, weight: torch.Tensor, threshold: float, bias: torch.Tensor | None
) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])
