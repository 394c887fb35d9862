"""What the Triton kernels share: the import guard, autotune helpers, the split-K epilogue.

Importing this module never needs a GPU or a working Triton: without Triton, ``triton`` and
``tl`` are placeholders whose decorators return the function unchanged, so the kernel modules
still import (their host wrappers then raise). Kernel bodies run on CPU tensors when
``TRITON_INTERPRET=1`` is set before the kernel modules are imported: Triton reads it when
``@triton.jit`` decorates a function (``triton.knobs.runtime.interpret``).

Split-K without a second launch: a matrix-vector product of a 4096 x 4096 layer has too few
output tiles to fill 132 SMs, so the kernels also split the input channels over ``SPLIT_K``
programs. Each program writes its fp32 partial tile to a scratch buffer, then takes a ticket
from a per-tile counter; the last one sums the partials in a fixed order (deterministic), adds
the bias, casts and stores, and resets the counter to zero for the next launch (the CUTLASS
"serial split-K" fix-up). Counters live in one zeroed buffer per device and stream, allocated
at the first call; nothing is allocated from data, so launches are CUDA-graph safe.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # missing, or a build that fails to import on this host
    HAS_TRITON = False

    def _passthrough(*args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda fn: fn

    triton = types.SimpleNamespace(  # type: ignore[assignment]
        jit=_passthrough,
        autotune=_passthrough,
        heuristics=_passthrough,
        Config=lambda *args, **kwargs: (args, kwargs),
        cdiv=lambda a, b: -(-a // b),
    )
    tl = types.SimpleNamespace(constexpr=int)  # type: ignore[assignment]

# Counters per (device, stream); 65536 tiles covers N = 8M (decode) or 512 x 128 tile grids.
SEMAPHORE_SLOTS = 1 << 16
_semaphores: dict[tuple[str, int], torch.Tensor] = {}


def interpreting() -> bool:
    """True when Triton runs kernel bodies in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return HAS_TRITON and bool(triton.knobs.runtime.interpret)


def kernel_interpreted(kernel: Any) -> bool:
    """Whether a (possibly autotuned) kernel was decorated in interpreter mode.

    Triton decides when ``@triton.jit`` runs, at import, so a kernel module imported before
    ``TRITON_INTERPRET=1`` was set stays compiled for the GPU.
    """
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    while hasattr(kernel, "fn") and not isinstance(kernel, InterpretedFunction):
        kernel = kernel.fn
    return isinstance(kernel, InterpretedFunction)


def unavailable_reason(device: torch.device, interpreted: bool) -> str | None:
    """Why a Triton kernel cannot run on ``device``, or None when it can.

    Args:
        device: where the tensors live.
        interpreted: ``kernel_interpreted`` of the kernel to launch.
    """
    if not HAS_TRITON:
        return "triton is not importable on this host"
    if interpreted:
        return None if device.type == "cpu" else f"kernels run in the interpreter, not on {device}"
    if device.type != "cuda":
        return f"Triton kernels need a CUDA device or TRITON_INTERPRET=1, got {device}"
    return None


# The activation dtypes the Triton kernels take.
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_unavailable_reason(
    device: torch.device, dtype: torch.dtype, interpreted: bool
) -> str | None:
    """Why a Triton kernel cannot run on ``device`` with activations of ``dtype``, or None.

    Args:
        device: where the tensors live.
        dtype: the activations' dtype (float16, bfloat16 or float32).
        interpreted: ``kernel_interpreted`` of the kernel to launch.
    """
    if dtype not in ACTIVATION_DTYPES:
        return f"dtype {dtype} is not one of float16, bfloat16, float32"
    return unavailable_reason(device, interpreted)


def check_sparse_layout_args(
    x: torch.Tensor,
    values: torch.Tensor,
    bitmap: torch.Tensor,
    offsets: torch.Tensor,
    n: int,
    bias: torch.Tensor | None,
) -> tuple[int, int, int, int]:
    """Assert that a dual-sparse product's activations, ``GpuSparseWeight`` tensors, output size
    and bias fit together; return ``(M, K, tiles, words)``: tokens, input features, the
    layout's row tiles and bitmap words a tile."""
    m, k = x.shape
    num_tiles, k_w, words = bitmap.shape
    assert k_w == k and offsets.shape == (num_tiles, k), f"layout {tuple(bitmap.shape)} vs K={k}"
    assert num_tiles * words * 32 >= n > (num_tiles - 1) * words * 32, f"N={n} vs {num_tiles} tiles"
    assert words & (words - 1) == 0, f"tile_n / 32 = {words} must be a power of two"
    assert values.dtype == x.dtype, f"values {values.dtype} vs x {x.dtype}"
    assert x.dtype in ACTIVATION_DTYPES, f"dtype {x.dtype}"
    assert bitmap.dtype == offsets.dtype == torch.int32, "bitmap and offsets must be int32"
    assert values.is_contiguous() and bitmap.is_contiguous() and offsets.is_contiguous()
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous()), "bias must be [N]"
    return m, k, num_tiles, words


def require_triton(device: torch.device, interpreted: bool) -> None:
    """Raise with the reason when a Triton kernel cannot run on ``device``."""
    reason = unavailable_reason(device, interpreted)
    if reason is not None:
        raise RuntimeError(reason)


def next_pow2(value: int) -> int:
    """Smallest power of two >= ``value`` (1 for 0)."""
    return 1 << max(value - 1, 0).bit_length()


def shape_bucket(value: int) -> int:
    """Autotune key for a size: the next power of two, so nearby shapes share a tuning."""
    return next_pow2(value)


def density_bin(density: float) -> int:
    """Autotune key for a weight density: tenths (0..10)."""
    return round(min(max(density, 0.0), 1.0) * 10)


@functools.lru_cache(maxsize=4096)
def threshold_in_dtype(threshold: float, dtype: torch.dtype) -> float:
    """The threshold rounded to the activations' dtype.

    The torch reference compares ``|x| < tau`` in ``x``'s dtype, which rounds a Python-float
    ``tau`` to that dtype first; the kernels compare in fp32, so they get the rounded value to
    keep exactly the same channels.
    """
    return float(torch.tensor(threshold, dtype=torch.float64).to(dtype).item())


def use_ptx_popc(device: torch.device, interpreted: bool) -> bool:
    """Whether the kernel may use the PTX ``popc`` instruction (NVIDIA, compiled)."""
    return device.type == "cuda" and torch.version.hip is None and not interpreted


def tuning_bench(kernel_call: Any, quantiles: Any) -> Any:
    """Autotuner timing: Triton's ``do_bench`` (L2 flushed per call) with short runs.

    The defaults (25 ms warm-up, 100 ms of runs per config) make tuning a model's few dozen
    shape buckets take minutes; a decode kernel runs in microseconds, so 25 ms is plenty.
    """
    from triton.testing import do_bench

    return do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def split_semaphores(device: torch.device) -> torch.Tensor:
    """The zeroed int32 split-K counters of ``device`` and its current stream.

    Kernels leave every counter at zero when they finish, so the buffer is allocated once.
    Concurrent launches on one stream are ordered; each stream gets its own buffer.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _semaphores.get(key)
    if buf is None:
        buf = torch.zeros(SEMAPHORE_SLOTS, dtype=torch.int32, device=device)
        _semaphores[key] = buf
    return buf


@triton.jit
def popcount32(x, USE_PTX: tl.constexpr):
    """Set bits of each int32 lane: one PTX ``popc`` on NVIDIA, a SWAR sum elsewhere."""
    if USE_PTX:
        count = tl.inline_asm_elementwise(
            "popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        # Logical shifts need unsigned lanes; the interpreter and AMD take this path.
        u = x.to(tl.uint32, bitcast=True)
        u = u - ((u >> 1) & 0x55555555)
        u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
        u = (u + (u >> 4)) & 0x0F0F0F0F
        count = ((u * 0x01010101) >> 24).to(tl.int32, bitcast=True)
    return count


@triton.jit
def _store_output(
    acc,
    offs_m,
    offs_n,
    N,
    mask,
    out_ptr,
    stride_om,
    stride_on,
    bias_ptr,
    HAS_BIAS: tl.constexpr,
):
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# acc: [BLOCK_M, BLOCK_N] fp32 partial sum of one program; partial: [SPLIT_K, M, N] fp32 scratch
@triton.jit
def store_split_k(
    acc,
    offs_m,
    offs_n,
    M,
    N,
    out_ptr,
    stride_om,
    stride_on,
    bias_ptr,
    partial_ptr,
    sem_ptr,
    tile_id,
    pid_k,
    SPLIT_K,
    HAS_BIAS: tl.constexpr,
):
    """Write ``acc`` to ``out`` directly, or through the serial split-K fix-up."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        _store_output(
            acc, offs_m, offs_n, N, mask, out_ptr, stride_om, stride_on, bias_ptr, HAS_BIAS
        )
    else:
        part_ptrs = partial_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptrs + pid_k * M * N, acc, mask=mask)
        # Every thread's partial must be written before one thread publishes the ticket.
        tl.debug_barrier()
        ticket = tl.atomic_add(sem_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            for s in range(0, SPLIT_K):
                # .cg reads L2: other SMs wrote these partials, this SM's L1 may be stale.
                total += tl.load(part_ptrs + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            _store_output(
                total, offs_m, offs_n, N, mask, out_ptr, stride_om, stride_on, bias_ptr, HAS_BIAS
            )
            tl.atomic_xchg(sem_ptr + tile_id, 0, sem="relaxed", scope="gpu")
