"""Host side of the CPU dual-sparse kernel: build on first use, register the op, call it.

The C++ source (``csrc/dual_sparse_cpu.cpp``) is compiled with ``torch.utils.cpp_extension.load``
the first time a process needs it, into a cache shared by every process on the machine
(``$DUOGPT_CACHE/torch_extensions`` or ``~/.cache/vllm-duogpt/torch_extensions``). It is compiled
for the generic x86-64 target, with its AVX2 and AVX-512 variants picked at run time, so a cache
shared across machines never hands out instructions a CPU lacks; the cache key holds the torch and
Python versions, and torch's loader rebuilds when the source or flags change. A file lock
serialises the first build when several vLLM workers start at once.

The library registers ``torch.ops.duogpt.cpu_dual_sparse_linear`` in C++ and this module adds its
fake implementation (``torch.library.register_fake``), so ``torch.compile`` traces through the op.
A Python ``torch.library.custom_op`` wrapper would put Python in every call: measured 14 us per
call against 3.4 us for the C++ op, while a decode layer takes a few hundred microseconds.

Without a compiler the build fails: ``cpu_kernel_available()`` says why, and
``cpu_dual_sparse_linear`` falls back to the torch reference with one warning.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from vllm_duogpt.kernels.cpu_layout import CpuSparseWeight, pack_cpu_weight, unpack_cpu_weight
from vllm_duogpt.kernels.reference import dual_sparse_linear_reference

__all__ = [
    "ISA_LEVELS",
    "READS",
    "WIDENINGS",
    "CpuSparseWeight",
    "cap_cpu_kernel_isa",
    "cpu_dense16_linear",
    "cpu_dual_sparse_linear",
    "cpu_kernel_available",
    "pack_cpu_weight",
    "set_cpu_reads",
    "set_cpu_widening",
]

logger = logging.getLogger(__name__)

EXTENSION_NAME = "duogpt_cpu_kernels"
SOURCE = Path(__file__).resolve().parent / "csrc" / "dual_sparse_cpu.cpp"
# Generic target on purpose (see module docstring); OpenMP because ATen's parallel_for is a
# header template that only spawns threads when the including file is compiled with it.
CFLAGS = ["-O3", "-fopenmp", "-Wno-unused-function"]
LDFLAGS = ["-fopenmp"]

# The kernel's code paths, each the next one's fallback (cpu_kernel_config's ISA levels).
ISA_LEVELS = {"scalar": 0, "avx2": 1, "avx512": 2}
# How decode reads the active runs (cpu_kernel_config's Reads): one prefetch cursor in read order,
# or one stream per run read side by side; the default is the one measured faster on the CPU's
# make (streams on Intel, the cursor elsewhere).
READS = {"cursor": 0, "streams": 1}
# How the AVX-512 paths make float32 of 16-bit values (cpu_kernel_config's Widening), named after
# the bf16 step: "unpack" interleaves bf16 with zeros and converts fp16 before expanding it as
# floats; "shift" shifts and masks bf16 and expands fp16 as 16-bit words before converting. The
# default is the one measured faster on the CPU's make ("shift" on Intel, "unpack" elsewhere).
# Both give the same floats.
WIDENINGS = {"unpack": 0, "shift": 1}

_lock = threading.Lock()
_status: tuple[bool, str] | None = None
_warned = False


def cache_dir() -> Path:
    """Build directory of the extension for this torch, Python and machine architecture."""
    root = os.environ.get("DUOGPT_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "vllm-duogpt"
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{tag}-{platform.machine()}")
    return base / "torch_extensions" / tag / EXTENSION_NAME


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock across processes; released by the OS if the holder dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own build baton is the only guard
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_and_load() -> None:
    from torch.utils import cpp_extension

    build_dir = cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(build_dir / "build.lock"):
        cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )

    @torch.library.register_fake("duogpt::cpu_dual_sparse_linear")
    def _(
        x: torch.Tensor,
        data: torch.Tensor,
        offsets: torch.Tensor,
        out_features: int,
        panel_rows: int,
        value_kind: int,
        bitmaps: bool,
        threshold: float,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("duogpt::cpu_dense16_linear")
    def _(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[0])


def cpu_kernel_available() -> tuple[bool, str]:
    """Build (or load from the cache) the CPU kernel once per process and say whether it runs.

    Call it at weight-loading time: the first call may compile for a minute, and calling it
    before ``torch.compile`` keeps the build out of tracing.

    Returns:
        ``(True, description of the ISA in use)`` or ``(False, why the build or load failed)``.
    """
    global _status
    if _status is not None:
        return _status
    with _lock:
        if _status is None:
            try:
                _build_and_load()
                _status = (True, torch.ops.duogpt.cpu_kernel_config(-1, -1, -1, -1))
            except Exception as exc:  # no compiler, no headers, read-only cache, ...
                _status = (False, f"CPU kernel build failed: {type(exc).__name__}: {exc}")
    return _status


def cap_cpu_kernel_isa(isa: str) -> str:
    """Make the CPU kernels run their ``isa`` code path from now on, in this process: to time or
    test the paths below the best one this CPU has (which is the default, and which naming it
    again restores).

    Args:
        isa: a name in ``ISA_LEVELS``.

    Returns:
        The kernel's configuration line, as ``cpu_kernel_available`` gives it.

    Raises:
        ValueError: on an unknown name, or a path this CPU cannot run.
        RuntimeError: when the kernel is not available.
    """
    if isa not in ISA_LEVELS:
        raise ValueError(f"unknown ISA {isa!r}; expected one of {', '.join(ISA_LEVELS)}")
    ok, reason = cpu_kernel_available()
    if not ok:
        raise RuntimeError(reason)
    config = torch.ops.duogpt.cpu_kernel_config(ISA_LEVELS[isa], -1, -1, -1)
    if not config.startswith(f"isa={isa} "):
        raise ValueError(f"this CPU cannot run the {isa} path: {config}")
    return config


def set_cpu_reads(reads: str | None) -> str:
    """Make the CPU kernel's decode read its runs one way from now on, in this process: to time
    or test the way this CPU does not default to.

    Args:
        reads: a name in ``READS``, or None for this CPU's default.

    Returns:
        The kernel's configuration line, as ``cpu_kernel_available`` gives it.

    Raises:
        ValueError: on an unknown name.
        RuntimeError: when the kernel is not available.
    """
    return _set_choice("reads", reads, READS)


def set_cpu_widening(widening: str | None) -> str:
    """Make the CPU kernel's AVX-512 paths widen 16-bit values one way from now on, in this
    process: to time or test the way this CPU does not default to.

    Args:
        widening: a name in ``WIDENINGS``, or None for this CPU's default.

    Returns:
        The kernel's configuration line, as ``cpu_kernel_available`` gives it.

    Raises:
        ValueError: on an unknown name.
        RuntimeError: when the kernel is not available.
    """
    return _set_choice("widening", widening, WIDENINGS)


def _set_choice(setting: str, name: str | None, choices: dict[str, int]) -> str:
    """Set one of ``cpu_kernel_config``'s choices (``reads`` or ``widening``) by name, or back to
    this CPU's default with None; returns the configuration line."""
    if name is not None and name not in choices:
        raise ValueError(f"unknown {setting} {name!r}; expected one of {', '.join(choices)}")
    ok, reason = cpu_kernel_available()
    if not ok:
        raise RuntimeError(reason)
    code = -2 if name is None else choices[name]
    args = {"reads": -1, "widening": -1, setting: code}
    return torch.ops.duogpt.cpu_kernel_config(-1, -1, args["reads"], args["widening"])


# x: [..., K] float; packed: [N, K] in the CPU layout; bias: [N] or None
# out: [..., N] in x's dtype
def cpu_dual_sparse_linear(
    x: torch.Tensor,
    packed: CpuSparseWeight,
    threshold: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dual-sparse product ``sparsify(x, threshold) @ W.T + bias`` on the CPU layout.

    Computes in float32 (activations are converted when they are not) with the layout's 16-bit
    weights widened in registers. Up to a token count measured per ISA (127 with AVX-512, 31 with
    AVX2) only the runs of active channels are read; more tokens decompress 256-row slices of
    the layer, one at a time, into a GEMM (oneDNN's where PyTorch has it).

    Args:
        x: ``[..., K]`` activations on the CPU.
        packed: the weight from ``pack_cpu_weight``.
        threshold: the layer's activation threshold (``|x| < threshold`` is dropped).
        bias: optional ``[N]`` bias.

    Returns:
        ``[..., N]`` output in ``x``'s dtype.

    Raises:
        ValueError: when ``x``'s last dimension is not the weight's ``K``.
    """
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"x {tuple(x.shape)} does not match weight K={packed.in_features}")

    def product(x2: torch.Tensor, bias32: torch.Tensor | None) -> torch.Tensor:
        if _kernel_runs():
            return torch.ops.duogpt.cpu_dual_sparse_linear(
                x2,
                packed.data,
                packed.offsets,
                packed.out_features,
                packed.panel_rows,
                packed.value_kind,
                packed.bitmaps,
                float(threshold),
                bias32,
            )
        # decompresses the whole layer on every call: a fallback, not a path to serve from
        weight = unpack_cpu_weight(packed).to(torch.float32)
        return dual_sparse_linear_reference(x2, weight, threshold, bias32)

    return _in_fp32(x, bias, packed.out_features, product)


# x: [..., K] float; weight: [N, K] bf16 or fp16; bias: [N] or None
# out: [..., N] in x's dtype
def cpu_dense16_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense ``x @ weight.T + bias`` with 16-bit weights widened in registers, fp32 accumulation.

    Each weight is read once whatever the token count (AVX-512; once per token with AVX2).

    Raises:
        ValueError: when ``x``'s last dimension is not the weight's ``K``.
    """
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} does not match weight K={weight.shape[1]}")

    def product(x2: torch.Tensor, bias32: torch.Tensor | None) -> torch.Tensor:
        if _kernel_runs():
            return torch.ops.duogpt.cpu_dense16_linear(x2, weight, bias32)
        return torch.nn.functional.linear(x2, weight.to(torch.float32), bias32)

    return _in_fp32(x, bias, weight.shape[0], product)


def _in_fp32(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    product: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
) -> torch.Tensor:
    """``product`` on ``x`` as contiguous fp32 rows (and an fp32 bias); the result in x's shape
    and dtype. Decode calls take a few hundred microseconds: no conversion when none is needed."""
    plain = x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous()
    x2 = x if plain else x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    y = product(x2, bias)
    return y if plain else y.reshape(*x.shape[:-1], out_features).to(x.dtype)


def _kernel_runs() -> bool:
    """Whether the built kernel runs here; warns once (with the reason) when it does not."""
    available = _status[0] if _status is not None else cpu_kernel_available()[0]
    if not available:
        _warn_fallback()
    return available


def _warn_fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning(
            "duogpt: %s; using the torch reference (decompresses every call)",
            cpu_kernel_available()[1],
        )
