"""Memory ceilings: how long it takes just to fetch the bytes a decode call reads.

A batch-1 decode call of the CPU dual-sparse kernel reads the runs of the active channels and
skips the others (kernels/cpu_layout.py). ``decode_ranges`` lists those runs, split between
threads as the kernel splits them (``decode()`` in kernels/csrc/dual_sparse_cpu.cpp: the active
channels cut into one slice per thread, each thread reading its slice panel after panel), and
``RangeReader`` reads them the way the kernel does (one run after another or, with stream
reads, several side by side), with its software prefetch and no arithmetic (read_ranges.cpp).
That is what fetching the call's bytes costs on the same machine at the same moment:
``cpu_kernels.py`` times it next to the kernel, as a yardstick rather than a strict bound (the
reader reads a line at a time where the kernel reads blocks, and has come out behind the kernel
by up to 15%), and ``memory_ceiling.py`` reads synthetic patterns with it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from vllm_duogpt.kernels.cpu_kernel import cache_dir
from vllm_duogpt.kernels.cpu_layout import CpuSparseWeight

SOURCE = Path(__file__).with_name("read_ranges.cpp")
PREFETCH_AHEAD_BYTES = 32 * 1024  # kPrefetchAheadBytes of the kernel
STAGED_AHEAD_BYTES = 16 * 1024  # kStagedAheadBytes of the kernel
L2_AHEAD_BYTES = 64 * 1024  # kL2AheadBytes of the kernel
MIN_SLICE_CHANNELS = 16  # kMinSliceChannels of the kernel
STREAM_AHEAD_BYTES = 1536  # kStreamAheadBytes of the kernel
GROUP = 4  # kGroup of the kernel: runs with bitmaps read side by side
STREAMS = 8  # kStreams of the kernel: runs without bitmaps read side by side with stream reads


class RangeReader:
    """Reads byte ranges, one list per thread (builds read_ranges.cpp on first use)."""

    def __init__(self) -> None:
        from torch.utils import cpp_extension

        build_dir = cache_dir().parent / "duogpt_read_ranges"
        build_dir.mkdir(parents=True, exist_ok=True)
        self._module = cpp_extension.load(
            name="duogpt_read_ranges",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )

    def reader(
        self,
        ranges: list[tuple[torch.Tensor, torch.Tensor]],
        keep: torch.Tensor,
        ahead: int = PREFETCH_AHEAD_BYTES,
        l2_ahead: int = 0,
        streams: int = 0,
    ) -> Callable[[], int]:
        """A call that reads every thread's ranges at once and returns a checksum.

        Args:
            ranges: per thread, ``(starts, ends)``: int64 byte addresses of its ranges, in the
                order it reads them; at most ``torch.get_num_threads()`` threads when called.
            keep: the tensor that holds those bytes: the call keeps it alive.
            ahead: bytes the prefetch runs ahead into L1 (``l1_ahead_bytes``).
            l2_ahead: bytes a second prefetch runs ahead into L2 (``l2_stage_bytes``), 0 for none.
            streams: 0 to read the ranges one after another, else how many to read side by side,
                each prefetched ``ahead`` bytes ahead of its own reads (``l2_ahead`` unused).
        """
        starts = torch.cat([s for s, _ in ranges])
        ends = torch.cat([e for _, e in ranges])
        counts = torch.tensor([len(s) for s, _ in ranges])
        thread_first = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        module = self._module
        return lambda: (
            keep.data_ptr()
            and module.read_ranges(starts, ends, thread_first, ahead, l2_ahead, streams)
        )


def decode_read(packed: CpuSparseWeight, x: torch.Tensor, tau: float, reads: str) -> dict[str, int]:
    """``RangeReader.reader``'s keyword arguments that read a batch-1 call's runs as the kernel
    does with ``reads`` (``cpu_kernel.READS``): with the cursor, one run after another with its
    prefetch distances; with streams, ``GROUP`` runs with bitmaps or ``STREAMS`` without side by
    side, ``STREAM_AHEAD_BYTES`` ahead."""
    if reads == "streams":
        return {"ahead": STREAM_AHEAD_BYTES, "streams": GROUP if packed.bitmaps else STREAMS}
    if reads != "cursor":
        raise ValueError(f"unknown reads {reads!r}")
    return {"ahead": l1_ahead_bytes(packed, x, tau), "l2_ahead": l2_stage_bytes(packed, x, tau)}


def l1_ahead_bytes(packed: CpuSparseWeight, x: torch.Tensor, tau: float) -> int:
    """How far ahead the kernel prefetches a batch-1 call's runs into L1 (``RunPrefetcher``):
    less far where it stages them into L2 too."""
    return STAGED_AHEAD_BYTES if staged(packed, x, tau) else PREFETCH_AHEAD_BYTES


def l2_stage_bytes(packed: CpuSparseWeight, x: torch.Tensor, tau: float) -> int:
    """How far ahead the kernel also stages a batch-1 call's runs into L2 (``RunPrefetcher``),
    0 where it does not."""
    return L2_AHEAD_BYTES if staged(packed, x, tau) else 0


def staged(packed: CpuSparseWeight, x: torch.Tensor, tau: float) -> bool:
    """Whether the kernel stages a batch-1 call's runs into L2: runs without bitmaps when a
    sixteenth of the channels or more are skipped."""
    n_active = int(active_channels(x, tau).sum())
    return not packed.bitmaps and 16 * n_active <= 15 * packed.in_features


def active_channels(x: torch.Tensor, tau: float) -> torch.Tensor:
    """``[K]`` bool: the channels a decode call of ``x`` (``[M, K]``) reads, those where any
    token's activation is nonzero and not below ``tau``."""
    return ((x.abs() >= tau) & (x != 0)).any(0)


def decode_ranges(
    packed: CpuSparseWeight, x: torch.Tensor, tau: float, threads: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The runs a batch-1 decode call on ``packed`` reads, per thread, in the kernel's order.

    Args:
        packed: the weight.
        x: ``[1, K]`` activations.
        tau: the threshold (``|x| < tau`` is inactive).
        threads: the kernel's thread count.

    Returns:
        Per thread slice, ``(starts, ends)`` byte addresses of its runs.
    """
    active = active_channels(x, tau).nonzero().flatten()
    n_slice = min(max(len(active) // MIN_SLICE_CHANNELS, 1), threads)
    panel_first = torch.arange(packed.n_panels)[:, None] * packed.in_features
    base, width = packed.data.data_ptr(), packed.data.element_size()
    starts = packed.run_starts
    ranges = []
    for s in range(n_slice):
        channels = active[len(active) * s // n_slice : len(active) * (s + 1) // n_slice]
        run = (panel_first + channels[None, :]).flatten()
        ranges.append((base + starts[run] * width, base + starts[run + 1] * width))
    return ranges
