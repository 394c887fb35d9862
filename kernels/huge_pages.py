"""Weight buffers on transparent huge pages, for the CPU kernels' reads.

A decode pass of the dual-sparse kernel reads the active channels' runs and skips the others, so
it walks a weight of tens of megabytes with jumps: with 4 KiB pages nearly every run starts on a
page the TLB does not hold, and the page walk delays the run's first lines. On 2 MiB pages the
whole weight needs a few dozen TLB entries. Measured on this project's 2-core AMD EPYC
machine, reading half of the 2.3 KB runs at random (``benchmarks/memory_ceiling.py``): one
thread 19 -> 24 GB/s, the kernel at W50/X50 on LLaMA-7B shapes 15.6-18.5 -> 20.3-22.1 GB/s;
a plain stream gains less (34 -> 38 GB/s), as its page walks overlap with the prefetched lines.

Linux backs an anonymous mapping with huge pages where the process asks (``madvise``) and
the system allows it (``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or
``madvise``); elsewhere the buffer is ordinary memory and everything works the same, a little
slower. ``DUOGPT_HUGE_PAGES=0`` turns the advice off.

Small buffers (most layers of a small model are under 2 MiB) are cut one after the other from
shared 32 MiB chunks, so they sit on huge pages too; a chunk is unmapped when the last tensor in
it goes, and the unused end of a chunk, never touched, holds at most one partial huge page.
Buffers over half a chunk get a mapping of their own, where only the whole 2 MiB pages are
advised: such a buffer holds no memory beyond its own bytes rounded up to 4 KiB.
"""

from __future__ import annotations

import mmap
import os
import threading

import torch

HUGE_PAGE_BYTES = 2 << 20
CHUNK_BYTES = 16 * HUGE_PAGE_BYTES
ALIGN_BYTES = 64  # each buffer starts on a cache line
ENV_SWITCH = "DUOGPT_HUGE_PAGES"


def huge_pages_enabled() -> bool:
    """Whether buffers are advised onto huge pages: on Linux unless ``DUOGPT_HUGE_PAGES=0``."""
    return hasattr(mmap, "MADV_HUGEPAGE") and os.environ.get(ENV_SWITCH, "1") != "0"


def _advised_mapping(nbytes: int) -> tuple[mmap.mmap, int]:
    """A private anonymous mapping and the offset in it of ``nbytes`` starting on a 2 MiB
    boundary, whose whole huge pages are advised and whose partial last one is not."""
    # One spare huge page of address space, to start on a boundary; untouched, it costs nothing.
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()
    start = -base % HUGE_PAGE_BYTES
    advised = nbytes // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE, start, advised)
        # the partial last huge page stays on 4 KiB pages, even where the system default is huge
        mapping.madvise(mmap.MADV_NOHUGEPAGE, start + advised)
    except OSError:  # a kernel built without transparent huge pages: ordinary memory then
        pass
    return mapping, start


class _Chunks:
    """Cuts small buffers one after the other out of the current chunk, a new one when full."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mapping: mmap.mmap | None = None
        self._next = self._end = 0

    def take(self, nbytes: int) -> tuple[mmap.mmap, int]:
        with self._lock:
            if self._mapping is None or self._next + nbytes > self._end:
                self._mapping, self._next = _advised_mapping(CHUNK_BYTES)
                self._end = self._next + CHUNK_BYTES
            offset = self._next
            self._next += -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES
            return self._mapping, offset


_chunks = _Chunks()


def huge_page_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised 1-D tensor on huge pages (see the module docstring).

    Its storage holds exactly its own bytes, and keeps its mapping alive. With huge pages off, or
    for an empty tensor, it comes from ``torch.empty``.

    Args:
        numel: elements.
        dtype: element type.

    Returns:
        ``[numel]`` tensor of ``dtype`` on the CPU.
    """
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0 or not huge_pages_enabled():
        return torch.empty(numel, dtype=dtype)
    if nbytes > CHUNK_BYTES // 2:
        mapping, offset = _advised_mapping(nbytes)
    else:
        mapping, offset = _chunks.take(nbytes)
    return torch.frombuffer(mapping, dtype=dtype, count=numel, offset=offset)


def to_huge_pages(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous copy of ``tensor`` in a ``huge_page_empty`` buffer, same shape, in ``dtype``
    (default its own): converted while copied, without a temporary of the converted tensor."""
    out = huge_page_empty(tensor.numel(), dtype or tensor.dtype).view(tensor.shape)
    return out.copy_(tensor)
