"""The memory ceiling of a decode pass that skips runs at random, as one table.

For each chunk size, fraction of chunks read, thread count and page size (4 KiB, or 2 MiB
transparent huge pages as the CPU layout uses where it can), reads that fraction of the chunks of
a 512 MiB buffer, chosen at random, in address order, split between threads, with the CPU
kernel's software prefetch and no arithmetic (read_ceiling.RangeReader: one chunk after another
with the cursor's prefetch, or with ``--streams N`` N chunks side by side, each prefetched as the
kernel's stream reads do), and prints the useful
GB/s (best of 5 passes) and, where the table has the fraction 1 too, the speed-up over reading
every chunk: what skipping the other chunks gains, against the 1 / fraction that the bytes
alone would give. At activation sparsity X, with runs of R bytes (4096-row panels: 4.6 KB at
50% weight sparsity, 8.2 KB without bitmaps), look at the row (R, 1 - X).

This is a synthetic, sustained read. The ceiling of an actual kernel call (its own runs, read
in bursts between other calls as a model's layers are) is the ``read-only`` row of
``cpu_kernels.py``, timed in the same run as the kernel.

Usage::

    python benchmarks/memory_ceiling.py
    python benchmarks/memory_ceiling.py --chunks 4608,8192 --fractions 1,0.5 --threads 1,2
    python benchmarks/memory_ceiling.py --streams 8
"""

from __future__ import annotations

import argparse
import time

import torch
from read_ceiling import PREFETCH_AHEAD_BYTES, STREAM_AHEAD_BYTES, RangeReader

from vllm_duogpt.kernels.huge_pages import huge_page_empty

BUFFER_BYTES = 512 << 20
PASSES = 5


def chunk_ranges(
    buffer: torch.Tensor, chunk: int, fraction: float, threads: int, gen: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A random ``fraction`` of the buffer's ``chunk``-byte chunks, in address order, cut into
    one contiguous share per thread: ``(starts, ends)`` byte addresses per thread."""
    n_chunks = buffer.numel() // chunk
    chosen = (torch.rand(n_chunks, generator=gen) < fraction).nonzero().flatten()
    starts = buffer.data_ptr() + chosen * chunk
    shares = [len(chosen) * t // threads for t in range(threads + 1)]
    return [
        (starts[a:b], starts[a:b] + chunk) for a, b in zip(shares[:-1], shares[1:], strict=True)
    ]


def useful_gbs(
    reader: RangeReader,
    buffer: torch.Tensor,
    chunk: int,
    fraction: float,
    threads: int,
    streams: int,
) -> float:
    """Useful GB/s of one configuration, best of ``PASSES`` passes; ``streams`` chunks read side
    by side (0: one after another)."""
    torch.set_num_threads(threads)
    ranges = chunk_ranges(buffer, chunk, fraction, threads, torch.Generator().manual_seed(1))
    if streams:
        read = reader.reader(ranges, keep=buffer, ahead=STREAM_AHEAD_BYTES, streams=streams)
    else:
        read = reader.reader(ranges, keep=buffer)
    useful = sum(len(s) for s, _ in ranges) * chunk
    best = float("inf")
    for _ in range(PASSES):
        start = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - start)
    return useful / best / 1e9


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", default="4608,8192,17408,34816", help="bytes, comma list")
    parser.add_argument("--fractions", default="1,0.5", help="fractions of chunks read")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--pages", default="4k,huge", help="page sizes: 4k, huge or both")
    parser.add_argument(
        "--streams", type=int, default=0, help="chunks read side by side (0: one after another)"
    )
    args = parser.parse_args()

    chunks = [int(v) for v in args.chunks.split(",")]
    fractions = [float(v) for v in args.fractions.split(",")]
    threads = [int(v) for v in args.threads.split(",")]
    pages = args.pages.split(",")
    if not set(pages) <= {"4k", "huge"}:
        parser.error(f"--pages takes 4k and/or huge, got {args.pages}")
    if args.streams < 0:
        parser.error(f"--streams takes 0 or more, got {args.streams}")
    if any(not 0 < f <= 1 for f in fractions) or any(c < 64 for c in chunks):
        parser.error("need chunks of at least 64 bytes and fractions in (0, 1]")
    reader = RangeReader()
    buffers = {
        "4k": torch.ones(BUFFER_BYTES, dtype=torch.uint8),
        "huge": huge_page_empty(BUFFER_BYTES, torch.uint8).fill_(1),
    }
    columns = [(t, p) for t in threads for p in pages]
    header = f"{'chunk B':>8} {'fraction':>8} " + " ".join(
        f"{f'{t} thr {p}':>17}" for t, p in columns
    )
    order = (
        f"{args.streams} streams, each prefetched {STREAM_AHEAD_BYTES} B ahead"
        if args.streams
        else f"one stream, prefetched {PREFETCH_AHEAD_BYTES} B ahead"
    )
    print(f"{order}; useful GB/s, best of {PASSES} passes (speed-up over reading every chunk)")
    print(header)
    print("-" * len(header))
    for chunk in chunks:
        # every chunk first: the other fractions' speed-ups are over its time
        rates = {
            fraction: [
                useful_gbs(reader, buffers[p], chunk, fraction, t, args.streams) for t, p in columns
            ]
            for fraction in sorted(fractions, reverse=True)
        }
        for fraction in fractions:
            cells = []
            for column, rate in enumerate(rates[fraction]):
                speedup = f"({rate / (fraction * rates[1.0][column]):.2f}x)" if 1.0 in rates else ""
                cells.append(f"{rate:>9.1f} {speedup:>7}")
            print(f"{chunk:>8} {fraction:>8.2f} " + " ".join(cells))


if __name__ == "__main__":
    main()
