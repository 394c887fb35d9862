"""The CPU kernel's weight layout: bitmap blocks, input-channel-major inside row panels.

Batch-1 decode on a CPU is memory-bandwidth bound, so the layout is designed around the bytes a
product reads (method.md section 8). Output rows are cut into panels of ``panel_rows`` rows
(default 4096), panels into segments of ``segment_rows`` (default 2048) and segments into blocks
of 64 rows. Inside a panel every input channel ``k`` owns one contiguous run, and the runs of
channels ``0 .. K-1`` follow each other::

    panel p: [run of channel 0][run of channel 1] ... [run of channel K-1]
    run:     [segment 0][segment 1] ...  (the panel's rows, segment_rows at a time)
    segment: [block 0][block 1] ...      (64 rows at a time)
    block:   [bitmap: 4 words = 64 bits, bit r set <=> row r of the block kept][kept values]

Rows past ``N`` are never kept. With ``S = panel_rows // segment_rows`` segments a panel,
``offsets[(p * K + k) * S + s]`` is the first word of segment ``s`` of panel ``p``'s run for
channel ``k`` in ``data`` (a segment past the last row is empty; ``offsets[n_panel * K * S]`` is
the end), so ``offsets[(p * K + k) * S]`` starts the run and ``offsets[(p * K + k + 1) * S]``
ends it. A zero activation skips its run: contiguous bytes, and a decode pass over a panel reads
the active runs in address order. A one-token pass reads whole runs; a pass of several tokens
reads one segment of each, so that its accumulators (a segment's rows per token) stay in cache
(measured by hand on a build without segments: at 64-100 tokens, 4096-row accumulators made
products up to 1.6x slower).

A weight that keeps at least 15/16 of its entries (activation-only sparsity: nothing pruned) is
stored without bitmaps (``bitmaps=False``): every block is then the values of its 64 rows, the
few zeros and the rows past ``N`` stored as zeros. The bitmap would cost 8 bytes per 128 of
values, more than the zeros it saves; the kernel multiplies by the same rounded weight.

Why big panels: skipping saves bytes only if the skipped bytes are contiguous and long. Memory is
fetched in 64-byte lines and the hardware prefetcher runs ahead over skipped lines; measured on
one core reading half of the runs at random, runs of 0.3 KB deliver 8 GB/s of useful bytes,
runs of 2.3 KB (2048 rows at 50% weight sparsity) 18 GB/s, against 29 GB/s for a plain stream.
Panels of 4096 rows (runs of 4.6 KB) against 2048 rows, timed alternately in one run
(``benchmarks/cpu_kernels.py --panel-rows 2048,4096``, results/cpu_kernels_panels.txt): on the
LLaMA-7B shapes W0/X50 3-10% and W70/X50 4-10% less time, W50/X50 within noise (6% more to 8%
less), on one and two threads.

Bytes per weight stored: values ``2 * (1 - s_w)``, bitmap ``1/8``, offsets ``8 / segment_rows``:
``1 + 0.125 + 0.004 = 1.13`` at 50% weight sparsity (dense 16-bit: 2). A decode step with half
of the channels active reads half of the runs, about ``0.56`` bytes per weight. Without bitmaps:
``2.004`` bytes per weight, ``1.0`` read at half of the channels.

Value precision: a bf16 or fp16 checkpoint keeps its own 16-bit values, bit for bit. Anything
else (float32) is rounded once, at pack time, to bf16 (round to nearest even: 8 significant bits,
relative error at most 2^-9, float32's range), the precision vLLM serves such a model in on CPUs.
bf16 rather than fp16 because widening bf16 to fp32 is a byte shuffle the expand already does,
while fp16 needs a conversion instruction: the fp16 decode measured about 35% slower. The
kernel's oracle is the reference product with the rounded weights, ``unpack_cpu_weight(packed)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_duogpt.kernels.huge_pages import huge_page_empty

BLOCK_ROWS = 64
DENSE_RUNS_MIN_KEPT = 15 / 16  # kept fraction from which runs are stored without bitmaps
DEFAULT_PANEL_ROWS = 4096
DEFAULT_SEGMENT_ROWS = 2048
VALUE_KINDS = {torch.bfloat16: 0, torch.float16: 1}
TAIL_PADDING = 32  # the kernels load up to 16 values past a block's last kept one
_CHANNEL_CHUNK = 1024  # channels packed at once: bounds the temporaries
_BITMAP_WORDS = BLOCK_ROWS // 16
_BIT_WEIGHTS = 2 ** torch.arange(16, dtype=torch.int32)


@dataclass(frozen=True, eq=False)
class CpuSparseWeight:
    """A weight in the CPU kernel's layout; plain dense tensors only.

    Attributes:
        data: ``[L]`` int16: the panels' runs (bitmap words, then value bits), then
            ``TAIL_PADDING`` zero words; on huge pages where the system has them
            (kernels/huge_pages.py).
        offsets: ``[n_panels * K * n_segments + 1]`` int64: first word of each (panel,
            channel, segment).
        out_features: ``N``.
        in_features: ``K``.
        panel_rows: rows per panel, a multiple of ``segment_rows``.
        segment_rows: rows per segment, a multiple of 64.
        value_dtype: ``torch.bfloat16`` or ``torch.float16``, what the value bits are.
        bitmaps: blocks carry bitmaps and kept values; else every row's value (see above).
    """

    data: torch.Tensor
    offsets: torch.Tensor
    out_features: int
    in_features: int
    panel_rows: int
    segment_rows: int
    value_dtype: torch.dtype
    bitmaps: bool

    @property
    def n_panels(self) -> int:
        """Row panels."""
        return -(-self.out_features // self.panel_rows)

    @property
    def n_segments(self) -> int:
        """Segments per panel."""
        return self.panel_rows // self.segment_rows

    @property
    def value_kind(self) -> int:
        """The kernel's code for ``value_dtype`` (0: bf16, 1: fp16)."""
        return VALUE_KINDS[self.value_dtype]

    @property
    def nbytes(self) -> int:
        """Bytes held by the layout's tensors."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.offsets))

    @property
    def bytes_per_weight(self) -> float:
        """Stored bytes per dense weight position."""
        return self.nbytes / max(1, self.out_features * self.in_features)

    @property
    def run_starts(self) -> torch.Tensor:
        """``[n_panels * K + 1]`` first word of each (panel, channel) run, its first segment's;
        run ``p * K + k`` ends where the next starts (the last entry is the end)."""
        return self.offsets[:: self.n_segments]

    def run_lengths(self) -> torch.Tensor:
        """``[n_panels, K]`` words of each (panel, channel) run: what a decode step reads."""
        starts = self.run_starts
        return (starts[1:] - starts[:-1]).view(self.n_panels, self.in_features)


def choose_value_dtype(weight: torch.Tensor) -> torch.dtype:
    """The 16-bit type that holds ``weight``'s values: its own when bf16/fp16, else bf16.

    Args:
        weight: the masked dense weight.

    Returns:
        ``weight.dtype`` when it is bf16 or fp16, otherwise ``torch.bfloat16``.
    """
    return weight.dtype if weight.dtype in VALUE_KINDS else torch.bfloat16


def pack_cpu_weight(
    weight: torch.Tensor,
    panel_rows: int = DEFAULT_PANEL_ROWS,
    value_dtype: torch.dtype | None = None,
    segment_rows: int | None = None,
) -> CpuSparseWeight:
    """Build the CPU layout from a masked dense weight (zeros are the pruned entries).

    Works a panel and a chunk of channels at a time, so the temporaries stay small.

    Args:
        weight: ``[N, K]`` float weight, pruned entries zero.
        panel_rows: rows per panel, a positive multiple of 64.
        value_dtype: bf16 or fp16 to force the value type; default ``choose_value_dtype``.
        segment_rows: rows per segment, a positive multiple of 64 that divides ``panel_rows``;
            default ``DEFAULT_SEGMENT_ROWS``, or ``panel_rows`` when that is smaller.

    Returns:
        The packed weight.

    Raises:
        ValueError: on a non-2-D or non-float weight, or a bad panel or segment size or value
            type.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D float weight, got {tuple(weight.shape)} {weight.dtype}")
    if panel_rows <= 0 or panel_rows % BLOCK_ROWS:
        raise ValueError(f"panel_rows={panel_rows} must be a positive multiple of 64")
    if segment_rows is None:
        segment_rows = min(DEFAULT_SEGMENT_ROWS, panel_rows)
    if segment_rows <= 0 or segment_rows % BLOCK_ROWS or panel_rows % segment_rows:
        raise ValueError(
            f"segment_rows={segment_rows} must be a positive multiple of 64 that divides "
            f"panel_rows={panel_rows}"
        )
    value_dtype = value_dtype or choose_value_dtype(weight)
    if value_dtype not in VALUE_KINDS:
        raise ValueError(f"value_dtype={value_dtype} not supported; use bf16 or fp16")
    n_rows, n_cols = weight.shape
    weight = weight.detach().cpu()
    bitmaps = bool((weight != 0).sum() < DENSE_RUNS_MIN_KEPT * weight.numel())
    pack_runs = _pack_runs if bitmaps else _pack_dense_runs
    pieces: list[torch.Tensor] = []
    segment_starts: list[torch.Tensor] = []
    total = 0
    for r0 in range(0, n_rows, panel_rows):
        for k0 in range(0, n_cols, _CHANNEL_CHUNK):
            piece, block_starts = pack_runs(
                weight[r0 : r0 + panel_rows, k0 : k0 + _CHANNEL_CHUNK], value_dtype
            )
            starts = _segment_starts(block_starts, piece.numel(), panel_rows, segment_rows)
            pieces.append(piece)
            segment_starts.append(total + starts.flatten())
            total += piece.numel()
    offsets = torch.cat([*segment_starts, torch.tensor([total])])
    data = huge_page_empty(total + TAIL_PADDING, torch.int16)
    torch.cat(pieces, out=data[:total])
    data[total:] = 0
    return CpuSparseWeight(
        data=data,
        offsets=offsets,
        out_features=n_rows,
        in_features=n_cols,
        panel_rows=panel_rows,
        segment_rows=segment_rows,
        value_dtype=value_dtype,
        bitmaps=bitmaps,
    )


def _segment_starts(
    block_starts: torch.Tensor, end: int, panel_rows: int, segment_rows: int
) -> torch.Tensor:
    """``[k, S]`` first words of each channel's segments, from its blocks' ``[k, n_blk]`` first
    words; a segment past the panel's last block starts where the run ends (the next channel's
    run, or ``end`` for the last channel)."""
    k, n_blk = block_starts.shape
    seg_blocks, n_seg = segment_rows // BLOCK_ROWS, panel_rows // segment_rows
    run_ends = torch.cat([block_starts[1:, 0], torch.tensor([end])])
    starts = run_ends[:, None].expand(k, n_seg).clone()
    firsts = block_starts[:, ::seg_blocks]
    starts[:, : firsts.shape[1]] = firsts
    return starts


def _pack_runs(rows: torch.Tensor, value_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The runs of one panel's ``[n, k]`` slice, channel after channel, and the ``[k, n_blk]``
    start words of their blocks."""
    n, k = rows.shape
    n_blk = -(-n // BLOCK_ROWS)
    bits = torch.zeros(k, n_blk * BLOCK_ROWS, dtype=value_dtype)
    bits[:, :n] = rows.t().to(value_dtype)
    bits = bits.view(torch.int16).view(-1, BLOCK_ROWS)  # one line per (channel, block)
    kept = torch.zeros(k, n_blk * BLOCK_ROWS, dtype=torch.bool)
    kept[:, :n] = rows.t() != 0
    kept = kept.view(-1, BLOCK_ROWS)
    bitmap = (kept.view(-1, _BITMAP_WORDS, 16).to(torch.int32) * _BIT_WEIGHTS).sum(-1)
    lengths = _BITMAP_WORDS + kept.sum(-1)
    starts = torch.zeros_like(lengths)
    starts[1:] = lengths.cumsum(0)[:-1]
    out = torch.empty(int(lengths.sum()), dtype=torch.int16)
    out[(starts[:, None] + torch.arange(_BITMAP_WORDS)).flatten()] = _to_int16_bits(
        bitmap
    ).flatten()
    rank = kept.to(torch.int64).cumsum(1) - 1
    out[(starts[:, None] + _BITMAP_WORDS + rank)[kept]] = bits[kept]
    return out, starts.view(k, n_blk)


def _pack_dense_runs(
    rows: torch.Tensor, value_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bitmap-free runs of one panel's ``[n, k]`` slice (every block all 64 rows' values) and
    the ``[k, n_blk]`` start words of their blocks."""
    n, k = rows.shape
    n_blk = -(-n // BLOCK_ROWS)
    values = torch.zeros(k, n_blk * BLOCK_ROWS, dtype=value_dtype)
    values[:, :n] = rows.t().to(value_dtype)
    block_starts = torch.arange(k * n_blk).view(k, n_blk) * BLOCK_ROWS
    return values.view(torch.int16).flatten(), block_starts


def unpack_cpu_weight(packed: CpuSparseWeight) -> torch.Tensor:
    """Decode the layout back into the masked dense weight, reading the stored words only.

    Walks every run block by block with the bitmaps' popcounts (or 64 values a block without
    bitmaps) and checks that each segment and run starts at its offset and each run ends where
    the next one starts.

    Args:
        packed: a packed weight.

    Returns:
        ``[N, K]`` weight in ``packed.value_dtype``: the rounded weight the kernel multiplies by.

    Raises:
        ValueError: when the offsets disagree with the bitmaps.
    """
    n_rows, n_cols, n_seg = packed.out_features, packed.in_features, packed.n_segments
    seg_blocks = packed.segment_rows // BLOCK_ROWS
    words = packed.data.to(torch.int32) & 0xFFFF
    segments = packed.offsets[:-1].view(packed.n_panels, n_cols, n_seg)
    out = torch.zeros(packed.n_panels * packed.panel_rows, n_cols, dtype=torch.int16)
    for p in range(packed.n_panels):
        r0 = p * packed.panel_rows
        n_blk = -(-min(packed.panel_rows, n_rows - r0) // BLOCK_ROWS)
        pos = segments[p, :, 0].clone()
        for b in range(n_blk):
            if b % seg_blocks == 0 and not torch.equal(pos, segments[p, :, b // seg_blocks]):
                raise ValueError(f"panel {p}: segment {b // seg_blocks} starts disagree")
            if packed.bitmaps:
                bitmap = words[pos[:, None] + torch.arange(_BITMAP_WORDS)]
                kept = ((bitmap[:, :, None] >> torch.arange(16)) & 1).bool()
                kept = kept.view(n_cols, BLOCK_ROWS)
                header = _BITMAP_WORDS
            else:
                kept = torch.ones(n_cols, BLOCK_ROWS, dtype=torch.bool)
                header = 0
            rank = kept.to(torch.int64).cumsum(1) - 1
            block = torch.zeros(n_cols, BLOCK_ROWS, dtype=torch.int16)
            block[kept] = packed.data[(pos[:, None] + header + rank)[kept]]
            out[r0 + b * BLOCK_ROWS : r0 + (b + 1) * BLOCK_ROWS] = block.t()
            pos += header + kept.sum(1)
        ends = packed.run_starts[p * n_cols + 1 : (p + 1) * n_cols + 1]
        empty = segments[p, :, -(-n_blk // seg_blocks) :]  # segments past the last row
        if not torch.equal(pos, ends) or not torch.equal(empty, pos[:, None].expand_as(empty)):
            raise ValueError(f"panel {p}: run lengths disagree with the offsets")
    return out.view(packed.value_dtype)[:n_rows]


def _to_int16_bits(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 16-bit values held in int32 -> the int16 with the same bits."""
    return torch.where(words >= 2**15, words - 2**16, words).to(torch.int16)
