"""Which kernel runs a dual-sparse linear: an ordered list of candidates, torch last.

Each candidate says why it cannot run on a device and dtype (vLLM's MPLinearKernel pattern); the
first that can is used for every linear of the model, and the choice is logged once per process.
A candidate converts the loaded dense staging weight into its own layout in ``prepare`` and frees
what it does not need.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

import torch

logger = logging.getLogger("vllm.duogpt")  # under vLLM's configured logger

_FP16_MAX = 65504.0


class DualSparseKernel(Protocol):
    """What the linear method needs from a kernel."""

    name: str

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this kernel cannot run here, or None when it can."""

    def prepare(self, layer: torch.nn.Module) -> None:
        """Convert ``layer.weight`` (masked dense, this rank's slice) into the kernel's layout."""

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``x: [M, K]`` -> ``[M, N]`` row-major."""


class TorchReferenceKernel:
    """The plain-torch path: masked dense weight, threshold applied in torch. Runs anywhere."""

    name = "torch-reference"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    def prepare(self, layer: torch.nn.Module) -> None:
        import vllm_duogpt.kernels.reference  # noqa: F401  (registers the custom op)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return torch.ops.duogpt.reference_dual_sparse_linear(
            x, layer.weight, layer.duogpt_threshold, bias
        )


class TritonKernel:
    """GPU: the Triton decode kernel for few tokens per step, the many-token kernel otherwise
    (kernels/triton_linear.py), on the tiled bitmap layout (kernels/gpu_layout.py)."""

    name = "triton"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda":
            return f"device {device} is not a CUDA GPU"
        try:
            from vllm_duogpt.kernels import triton_linear
        except Exception as err:  # a Triton build that cannot import on this host
            return f"Triton kernels do not import: {err}"
        return triton_linear.unavailable_reason(device, dtype)

    def prepare(self, layer: torch.nn.Module) -> None:
        from vllm_duogpt.kernels.gpu_layout import pack_gpu_weight

        packed = pack_gpu_weight(layer.weight.data)
        layer.register_buffer("duogpt_values", packed.values, persistent=False)
        layer.register_buffer("duogpt_bitmap", packed.bitmap, persistent=False)
        layer.register_buffer("duogpt_offsets", packed.offsets, persistent=False)
        layer.duogpt_out_features = packed.n
        del layer.weight  # the dense staging copy is not needed any more

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return torch.ops.duogpt.triton_dual_sparse_linear(
            x,
            layer.duogpt_values,
            layer.duogpt_bitmap,
            layer.duogpt_offsets,
            layer.duogpt_out_features,
            layer.duogpt_threshold,
            bias,
        )


class CpuSparseKernel:
    """x86 CPUs: the C++ kernel on the input-channel-major bitmap layout with 16-bit values
    (kernels/cpu_layout.py); built on first use, AVX2 or AVX-512 chosen at run time."""

    name = "cpu-sparse"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cpu":
            return f"device {device} is not the CPU"
        try:
            from vllm_duogpt.kernels.cpu_kernel import cpu_kernel_available
        except ImportError as err:
            return f"CPU kernel module does not import: {err}"
        available, why = cpu_kernel_available()
        return None if available else why

    def prepare(self, layer: torch.nn.Module) -> None:
        from vllm_duogpt.kernels.cpu_layout import pack_cpu_weight

        weight = layer.weight.data
        # 16-bit checkpoint values are kept bit for bit; fp32 ones are rounded once, to fp16
        # (11 significant bits) where they fit its range, else to bf16.
        stored = getattr(layer, "duogpt_checkpoint_dtype", weight.dtype)
        if stored == torch.float32:
            stored = torch.float16 if float(weight.abs().max()) <= _FP16_MAX else torch.bfloat16
        layer.duogpt_cpu_weight = pack_cpu_weight(weight.to(stored))
        del layer.weight  # only the packed layout stays resident

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        from vllm_duogpt.kernels.cpu_kernel import cpu_dual_sparse_linear

        # Computes in fp32 (no AVX-512 BF16 on most CPUs) and returns x's dtype.
        return cpu_dual_sparse_linear(x, layer.duogpt_cpu_weight, layer.duogpt_threshold, bias)


def candidate_kernels() -> list[DualSparseKernel]:
    """All kernels in order of preference; the torch reference is always last."""
    return [TritonKernel(), CpuSparseKernel(), TorchReferenceKernel()]


_logged: set[tuple[str, str]] = set()


def choose_kernel(device: torch.device, dtype: torch.dtype) -> DualSparseKernel:
    """The first candidate that can run on ``device`` with ``dtype``; logs the choice once.

    ``DUOGPT_KERNEL=<name>`` (``triton``, ``cpu-sparse``, ``torch-reference``) forces one kernel,
    for comparisons; it is an error when that kernel cannot run here.

    Raises:
        RuntimeError: when no kernel (or not the forced one) can run.
    """
    forced = os.environ.get("DUOGPT_KERNEL")
    candidates = candidate_kernels()
    if forced:
        names = [k.name for k in candidates]
        if forced not in names:
            raise RuntimeError(f"DUOGPT_KERNEL={forced!r} is not one of {names}")
        candidates = [k for k in candidates if k.name == forced]
    reasons = []
    for kernel in candidates:
        reason = kernel.unavailable_reason(device, dtype)
        if reason is None:
            key = (kernel.name, str(device))
            if key not in _logged:
                _logged.add(key)
                skipped = "; ".join(reasons) or "none skipped"
                logger.info("duogpt: using kernel %s on %s (%s)", kernel.name, device, skipped)
            return kernel
        reasons.append(f"{kernel.name}: {reason}")
    raise RuntimeError("no dual-sparse kernel can run: " + "; ".join(reasons))
