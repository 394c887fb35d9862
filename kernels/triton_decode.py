"""Dual-sparse decode kernel: few tokens per step, only the active channels' slots are read.

At decode time a linear is a matrix-vector product bound by memory bandwidth (method.md
section 8), so the kernel is built to read as few bytes as possible and to keep every SM busy:

- Grid ``(T, SPLIT_K)``: one program per output tile of the ``GpuSparseWeight`` layout and
  channel range. A 4096 x 4096 layer has 32 tiles of 128 rows; ``SPLIT_K = 16`` makes 512
  programs for 132 SMs. Partial tiles are reduced in the same launch by the serial split-K
  fix-up of ``triton_common.store_split_k`` (no second kernel, no atomics on the output).
- The layer's threshold is applied to ``x`` inside the kernel. A channel is active when any of
  the ``M`` tokens keeps it; an inactive channel's slot (bitmap words and values) is never
  loaded.
- Work compaction: each program first writes the list of its range's active channels to a
  small scratch (``active``, shared by the programs of that range: they write identical
  lists) and then decodes only those, ``BLOCK_K`` at a time. Decoding is integer work per
  weight, so without the list the skipped channels would still cost instructions.
- Decoding a slot: its ``tile_n / 32`` bitmap words are one 16-byte load; the value of row
  ``32 w + r`` sits at ``offset + popc(words before w) + popc(word_w & ((1 << r) - 1))``.
  Register tiles are ``[8, BLOCK_K, WORDS, 4]`` with row ``r = 4 j + b``: the lanes of a warp
  take ``(w, b)`` of two channels, so a gather instruction stays within two slots (a few
  32-byte sectors), and each thread owns the eight ``j`` of one ``(channel, w, b)``, loading
  that channel's activation, offset and word once per eight weights. ``popc`` is one PTX
  instruction; the interpreter and AMD use a SWAR popcount. The gather is unmasked (an unkept
  row's index stays inside its slot) and a select zeroes it.
- Accumulation is fp32 in a ``[BLOCK_M, 8, BLOCK_K, WORDS, 4]`` register tile reduced once at
  the end (no cross-warp reduction inside the loop); the output is written in ``x``'s dtype.

Cost, from the sm_90 cubins (no GPU was available to time it): the decoding loop issues about
15 instructions per decoded weight at ``BLOCK_K = 32`` (18 at 16), so on an H200 (132 SMs x 4
issue slots x 1.98 GHz) it is instruction-bound near 2.2e12 decoded weights/s, where reading
0.59 B/weight at 4.8 TB/s would allow 4e12 (W50/X50: 8e12 weights/s of which half are
active). The bitmap decode, not DRAM, is the limit; fewer instructions per weight is where
further speed is.

Nothing depends on data on the host: no synchronisation, fixed grid and allocations, so the op
can be captured in a CUDA graph. Use it for ``M <= 8``; more tokens activate nearly every
channel (method.md section 8) and belong to ``triton_prefill``.
"""

from __future__ import annotations

import functools

import torch

from vllm_duogpt.kernels.gpu_layout import GpuSparseWeight
from vllm_duogpt.kernels.triton_common import (
    SEMAPHORE_SLOTS,
    check_sparse_layout_args,
    density_bin,
    interpreting,
    kernel_interpreted,
    kernel_unavailable_reason,
    next_pow2,
    popcount32,
    require_triton,
    shape_bucket,
    split_semaphores,
    store_split_k,
    threshold_in_dtype,
    tl,
    triton,
    tuning_bench,
    use_ptx_popc,
)

MAX_DECODE_TOKENS = 8
_CHUNK_K = 128


def _configs() -> list:
    """Autotune space: register tile ``BLOCK_K`` x split factor; one tiny config interpreted."""
    if interpreting():
        return [triton.Config({"CHUNK_K": 16, "BLOCK_K": 4, "SPLIT_K": 2}, num_warps=1)]
    return [
        triton.Config({"CHUNK_K": _CHUNK_K, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=4)
        for bk in (4, 8, 16, 32)
        for sk in (2, 4, 8, 16, 32, 64)
    ]


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _prune(configs: list, named_args: dict, **kwargs: object) -> list:
    """Keep register tiles of 8..32 token-channels and splits that give 1..8 waves of programs."""
    block_m, n_tiles, k = kwargs["BLOCK_M"], named_args["N_TILES"], named_args["K"]
    sms = _num_sms(named_args["x_ptr"].device)
    fits = [c for c in configs if 8 <= block_m * c.kwargs["BLOCK_K"] <= 32]
    fits = fits or configs[:1]
    useful = [
        c
        for c in fits
        if sms <= n_tiles * c.kwargs["SPLIT_K"] <= 8 * sms
        and k >= c.kwargs["SPLIT_K"] * c.kwargs["CHUNK_K"]
    ]
    if useful:
        return useful
    smallest = min(c.kwargs["SPLIT_K"] for c in fits)
    return [c for c in fits if c.kwargs["SPLIT_K"] == smallest]


def _range_size(k: int, split_k: int, chunk_k: int) -> int:
    """Channels covered by ``split_k`` ranges of whole chunks (as the kernel computes them)."""
    per_range = -(-k // split_k)
    return split_k * -(-per_range // chunk_k) * chunk_k


@triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "DENSITY_BIN"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=tuning_bench,
    cache_results=True,
)
@triton.jit(do_not_specialize=["SPLIT_K", "M_BUCKET", "N_BUCKET", "K_BUCKET", "DENSITY_BIN"])
def _dual_sparse_decode_kernel(
    # pointers
    x_ptr,
    values_ptr,
    bitmap_ptr,
    offsets_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    sem_ptr,
    active_ptr,
    # sizes
    M,
    N,
    K,
    N_TILES,
    threshold,
    # strides
    stride_xm,
    stride_xk,
    stride_om,
    stride_on,
    # autotune keys (bucketed shapes and weight density; not read by the body)
    M_BUCKET,
    N_BUCKET,
    K_BUCKET,
    DENSITY_BIN,
    # meta-parameters (SPLIT_K is a plain, unspecialised int: configs differing only in it
    # share one binary)
    BLOCK_M: tl.constexpr,
    WORDS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_PTX_POPC: tl.constexpr,
    CHUNK_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    # Row 32 w + 4 j + b of a tile is bit 4 j + b of word w. Tiles are [8 (j), BLOCK_K, WORDS, 4]:
    # a warp's lanes take (w, b) of two channels, so one gather instruction reads two slots,
    # and each thread owns the eight j of its (channel, w, b): it loads a channel's activation,
    # offset and word once per eight values.
    bit = 4 * tl.arange(0, 8)[:, None] + tl.arange(0, 4)[None, :]  # [8, 4]
    bit_u = bit.to(tl.uint32)
    one = tl.full([8, 4], 1, tl.uint32)
    # The bit itself and the bits below it; unsigned so bit 31 does not overflow.
    this_bit = (one << bit_u).to(tl.int32, bitcast=True)
    below_b = ((one << bit_u) - 1).to(tl.int32, bitcast=True)
    words_idx = tl.arange(0, WORDS)

    # This program's channel range, in whole chunks.
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), CHUNK_K) * CHUNK_K
    k_lo = pid_k * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    slot_base = pid_n.to(tl.int64) * K

    # Step 1: list the range's active channels (any token keeps them) in active[k_lo:], so
    # the decoding loop below never spends work on a skipped channel. Programs of the same
    # range write identical lists to the same place, so sharing the scratch is race-free.
    n_active = 0
    for c0 in range(k_lo, k_hi, CHUNK_K):
        offs_c = c0 + tl.arange(0, CHUNK_K)
        xc = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_c[None, :] * stride_xk,
            mask=m_mask[:, None] & (offs_c < k_hi)[None, :],
            other=0.0,
        ).to(tl.float32)
        xc = tl.where(tl.abs(xc) < threshold, 0.0, xc)
        active = tl.max(tl.where(xc != 0.0, 1, 0), axis=0)  # NaN counts as active
        position = n_active + tl.cumsum(active, axis=0) - 1
        tl.store(active_ptr + k_lo + position, offs_c, mask=active != 0)
        n_active += tl.sum(active, axis=0)
    # The list was written by other threads of this program.
    tl.debug_barrier()

    acc = tl.zeros([BLOCK_M, 8, BLOCK_K, WORDS, 4], dtype=tl.float32)
    for i0 in range(0, n_active, BLOCK_K):
        # Step 2: the next BLOCK_K active channels and their thresholded activations.
        slot = i0 + tl.arange(0, BLOCK_K)
        valid = slot < n_active
        k_idx = tl.load(active_ptr + k_lo + slot, mask=valid, other=0)
        xk = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + k_idx[None, :] * stride_xk,
            mask=m_mask[:, None] & valid[None, :],
            other=0.0,
        ).to(tl.float32)
        xk = tl.where(tl.abs(xk) < threshold, 0.0, xk)
        # Step 3: decode their slots: the value index of every kept row.
        slot_idx = slot_base + k_idx
        start = tl.load(offsets_ptr + slot_idx, mask=valid, other=0)
        words = tl.load(
            bitmap_ptr + slot_idx[:, None] * WORDS + words_idx[None, :],
            mask=valid[:, None],
            other=0,
        )
        counts = popcount32(words, USE_PTX_POPC)
        word_start = start[:, None] + tl.cumsum(counts, axis=1) - counts  # [BLOCK_K, WORDS]
        w4 = words[None, :, :, None]
        kept = (w4 & this_bit[:, None, None, :]) != 0
        below = popcount32(w4 & below_b[:, None, None, :], USE_PTX_POPC)
        # An unkept row's index points at the next kept value of the same run of bytes (or at
        # the trailing pad value), so the gather needs no mask; the select zeroes it.
        vals = tl.load(values_ptr + (word_start[None, :, :, None] + below))
        vals = tl.where(kept, vals.to(tl.float32), 0.0)
        # Step 4: accumulate; the reduction over BLOCK_K waits until the end.
        acc += xk[:, None, :, None, None] * vals[None, :, :, :, :]

    # [BLOCK_M, 8 (j), WORDS, 4] -> rows 32 w + 4 j + b
    out = tl.reshape(tl.permute(tl.sum(acc, axis=2), (0, 2, 1, 3)), [BLOCK_M, WORDS * 32])
    offs_n = pid_n * (WORDS * 32) + tl.arange(0, WORDS * 32)
    store_split_k(
        out,
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
        pid_n,
        pid_k,
        SPLIT_K,
        HAS_BIAS,
    )


_INTERPRETED = kernel_interpreted(_dual_sparse_decode_kernel)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why this kernel cannot run on ``device`` with activations of ``dtype``, or None."""
    return kernel_unavailable_reason(device, dtype, _INTERPRETED)


# x: [M, K] fp16/bf16/fp32 with M <= 8; values: [nnz + 1] x.dtype; bitmap: [T, K, tile_n / 32]
# int32; offsets: [T, K] int32; bias: [N] or None
# out: [M, N] x.dtype, row-major
@torch.library.custom_op("duogpt::triton_dual_sparse_decode", mutates_args=())
def triton_dual_sparse_decode(
    x: torch.Tensor,
    values: torch.Tensor,
    bitmap: torch.Tensor,
    offsets: torch.Tensor,
    n: int,
    threshold: float,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``sparsify(x, threshold) @ W.T + bias`` for a ``GpuSparseWeight`` ``W``, few tokens.

    Args:
        x: ``[M, K]`` activations, ``M <= 8``.
        values: the layout's packed values, same dtype as ``x``.
        bitmap: the layout's ``[T, K, tile_n // 32]`` int32 keep-bits.
        offsets: the layout's ``[T, K]`` int32 slot starts.
        n: output features ``N``.
        threshold: the layer's activation threshold (``|x| < threshold`` is dropped).
        bias: optional ``[N]`` bias.

    Returns:
        ``[M, N]`` output in ``x``'s dtype.
    """
    require_triton(x.device, _INTERPRETED)
    m, k, num_tiles, words = check_sparse_layout_args(x, values, bitmap, offsets, n, bias)
    assert m <= MAX_DECODE_TOKENS, f"decode kernel takes <= {MAX_DECODE_TOKENS} tokens, got {m}"
    assert num_tiles <= SEMAPHORE_SLOTS, f"{num_tiles} tiles exceed the split-K counters"
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_m = next_pow2(m)
    configs = _dual_sparse_decode_kernel.configs
    if not _INTERPRETED:
        configs = _prune(configs, {"N_TILES": num_tiles, "K": k, "x_ptr": x}, BLOCK_M=block_m)
    max_split = max(c.kwargs["SPLIT_K"] for c in configs)
    partial = torch.empty(max_split, m, n, dtype=torch.float32, device=x.device)
    # Active-channel lists: one region per channel range, each range whole chunks.
    active = torch.empty(
        max(_range_size(k, c.kwargs["SPLIT_K"], c.kwargs["CHUNK_K"]) for c in configs),
        dtype=torch.int32,
        device=x.device,
    )
    density = (values.numel() - 1) / max(n * k, 1)

    def grid(meta: dict) -> tuple[int, int]:
        return (num_tiles, meta["SPLIT_K"])

    _dual_sparse_decode_kernel[grid](
        x,
        values,
        bitmap,
        offsets,
        bias if bias is not None else out,
        out,
        partial,
        split_semaphores(x.device),
        active,
        m,
        n,
        k,
        num_tiles,
        threshold_in_dtype(threshold, x.dtype),
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        block_m,
        shape_bucket(n),
        shape_bucket(k),
        density_bin(density),
        BLOCK_M=block_m,
        WORDS=words,
        HAS_BIAS=bias is not None,
        USE_PTX_POPC=use_ptx_popc(x.device, _INTERPRETED),
    )
    return out


@triton_dual_sparse_decode.register_fake
def _decode_fake(
    x: torch.Tensor,
    values: torch.Tensor,
    bitmap: torch.Tensor,
    offsets: torch.Tensor,
    n: int,
    threshold: float,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)


def dual_sparse_decode(
    x: torch.Tensor,
    weight: GpuSparseWeight,
    threshold: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``duogpt::triton_dual_sparse_decode`` on a packed weight (see the op's docstring)."""
    return torch.ops.duogpt.triton_dual_sparse_decode(
        x, weight.values, weight.bitmap, weight.offsets, weight.n, threshold, bias
    )
