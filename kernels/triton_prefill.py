"""Dual-sparse many-token kernel: weight tiles decompressed on chip, products on tensor cores.

With more than a handful of tokens the union of active channels covers nearly every channel
(method.md section 8: about 94% at 4 tokens and 50% activation sparsity), so skipping slots
saves little; what remains is weight sparsity, the ~0.58x bytes of the layout. The kernel is
Triton tutorial 03's tiled matmul with the B operand decoded from the ``GpuSparseWeight`` slots:

- Grid ``(M tiles, T, SPLIT_K)``: the token tile varies fastest, so programs that decode the
  same weight tile run together and read its bytes from L2 after the first one. ``SPLIT_K > 1``
  (serial fix-up in ``triton_common.store_split_k``) is only tuned in for up to 128 tokens,
  where ``M tiles x T`` alone leaves SMs idle (16 tokens on a 4096-row layer: 32 programs).
- Per ``BLOCK_K`` channels: load and threshold the token tile; a channel that no token of the
  tile keeps has its slot left unread. Decode the slots exactly as the decode kernel does
  (16-byte bitmap load, ``popc`` ranks, value gather), reshape to ``[BLOCK_K, tile_n]`` and
  ``tl.dot`` with fp32 accumulation. The N side of the tile is the layout's ``tile_n`` (128).
- In the interpreter, and for fp32 inputs, both operands go to ``tl.dot`` as fp32 with IEEE
  precision: the interpreter's 16-bit dot is silently wrong, and TF32 would not be exact.

Decoding costs about 17-24 SASS instructions per weight (counted in the sm_90 cubins) and is
repeated for every token tile; token tiles above 64 spill registers. So the fused kernel pays
off while it is memory-bound (up to ~128 tokens: one or two token tiles); above
``FUSED_MAX_TOKENS`` the op decodes the weight once into a dense ``W^T`` (``triton_unpack``)
and calls cuBLAS. Threshold, bias, fp32 accumulation and output dtype follow the decode kernel;
no host synchronisation on either path.
"""

from __future__ import annotations

import functools

import torch

from vllm_duogpt.kernels.gpu_layout import GpuSparseWeight
from vllm_duogpt.kernels.reference import sparsify_activations
from vllm_duogpt.kernels.triton_common import (
    SEMAPHORE_SLOTS,
    check_sparse_layout_args,
    density_bin,
    interpreting,
    kernel_interpreted,
    kernel_unavailable_reason,
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
from vllm_duogpt.kernels.triton_unpack import triton_unpack_transposed

MIN_PREFILL_BLOCK_M = 16  # tl.dot needs 16 rows
# Above this many tokens, decode the weight once to dense and use cuBLAS (triton_unpack).
FUSED_MAX_TOKENS = 128
_MAX_SPLIT_TOKENS = 128


def _configs() -> list:
    """Autotune space: token tile, channel tile, warps, stages, split; one config interpreted."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16, "SPLIT_K": 1}, num_warps=1)]
    # Checked against the sm_90 cubins: none spills. Token tiles of 128 spill at any split of
    # warps and stages, which is why large batches take the unpack path instead.
    tiles = [(16, 32, 4, 3), (16, 64, 8, 3), (32, 64, 8, 3), (64, 32, 8, 3), (64, 64, 8, 2)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=s)
        for bm, bk, w, s in tiles
        for sk in (1, 2, 4, 8)
    ]


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _prune(configs: list, named_args: dict, **kwargs: object) -> list:
    """Token tiles no larger than the token count; splits only while programs are scarce."""
    m, n_tiles, k = named_args["M"], named_args["N_TILES"], named_args["K"]
    sms = _num_sms(named_args["x_ptr"].device)
    cap = max(MIN_PREFILL_BLOCK_M, 1 << max(m - 1, 0).bit_length())
    kept = []
    for c in configs:
        bm, bk, sk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]
        programs = -(-m // bm) * n_tiles
        if bm > cap:
            continue
        if sk > 1 and (m > _MAX_SPLIT_TOKENS or programs * sk > 4 * sms or k < 4 * sk * bk):
            continue
        kept.append(c)
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], c.kwargs["SPLIT_K"]))]


@triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "DENSITY_BIN"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=tuning_bench,
    cache_results=True,
)
@triton.jit(do_not_specialize=["SPLIT_K", "M_BUCKET", "N_BUCKET", "K_BUCKET", "DENSITY_BIN"])
def _dual_sparse_prefill_kernel(
    # pointers
    x_ptr,
    values_ptr,
    bitmap_ptr,
    offsets_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    sem_ptr,
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
    WORDS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_PTX_POPC: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K,
):
    TILE_N: tl.constexpr = WORDS * 32
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    # Decoding layout [BLOCK_K, WORDS, 32]: lanes along the bits of a word. (The decode
    # kernel's [8, BLOCK_K, WORDS, 4] tiling needs a permute before tl.dot, which Triton 3.9
    # fails to lower for some tile shapes: "Illegal shared layout".)
    bit = tl.arange(0, 32)
    one = tl.full([32], 1, tl.uint32)
    this_bit = (one << bit.to(tl.uint32)).to(tl.int32, bitcast=True)
    below_b = ((one << bit.to(tl.uint32)) - 1).to(tl.int32, bitcast=True)
    words_idx = tl.arange(0, WORDS)

    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    slot_base = pid_n.to(tl.int64) * K

    acc = tl.zeros([BLOCK_M, TILE_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        # Step 1: threshold the token tile; channels no token keeps are not read.
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        x = tl.where(tl.abs(x.to(tl.float32)) < threshold, 0.0, x)
        active = (tl.max(tl.where(x != 0.0, 1, 0), axis=0) > 0) & k_mask
        # Step 2: decode the [BLOCK_K, TILE_N] weight tile from its slots.
        slot_idx = slot_base + offs_k
        start = tl.load(offsets_ptr + slot_idx, mask=active, other=0)
        words = tl.load(
            bitmap_ptr + slot_idx[:, None] * WORDS + words_idx[None, :],
            mask=active[:, None],
            other=0,
        )
        counts = popcount32(words, USE_PTX_POPC)
        word_start = start[:, None] + tl.cumsum(counts, axis=1) - counts
        w3 = words[:, :, None]
        kept = (w3 & this_bit[None, None, :]) != 0
        below = popcount32(w3 & below_b[None, None, :], USE_PTX_POPC)
        # Unmasked gather: an unkept row points inside the same slot or at the pad value.
        vals = tl.load(values_ptr + (word_start[:, :, None] + below))
        vals = tl.where(kept, vals, tl.zeros_like(vals))
        w = tl.reshape(vals, [BLOCK_K, TILE_N])
        # Step 3: tensor-core product, fp32 accumulation.
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x.to(w.dtype), w, acc)

    offs_n = pid_n * TILE_N + tl.arange(0, TILE_N)
    store_split_k(
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
        pid_n * tl.num_programs(0) + pid_m,
        pid_k,
        SPLIT_K,
        HAS_BIAS,
    )


_INTERPRETED = kernel_interpreted(_dual_sparse_prefill_kernel)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why this kernel cannot run on ``device`` with activations of ``dtype``, or None."""
    return kernel_unavailable_reason(device, dtype, _INTERPRETED)


# x: [M, K] fp16/bf16/fp32; values: [nnz + 1] x.dtype; bitmap: [T, K, tile_n / 32] int32;
# offsets: [T, K] int32; bias: [N] or None
# out: [M, N] x.dtype, row-major
@torch.library.custom_op("duogpt::triton_dual_sparse_prefill", mutates_args=())
def triton_dual_sparse_prefill(
    x: torch.Tensor,
    values: torch.Tensor,
    bitmap: torch.Tensor,
    offsets: torch.Tensor,
    n: int,
    threshold: float,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``sparsify(x, threshold) @ W.T + bias`` for a ``GpuSparseWeight`` ``W``, many tokens.

    Args:
        x: ``[M, K]`` activations, any ``M``.
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
    if m > FUSED_MAX_TOKENS:
        weight_t = triton_unpack_transposed(values, bitmap, offsets, n)
        sparse = sparsify_activations(x, threshold)
        if bias is None:
            return torch.matmul(sparse, weight_t)
        return torch.addmm(bias, sparse, weight_t)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    configs = _dual_sparse_prefill_kernel.configs
    if not _INTERPRETED:
        configs = _prune(configs, {"M": m, "N_TILES": num_tiles, "K": k, "x_ptr": x})
    max_split = max(c.kwargs["SPLIT_K"] for c in configs)
    if max_split > 1:
        tiles = -(-m // MIN_PREFILL_BLOCK_M) * num_tiles
        assert tiles <= SEMAPHORE_SLOTS, f"{tiles} output tiles exceed the split-K counters"
    # Without a split the scratch is never touched; one fp32 element keeps the pointer's type.
    partial = torch.empty(
        (max_split, m, n) if max_split > 1 else (1,), dtype=torch.float32, device=x.device
    )
    density = (values.numel() - 1) / max(n * k, 1)

    def grid(meta: dict) -> tuple[int, int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]), num_tiles, meta["SPLIT_K"])

    _dual_sparse_prefill_kernel[grid](
        x,
        values,
        bitmap,
        offsets,
        bias if bias is not None else out,
        out,
        partial,
        split_semaphores(x.device),
        m,
        n,
        k,
        num_tiles,
        threshold_in_dtype(threshold, x.dtype),
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        shape_bucket(m),
        shape_bucket(n),
        shape_bucket(k),
        density_bin(density),
        WORDS=words,
        HAS_BIAS=bias is not None,
        USE_PTX_POPC=use_ptx_popc(x.device, _INTERPRETED),
        DOT_FP32=_INTERPRETED or x.dtype == torch.float32,
    )
    return out


@triton_dual_sparse_prefill.register_fake
def _prefill_fake(
    x: torch.Tensor,
    values: torch.Tensor,
    bitmap: torch.Tensor,
    offsets: torch.Tensor,
    n: int,
    threshold: float,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)


def dual_sparse_prefill(
    x: torch.Tensor,
    weight: GpuSparseWeight,
    threshold: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``duogpt::triton_dual_sparse_prefill`` on a packed weight (see the op's docstring)."""
    return torch.ops.duogpt.triton_dual_sparse_prefill(
        x, weight.values, weight.bitmap, weight.offsets, weight.n, threshold, bias
    )
