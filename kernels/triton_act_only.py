"""Activation-only sparse GEMV (TEAL-style): the baseline the dual-sparse kernels must beat.

The weight is dense and stored transposed, ``W^T [K, N]`` contiguous, so each input channel's
weights are one contiguous row. A channel whose activation is below the threshold for every
token is skipped: its row is never loaded. Bytes read are ``2 * (1 - s_a)`` per weight (1.0 at
50% activation sparsity), against 0.59 for the dual-sparse layout (``gpu_layout``).

It is written as well as the dual-sparse decode kernel, so the comparison measures the layout,
not the effort: the same split-K grid and in-launch fix-up (``triton_common.store_split_k``),
threshold inside the kernel, fp32 accumulation in a ``[BLOCK_M, BLOCK_K, BLOCK_N]`` register
tile reduced once, and 16-byte vector loads along ``N``. The weight rows of a block are masked
per channel, so skipped channels cost no memory traffic; the multiply-adds of a skipped row are
cheap enough here that no work compaction is needed.

For up to 16 tokens; beyond that activation sparsity leaves nothing to skip and a dense GEMM
is the baseline.
"""

from __future__ import annotations

import functools

import torch

from vllm_duogpt.kernels.triton_common import (
    ACTIVATION_DTYPES,
    SEMAPHORE_SLOTS,
    interpreting,
    kernel_interpreted,
    kernel_unavailable_reason,
    next_pow2,
    require_triton,
    shape_bucket,
    split_semaphores,
    store_split_k,
    threshold_in_dtype,
    tl,
    triton,
    tuning_bench,
)

MAX_ACT_ONLY_TOKENS = 16


def _configs() -> list:
    """Autotune space: output tile, channel tile, split factor; one tiny config interpreted."""
    if interpreting():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 8, "SPLIT_K": 2}, num_warps=1)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=4)
        for bn in (64, 128, 256)
        for bk in (2, 4, 8, 16, 32)
        for sk in (1, 2, 4, 8, 16, 32, 64)
    ]


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _prune(configs: list, named_args: dict, **kwargs: object) -> list:
    """Register tiles of 16..32 fp32 per thread; splits that give 1..8 waves of programs."""
    block_m, n, k = kwargs["BLOCK_M"], named_args["N"], named_args["K"]
    sms = _num_sms(named_args["x_ptr"].device)

    def regs(c: triton.Config) -> int:
        return block_m * c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)

    fits = [c for c in configs if 16 <= regs(c) <= 32] or [min(configs, key=regs)]
    useful = [
        c
        for c in fits
        if sms <= triton.cdiv(n, c.kwargs["BLOCK_N"]) * c.kwargs["SPLIT_K"] <= 8 * sms
        and k >= 4 * c.kwargs["SPLIT_K"] * c.kwargs["BLOCK_K"]
    ]
    if useful:
        return useful
    smallest = min(c.kwargs["SPLIT_K"] for c in fits)
    return [c for c in fits if c.kwargs["SPLIT_K"] == smallest]


@triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "N_BUCKET", "K_BUCKET"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=tuning_bench,
    cache_results=True,
)
@triton.jit(do_not_specialize=["SPLIT_K", "M_BUCKET", "N_BUCKET", "K_BUCKET"])
def _act_only_kernel(
    # pointers
    x_ptr,
    wt_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    sem_ptr,
    # sizes
    M,
    N,
    K,
    threshold,
    # strides
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wn,
    stride_om,
    stride_on,
    # autotune keys (bucketed shapes; not read by the body)
    M_BUCKET,
    N_BUCKET,
    K_BUCKET,
    # meta-parameters (SPLIT_K is a plain, unspecialised int: configs differing only in it
    # share one binary)
    BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N

    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per
    k_hi = tl.minimum(k_lo + k_per, K)

    acc = tl.zeros([BLOCK_M, BLOCK_K, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        # Step 1: threshold; a channel is read when any token keeps it.
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & (offs_k < k_hi)[None, :],
            other=0.0,
        ).to(tl.float32)
        x = tl.where(tl.abs(x) < threshold, 0.0, x)
        active = tl.max(tl.where(x != 0.0, 1, 0), axis=0) > 0
        # Step 2: the active channels' contiguous weight rows.
        w = tl.load(
            wt_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=active[:, None] & n_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += x[:, :, None] * w[None, :, :]

    store_split_k(
        tl.sum(acc, axis=1),
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


def act_only_weight(weight: torch.Tensor) -> torch.Tensor:
    """The baseline's layout: ``W^T`` contiguous, ``[K, N]``, from a dense ``[N, K]`` weight."""
    return weight.t().contiguous()


_INTERPRETED = kernel_interpreted(_act_only_kernel)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why this kernel cannot run on ``device`` with activations of ``dtype``, or None."""
    return kernel_unavailable_reason(device, dtype, _INTERPRETED)


# x: [M, K] fp16/bf16/fp32 with M <= 16; weight_t: [K, N] x.dtype (W^T, rows contiguous);
# bias: [N] or None
# out: [M, N] x.dtype, row-major
@torch.library.custom_op("duogpt::triton_act_only_decode", mutates_args=())
def triton_act_only_decode(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    threshold: float,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``sparsify(x, threshold) @ weight_t + bias``, skipping the rows of dropped channels.

    Args:
        x: ``[M, K]`` activations, ``M <= 16``.
        weight_t: ``[K, N]`` transposed dense weight (``act_only_weight``), ``x``'s dtype.
        threshold: the layer's activation threshold (``|x| < threshold`` is dropped).
        bias: optional ``[N]`` bias.

    Returns:
        ``[M, N]`` output in ``x``'s dtype.
    """
    require_triton(x.device, _INTERPRETED)
    m, k = x.shape
    k_w, n = weight_t.shape
    assert m <= MAX_ACT_ONLY_TOKENS, f"act-only kernel takes <= {MAX_ACT_ONLY_TOKENS} tokens"
    assert k_w == k, f"weight_t {tuple(weight_t.shape)} vs x {tuple(x.shape)}"
    assert weight_t.dtype == x.dtype, f"weight {weight_t.dtype} vs x {x.dtype}"
    assert x.dtype in ACTIVATION_DTYPES, f"dtype {x.dtype}"
    assert weight_t.stride(1) == 1, "weight_t rows must be contiguous (use act_only_weight)"
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous()), "bias must be [N]"
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_m = next_pow2(m)
    configs = _act_only_kernel.configs
    if not _INTERPRETED:
        configs = _prune(configs, {"N": n, "K": k, "x_ptr": x}, BLOCK_M=block_m)
    max_split = max(c.kwargs["SPLIT_K"] for c in configs)
    min_block_n = min(c.kwargs["BLOCK_N"] for c in configs)
    assert triton.cdiv(n, min_block_n) <= SEMAPHORE_SLOTS, "too many tiles for split-K counters"
    partial = torch.empty(max_split, m, n, dtype=torch.float32, device=x.device)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    _act_only_kernel[grid](
        x,
        weight_t,
        bias if bias is not None else out,
        out,
        partial,
        split_semaphores(x.device),
        m,
        n,
        k,
        threshold_in_dtype(threshold, x.dtype),
        x.stride(0),
        x.stride(1),
        weight_t.stride(0),
        weight_t.stride(1),
        out.stride(0),
        out.stride(1),
        block_m,
        shape_bucket(n),
        shape_bucket(k),
        BLOCK_M=block_m,
        HAS_BIAS=bias is not None,
    )
    return out


@triton_act_only_decode.register_fake
def _act_only_fake(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    threshold: float,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight_t.shape[1])
