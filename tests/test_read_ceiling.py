"""benchmarks/read_ceiling.py: the runs a decode call reads, and a reader that reads them.

Oracles: the runs come from the layout's offsets and the active channels, walked here in plain
Python in the kernel's order (slice after slice, each slice panel after panel); the reader's
checksum is the sum of the first 8 bytes of every 64-byte line the ranges touch, computed with
torch. The reader's extension builds on first use (about 20 s).
"""

from __future__ import annotations

import pytest
import torch
from read_ceiling import (
    GROUP,
    L2_AHEAD_BYTES,
    MIN_SLICE_CHANNELS,
    PREFETCH_AHEAD_BYTES,
    STAGED_AHEAD_BYTES,
    STREAM_AHEAD_BYTES,
    STREAMS,
    RangeReader,
    decode_ranges,
    decode_read,
    l1_ahead_bytes,
    l2_stage_bytes,
)

from vllm_duogpt.kernels.cpu_layout import pack_cpu_weight


def packed_weight(n: int, k: int, panel_rows: int):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n, k, generator=gen) * (torch.rand(n, k, generator=gen) >= 0.5)
    return pack_cpu_weight(weight, panel_rows=panel_rows, segment_rows=64)


def expected_runs(packed, active: list[int], threads: int) -> list[list[tuple[int, int]]]:
    """Byte ranges per thread, walked from the offsets the way decode() splits the work."""
    n_slice = min(max(len(active) // MIN_SLICE_CHANNELS, 1), threads)
    base, offsets, k = packed.data.data_ptr(), packed.offsets.tolist(), packed.in_features
    seg = packed.n_segments  # a run is its panel's segments, end to end
    out = []
    for s in range(n_slice):
        mine = active[len(active) * s // n_slice : len(active) * (s + 1) // n_slice]
        out.append(
            [
                (base + 2 * offsets[(p * k + c) * seg], base + 2 * offsets[(p * k + c + 1) * seg])
                for p in range(packed.n_panels)
                for c in mine
            ]
        )
    return out


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_decode_ranges_are_the_active_runs_in_kernel_order(threads: int) -> None:
    packed = packed_weight(300, 90, panel_rows=128)  # 3 panels of 2 segments
    assert packed.n_segments == 2
    x = torch.zeros(1, 90)
    active = [0, 3, 4, 17, 40, 41, 42, 60, 61, 62, 63, 64, 65, 66, 70, 71, 72, 80, 81, 82, 88, 89]
    x[0, active] = torch.linspace(1.0, 2.0, len(active))
    x[0, 5] = 0.2  # below the threshold: inactive

    got = decode_ranges(packed, x, tau=0.5, threads=threads)

    want = expected_runs(packed, active, threads)
    assert len(got) == len(want) == min(len(active) // MIN_SLICE_CHANNELS, threads)
    for (starts, ends), runs in zip(got, want, strict=True):
        assert list(zip(starts.tolist(), ends.tolist(), strict=True)) == runs


@pytest.mark.parametrize(
    ("ahead", "l2_ahead", "streams"),
    [(64, 0, 0), (16384, 128, 0), (32768, 1 << 20, 0), (64, 0, 2), (1536, 0, 2), (4096, 0, 8)],
)
def test_reader_reads_every_line_of_every_range(ahead: int, l2_ahead: int, streams: int) -> None:
    """Cursor reads, and stream reads: two streams take the first thread's first two ranges side
    by side and its third alone; eight, more than a thread has, take every range alone."""
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(1)
    buffer = torch.randint(0, 2**40, (4096,), generator=gen, dtype=torch.int64)  # 32 KiB
    base = buffer.data_ptr()
    assert base % 64 == 0
    # byte ranges, not line-aligned; the second thread's first range shares a line with the
    # first thread's last one
    per_thread = [[(8, 200), (1000, 1001), (4096, 9000)], [(8990, 9100), (20000, 32768)]]

    ranges = [
        (torch.tensor([base + a for a, _ in rs]), torch.tensor([base + b for _, b in rs]))
        for rs in per_thread
    ]
    read = RangeReader().reader(
        ranges, keep=buffer, ahead=ahead, l2_ahead=l2_ahead, streams=streams
    )
    checksum = read()

    words = buffer.view(-1, 8)[:, 0]  # the first 8 bytes of each 64-byte line
    want = torch.zeros((), dtype=torch.int64)
    for rs in per_thread:
        for a, b in rs:
            want += words[a // 64 : -(-b // 64)].sum()
    assert checksum == int(want)


def test_prefetch_distances_follow_the_kernel_rule() -> None:
    """Staged into L2, and then into L1 less far ahead: runs without bitmaps when at least a
    sixteenth of the channels is skipped; never runs with bitmaps."""
    dense = pack_cpu_weight(torch.randn(128, 64), panel_rows=128)
    sparse = packed_weight(128, 64, panel_rows=128)
    assert not dense.bitmaps and sparse.bitmaps
    x = torch.ones(1, 64)
    not_staged = (PREFETCH_AHEAD_BYTES, 0)
    assert distances(dense, x) == not_staged  # every channel active
    x[0, :3] = 0.0  # 61 of 64 active: fewer than a sixteenth skipped
    assert distances(dense, x) == not_staged
    x[0, 3] = 0.1  # 60 of 64: a sixteenth skipped
    assert distances(dense, x) == (STAGED_AHEAD_BYTES, L2_AHEAD_BYTES)
    assert distances(sparse, x) == not_staged


def distances(packed, x: torch.Tensor) -> tuple[int, int]:
    return l1_ahead_bytes(packed, x, 0.5), l2_stage_bytes(packed, x, 0.5)


def test_decode_read_follows_the_kernel() -> None:
    """The reader's arguments for each of the kernel's ways to read: the cursor's distances, or
    its streams (kGroup runs with bitmaps, kStreams without) and their distance."""
    dense = pack_cpu_weight(torch.randn(128, 64), panel_rows=128)
    sparse = packed_weight(128, 64, panel_rows=128)
    x = torch.ones(1, 64)
    x[0, :8] = 0.0
    assert decode_read(dense, x, 0.5, "cursor") == {
        "ahead": STAGED_AHEAD_BYTES,
        "l2_ahead": L2_AHEAD_BYTES,
    }
    assert decode_read(sparse, x, 0.5, "cursor") == {"ahead": PREFETCH_AHEAD_BYTES, "l2_ahead": 0}
    assert decode_read(dense, x, 0.5, "streams") == {
        "ahead": STREAM_AHEAD_BYTES,
        "streams": STREAMS,
    }
    assert decode_read(sparse, x, 0.5, "streams") == {"ahead": STREAM_AHEAD_BYTES, "streams": GROUP}
    with pytest.raises(ValueError, match="unknown reads 'random'"):
        decode_read(dense, x, 0.5, "random")
