"""The GPU dispatch op picks the decode or many-token kernel inside the op and matches the
reference either way (kernel bodies run in Triton's interpreter without a GPU)."""

from __future__ import annotations

import pytest
import torch

from vllm_duogpt.kernels import triton_act_only, triton_decode, triton_linear, triton_prefill
from vllm_duogpt.kernels.gpu_layout import pack_gpu_weight
from vllm_duogpt.kernels.reference import dual_sparse_linear_reference
from vllm_duogpt.kernels.triton_decode import MAX_DECODE_TOKENS
from vllm_duogpt.kernels.triton_decode import unavailable_reason as decode_unavailable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("tokens", [1, MAX_DECODE_TOKENS, MAX_DECODE_TOKENS + 9])
def test_dispatch_matches_reference(tokens):
    reason = decode_unavailable(DEVICE, torch.float16)
    if reason is not None:
        pytest.skip(reason)
    gen = torch.Generator().manual_seed(tokens)
    weight = torch.randn(40, 24, generator=gen)
    weight[torch.rand(40, 24, generator=gen) < 0.5] = 0
    weight = weight.half().to(DEVICE)
    x = torch.randn(tokens, 24, generator=gen).half().to(DEVICE)
    bias = torch.randn(40, generator=gen).half().to(DEVICE)
    tau = float(x.abs().float().quantile(0.5))
    packed = pack_gpu_weight(weight, tile_n=32)
    out = torch.ops.duogpt.triton_dual_sparse_linear(
        x, packed.values, packed.bitmap, packed.offsets, packed.n, tau, bias
    )
    ref = dual_sparse_linear_reference(x.float(), weight.float(), tau, bias.float())
    assert not torch.isnan(out).any()
    err = (out.float() - ref).abs().mean() / ref.abs().mean()
    assert err < 2e-3


def test_not_available_on_cpu_device():
    assert "not a CUDA GPU" in triton_linear.unavailable_reason(torch.device("cpu"), torch.half)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64])
def test_activation_dtype_is_refused_by_name(dtype):
    for kernel in (triton_act_only, triton_decode, triton_prefill):
        reason = kernel.unavailable_reason(torch.device("cuda"), dtype)
        assert reason == f"dtype {dtype} is not one of float16, bfloat16, float32"
