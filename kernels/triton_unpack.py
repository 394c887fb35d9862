"""Decompress a ``GpuSparseWeight`` into a dense transposed weight on the GPU, for big batches.

The fused many-token kernel (``triton_prefill``) decodes every weight tile once per token
tile. Decoding costs about 15-25 integer instructions per weight (bitmap bit, popcount rank,
gather), and the largest token tile that fits in registers without spilling is 64 (checked
on the sm_90 cubins), so at 512 tokens each weight is decoded 8 times: far more work than
the tensor-core product itself. Past a few hundred tokens it is cheaper to decode each weight
exactly once into a dense scratch ``W^T [K, N]`` (read ~0.58 B/weight, write 2 B/weight) and
let cuBLAS do the GEMM; ``triton_prefill`` switches to this path above
``FUSED_MAX_TOKENS`` (to be set from ``benchmarks/gpu_kernels.py``).

Grid ``(T, ceil(K / BLOCK_K))``: each program decodes ``BLOCK_K`` slots of one output tile
with the lanes of a warp along the 32 rows of a bitmap word, and writes each channel's 128
rows as one contiguous run of ``W^T``. Every element of ``W^T`` is written (zeros included),
so the scratch needs no clearing; no host synchronisation.
"""

from __future__ import annotations

import torch

from vllm_duogpt.kernels.triton_common import (
    interpreting,
    kernel_interpreted,
    popcount32,
    require_triton,
    tl,
    triton,
    use_ptx_popc,
)


def _configs() -> list:
    """Fixed tiles (a pure streaming pass; nothing to tune but the warps)."""
    if interpreting():
        return [triton.Config({"BLOCK_K": 8}, num_warps=1)]
    return [triton.Config({"BLOCK_K": 16}, num_warps=4)]


@triton.autotune(configs=_configs(), key=[])
@triton.jit
def _unpack_kernel(
    # pointers
    values_ptr,
    bitmap_ptr,
    offsets_ptr,
    out_ptr,
    # sizes
    N,
    K,
    # strides of out [K, N]
    stride_ok,
    stride_on,
    # meta-parameters
    WORDS: tl.constexpr,
    USE_PTX_POPC: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    bit = tl.arange(0, 32)
    one = tl.full([32], 1, tl.uint32)
    this_bit = (one << bit.to(tl.uint32)).to(tl.int32, bitcast=True)
    below_b = ((one << bit.to(tl.uint32)) - 1).to(tl.int32, bitcast=True)
    words_idx = tl.arange(0, WORDS)

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    slot_idx = pid_n.to(tl.int64) * K + offs_k
    start = tl.load(offsets_ptr + slot_idx, mask=k_mask, other=0)
    words = tl.load(
        bitmap_ptr + slot_idx[:, None] * WORDS + words_idx[None, :], mask=k_mask[:, None], other=0
    )
    counts = popcount32(words, USE_PTX_POPC)
    word_start = start[:, None] + tl.cumsum(counts, axis=1) - counts  # [BLOCK_K, WORDS]
    w3 = words[:, :, None]
    kept = (w3 & this_bit[None, None, :]) != 0
    below = popcount32(w3 & below_b[None, None, :], USE_PTX_POPC)
    # Unmasked gather: an unkept row points inside the same slot or at the pad value.
    vals = tl.load(values_ptr + (word_start[:, :, None] + below))
    vals = tl.where(kept, vals, tl.zeros_like(vals))

    rows = pid_n * (WORDS * 32) + words_idx[None, :, None] * 32 + bit[None, None, :]
    ptrs = out_ptr + offs_k[:, None, None] * stride_ok + rows * stride_on
    tl.store(ptrs, vals, mask=k_mask[:, None, None] & (rows < N))


_INTERPRETED = kernel_interpreted(_unpack_kernel)


# values: [nnz + 1]; bitmap: [T, K, tile_n / 32] int32; offsets: [T, K] int32
# out: [K, N] values.dtype, row-major (the dense W^T)
@torch.library.custom_op("duogpt::triton_unpack_transposed", mutates_args=())
def triton_unpack_transposed(
    values: torch.Tensor, bitmap: torch.Tensor, offsets: torch.Tensor, n: int
) -> torch.Tensor:
    """The dense ``W^T [K, N]`` of a ``GpuSparseWeight`` (pruned entries zero).

    Args:
        values: the layout's packed values.
        bitmap: the layout's ``[T, K, tile_n // 32]`` int32 keep-bits.
        offsets: the layout's ``[T, K]`` int32 slot starts.
        n: output features ``N``.

    Returns:
        ``[K, N]`` dense transposed weight in the values' dtype.
    """
    require_triton(values.device, _INTERPRETED)
    num_tiles, k, words = bitmap.shape
    assert offsets.shape == (num_tiles, k), f"offsets {tuple(offsets.shape)} vs bitmap"
    assert num_tiles * words * 32 >= n > (num_tiles - 1) * words * 32, f"N={n} vs {num_tiles} tiles"
    assert bitmap.dtype == offsets.dtype == torch.int32, "bitmap and offsets must be int32"
    assert values.is_contiguous() and bitmap.is_contiguous() and offsets.is_contiguous()
    out = torch.empty(k, n, dtype=values.dtype, device=values.device)

    def grid(meta: dict) -> tuple[int, int]:
        return (num_tiles, triton.cdiv(k, meta["BLOCK_K"]))

    _unpack_kernel[grid](
        values,
        bitmap,
        offsets,
        out,
        n,
        k,
        out.stride(0),
        out.stride(1),
        WORDS=words,
        USE_PTX_POPC=use_ptx_popc(values.device, _INTERPRETED),
    )
    return out


@triton_unpack_transposed.register_fake
def _unpack_fake(
    values: torch.Tensor, bitmap: torch.Tensor, offsets: torch.Tensor, n: int
) -> torch.Tensor:
    return values.new_empty(bitmap.shape[1], n)
