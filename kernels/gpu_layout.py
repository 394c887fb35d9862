"""The GPU kernel layout of a pruned weight: input-channel-major slots inside output tiles.

Built once after loading (``pack_gpu_weight``) from a masked dense ``W[N, K]`` whose zeros are
the pruned entries. Rows are cut into output tiles of ``tile_n`` rows (``T = ceil(N / tile_n)``,
the last tile padded with pruned rows). Inside tile ``t`` the kept weights of input channel ``k``
form one *slot*, and the slots follow each other channel by channel::

    bitmap  int32 [T, K, tile_n // 32]  bit b of word w of (t, k) is 1 where
                                        W[t * tile_n + 32 * w + b, k] is kept (LSB first)
    offsets int32 [T, K]                index in ``values`` of slot (t, k)'s first value
    values  dtype [nnz (+1)]            kept values, ordered by (tile, channel, row)

A decode kernel that finds ``x_k == 0`` skips slot (t, k) whole: its bitmap words and its values
are contiguous and never loaded. The position of a kept weight inside its slot is its rank among
the slot's set bits, so no per-value index is stored.

Bytes per weight (16-bit values, ``tile_n = 128``, 50% weight sparsity), method.md section 8:

- stored: values 0.5 * 2 = 1.0, bitmap 1/8 = 0.125, offsets 4/128 = 0.031 -> 1.156 B/weight
  (dense: 2.0, so the layout is 1.73x smaller in memory);
- read by the decode kernel at 50% activation sparsity: half of the slots,
  0.5 * (1.0 + 0.125) + 0.031 (offset sectors are shared by neighbouring channels) = 0.594
  B/weight: 3.4x fewer than dense and 1.68x fewer than an activation-only kernel (1.0).

Why not a fixed-capacity padded slot (no offsets, aligned starts)? The capacity must hold the
densest slot of the matrix. DuoGPT/SparseGPT masks are balanced per row but not per column:
outlier input channels keep most of their weights, so the capacity approaches ``tile_n`` and
the padded layout stores about 2.1 B/weight, more than dense. Reads could skip the padding, but
the memory saving of weight sparsity would be lost. Variable slots with one int32 offset per
slot cost 0.031 B/weight at ``tile_n = 128``; larger tiles make slots longer (about 128 bytes
here), which keeps the gathers close to whole 32-byte sectors.

Everything here is plain torch on dense tensors and runs on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_TILE_N = 128
_BIT_SHIFTS = torch.arange(32, dtype=torch.int64)


@dataclass(frozen=True)
class GpuSparseWeight:
    """A pruned ``[N, K]`` weight in the GPU kernel layout (see the module docstring).

    Attributes:
        values: ``[nnz + 1]`` kept values in the weight's dtype, slot after slot; one trailing
            zero so the tensor is never empty.
        bitmap: ``[T, K, tile_n // 32]`` int32 keep-bits per slot.
        offsets: ``[T, K]`` int32 start of each slot in ``values``.
        n: output features ``N`` (rows of the dense weight).
        k: input features ``K``.
        tile_n: rows per output tile, a power of two >= 32.
    """

    values: torch.Tensor
    bitmap: torch.Tensor
    offsets: torch.Tensor
    n: int
    k: int
    tile_n: int

    @property
    def nnz(self) -> int:
        """Number of kept weights."""
        return self.values.numel() - 1

    @property
    def density(self) -> float:
        """Fraction of kept weights, ``1 - weight sparsity``."""
        return self.nnz / max(self.n * self.k, 1)

    @property
    def num_tiles(self) -> int:
        """Output tiles ``T``."""
        return self.bitmap.shape[0]

    def nbytes(self) -> int:
        """Bytes the layout occupies in memory."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.bitmap, self.offsets))

    def bytes_read(self, active: torch.Tensor) -> int:
        """Bytes of weight data a channel-skipping kernel reads for a set of active channels.

        Counts the values, bitmap words and offsets of the active channels' slots (whole
        elements, not DRAM sectors). Synchronises with the device: for benchmarks only.

        Args:
            active: ``[K]`` bool, True where some token's activation survives the threshold.

        Returns:
            The byte count.
        """
        assert active.shape == (self.k,), f"active {tuple(active.shape)} vs K={self.k}"
        ends = torch.cat([self.offsets.flatten()[1:], self.offsets.new_tensor([self.nnz])])
        counts = (ends - self.offsets.flatten()).view(self.num_tiles, self.k).to(torch.int64)
        values = counts[:, active.to(counts.device)].sum().item() * self.values.element_size()
        per_slot = self.bitmap.shape[2] * 4 + 4
        return int(values + int(active.sum().item()) * self.num_tiles * per_slot)

    def to(self, device: torch.device | str) -> GpuSparseWeight:
        """The same layout with every tensor on ``device``."""
        return GpuSparseWeight(
            self.values.to(device),
            self.bitmap.to(device),
            self.offsets.to(device),
            self.n,
            self.k,
            self.tile_n,
        )


def pack_gpu_weight(weight: torch.Tensor, tile_n: int = DEFAULT_TILE_N) -> GpuSparseWeight:
    """Convert a masked dense weight into the GPU layout.

    A fused layer (qkv, gate_up: one input, one threshold) is packed as one matrix: concatenate
    the partitions along ``N`` first.

    Args:
        weight: ``[N, K]`` masked dense weight; entries equal to zero are pruned.
        tile_n: rows per output tile, a power of two >= 32.

    Returns:
        The packed weight on ``weight``'s device, values in ``weight``'s dtype.

    Raises:
        ValueError: on a bad shape, tile size, or more kept weights than int32 offsets address.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if tile_n < 32 or tile_n & (tile_n - 1):
        raise ValueError(f"tile_n must be a power of two >= 32, got {tile_n}")
    n, k = weight.shape
    num_tiles = -(-n // tile_n)
    padded = weight.new_zeros(num_tiles * tile_n, k)
    padded[:n] = weight
    # [T, K, tile_n]: slot (t, k) holds rows of tile t for channel k, in row order.
    slots = padded.view(num_tiles, tile_n, k).permute(0, 2, 1)
    kept = slots != 0
    values = slots[kept]  # boolean indexing walks (t, k, row) in row-major order
    if values.numel() >= 2**31:
        raise ValueError(f"{values.numel()} kept weights exceed the int32 offsets of this layout")
    counts = kept.sum(dim=2, dtype=torch.int64).flatten()
    offsets = (torch.cumsum(counts, 0) - counts).to(torch.int32).view(num_tiles, k)
    words = kept.reshape(num_tiles, k, tile_n // 32, 32).to(torch.int64)
    packed = (words << _BIT_SHIFTS.to(weight.device)).sum(dim=3)
    # Reinterpret the unsigned 32-bit words as int32 (two's complement) for the kernels.
    bitmap = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    values = torch.cat([values, values.new_zeros(1)]).contiguous()
    return GpuSparseWeight(values, bitmap.contiguous(), offsets.contiguous(), n, k, tile_n)


def unpack_gpu_weight(packed: GpuSparseWeight) -> torch.Tensor:
    """Rebuild the masked dense ``[N, K]`` weight (the inverse of ``pack_gpu_weight``).

    Args:
        packed: a packed weight.

    Returns:
        The dense weight in the values' dtype, on the values' device.
    """
    num_tiles, k, words = packed.bitmap.shape
    bits = (packed.bitmap.to(torch.int64)[..., None] >> _BIT_SHIFTS.to(packed.bitmap.device)) & 1
    kept = bits.bool().reshape(num_tiles, k, words * 32)
    slots = packed.values.new_zeros(num_tiles, k, words * 32)
    slots[kept] = packed.values[: packed.nnz]
    return slots.permute(0, 2, 1).reshape(num_tiles * words * 32, k)[: packed.n].contiguous()
