"""Triton kernels vs the torch reference, over a named table of small odd shapes.

Without a GPU the kernel bodies run in Triton's CPU interpreter. Triton decides interpreter
mode when ``@triton.jit`` decorates a kernel, i.e. when the kernel modules are imported, so
this module sets ``TRITON_INTERPRET=1`` before importing them. On a GPU host the same table
runs compiled, and the ``gpu`` tests add LLaMA shapes, CUDA graphs and torch.compile.

The oracle is ``dual_sparse_linear_reference`` in fp32 on the activations sparsified in their
own dtype (``sparsify_activations``): the kernels must keep exactly the same channels and
differ only by fp32 summation order and the final rounding. The interpreter converts fp32 to
bf16 by truncation, hence the looser bf16 tolerance.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from vllm_duogpt.kernels import (  # noqa: E402
    triton_act_only,
    triton_decode,
    triton_prefill,
    triton_unpack,
)
from vllm_duogpt.kernels.gpu_layout import (  # noqa: E402
    GpuSparseWeight,
    pack_gpu_weight,
    unpack_gpu_weight,
)
from vllm_duogpt.kernels.reference import (  # noqa: E402
    dual_sparse_linear_reference,
    sparsify_activations,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2, torch.float32: 1e-5}

# name: (N, K). "narrow" has fewer channels than one interpreter chunk (an idle split-K
# program) and is packed in 32-row tiles; "odd" crosses a 128-row tile; "wide" spans several
# chunks per program.
SHAPES = {"narrow": (70, 13), "odd": (129, 45), "wide": (33, 150)}
TILE_N = {"narrow": 32, "odd": 128, "wide": 128}
ACT_SPARSITY = (0.0, 0.5, 0.9, 1.0)
WEIGHT_SPARSITY = (0.5, 0.7)
DTYPES = (torch.float16, torch.bfloat16)
TOKENS = (1, 3, 16)


def _cases() -> list:
    cases = []
    grid = [
        (s, t, a, w, d)
        for s in SHAPES
        for t in TOKENS
        for a in ACT_SPARSITY
        for w in WEIGHT_SPARSITY
        for d in DTYPES
    ]
    for seed, (shape, tokens, act, ws, dtype) in enumerate(grid):
        name = f"{shape}-m{tokens}-x{act}-w{ws}-{str(dtype)[6:]}"
        cases.append(pytest.param(shape, tokens, act, ws, dtype, seed, id=name))
    return cases


@pytest.fixture(autouse=True)
def _kernels_runnable() -> None:
    reason = triton_decode.unavailable_reason(DEVICE, torch.float16)
    if reason is not None:
        pytest.skip(f"Triton kernels cannot run here: {reason}")


def _masked_weight(n: int, k: int, sparsity: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random pruned weight whose per-column density varies (as in DuoGPT masks)."""
    gen = torch.Generator().manual_seed(seed)
    column_keep = (1 - sparsity) * torch.empty(k).uniform_(0.3, 1.7, generator=gen)
    keep = torch.rand(n, k, generator=gen) < column_keep.clamp(max=1.0)
    return (torch.randn(n, k, generator=gen) * keep).to(dtype)


def _activations(
    m: int, k: int, sparsity: float, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, float]:
    """Activations and the threshold that drops ``sparsity`` of their entries."""
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    if sparsity >= 1.0:
        return x, float("inf")
    threshold = torch.quantile(x.abs().float().flatten(), sparsity).item() if sparsity else 0.0
    return x, threshold


def _oracle(
    x: torch.Tensor, weight: torch.Tensor, threshold: float, bias: torch.Tensor | None
) -> torch.Tensor:
    sparse = sparsify_activations(x, threshold).float()
    return dual_sparse_linear_reference(
        sparse, weight.float(), 0.0, None if bias is None else bias.float()
    )


def _scale_free_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``mean|y - ref| / mean|ref|``; a NaN anywhere fails, an all-zero reference needs zeros."""
    assert y.shape == ref.shape, f"{tuple(y.shape)} vs {tuple(ref.shape)}"
    assert not torch.isnan(y).any(), "NaN in the kernel output"
    diff = (y.float().cpu() - ref.cpu()).abs()
    scale = ref.abs().mean().item()
    return diff.max().item() if scale == 0 else diff.mean().item() / scale


def _run_all(
    x: torch.Tensor,
    packed: GpuSparseWeight,
    dense: torch.Tensor,
    threshold: float,
    bias: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Every kernel that accepts this token count, by name."""
    outs = {"prefill": triton_prefill.dual_sparse_prefill(x, packed, threshold, bias)}
    if x.shape[0] <= triton_decode.MAX_DECODE_TOKENS:
        outs["decode"] = triton_decode.dual_sparse_decode(x, packed, threshold, bias)
    if x.shape[0] <= triton_act_only.MAX_ACT_ONLY_TOKENS:
        weight_t = triton_act_only.act_only_weight(dense)
        outs["act_only"] = triton_act_only.triton_act_only_decode(x, weight_t, threshold, bias)
    return outs


@pytest.mark.parametrize("shape, tokens, act, ws, dtype, seed", _cases())
def test_kernels_match_reference(
    shape: str, tokens: int, act: float, ws: float, dtype: torch.dtype, seed: int
) -> None:
    n, k = SHAPES[shape]
    weight = _masked_weight(n, k, ws, dtype, seed)
    x, threshold = _activations(tokens, k, act, dtype, seed)
    bias = torch.randn(n).to(dtype) if seed % 2 else None
    ref = _oracle(x, weight, threshold, bias)
    packed = pack_gpu_weight(weight.to(DEVICE), tile_n=TILE_N[shape])
    bias = None if bias is None else bias.to(DEVICE)
    for name, y in _run_all(x.to(DEVICE), packed, weight.to(DEVICE), threshold, bias).items():
        assert y.dtype == dtype and y.is_contiguous(), name
        error = _scale_free_error(y, ref)
        assert error <= TOLERANCE[dtype], f"{name}: scale-free error {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tile_n", [32, 128])
@pytest.mark.parametrize("n, k", [(1, 1), (31, 7), (129, 45), (64, 3)])
def test_pack_round_trip_is_exact(n: int, k: int, tile_n: int, dtype: torch.dtype) -> None:
    weight = _masked_weight(n, k, 0.5, dtype, seed=n * k)
    weight[:, 0] = 0  # an empty slot in every tile
    if n > 32:
        weight[31, :] = 1.5  # bit 31 of the first word: the int32 sign bit
    packed = pack_gpu_weight(weight, tile_n=tile_n)
    assert packed.nnz == int((weight != 0).sum())
    assert packed.bitmap.shape == (-(-n // tile_n), k, tile_n // 32)
    assert torch.equal(unpack_gpu_weight(packed), weight)


def test_pack_fully_pruned_and_dense() -> None:
    for weight in (torch.zeros(40, 9), torch.randn(40, 9).abs() + 0.1):
        packed = pack_gpu_weight(weight)
        assert packed.nnz == int((weight != 0).sum())
        assert torch.equal(unpack_gpu_weight(packed), weight)


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        pack_gpu_weight(torch.ones(4))
    with pytest.raises(ValueError, match="power of two"):
        pack_gpu_weight(torch.ones(4, 4), tile_n=48)


def test_layout_bytes_per_weight_at_half_sparsity() -> None:
    """The module docstring's byte arithmetic: 1.156 B/weight stored, 0.594 read at X50."""
    n, k = 512, 1024
    weight = torch.randn(n, k, dtype=torch.float16)
    weight[torch.rand(n, k) < 0.5] = 0
    packed = pack_gpu_weight(weight)
    assert packed.nbytes() / (n * k) == pytest.approx(1.156, abs=0.01)
    active = torch.rand(k) < 0.5
    read = packed.bytes_read(active) / (n * k)
    assert read == pytest.approx(0.594 * active.float().mean().item() / 0.5, abs=0.02)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unpack_kernel_is_exact(dtype: torch.dtype) -> None:
    weight = _masked_weight(129, 45, 0.6, dtype, seed=13)
    packed = pack_gpu_weight(weight.to(DEVICE))
    dense_t = triton_unpack.triton_unpack_transposed(
        packed.values, packed.bitmap, packed.offsets, packed.n
    )
    assert torch.equal(dense_t.cpu(), weight.t())


def test_many_tokens_take_the_unpack_path() -> None:
    """Above FUSED_MAX_TOKENS the many-token op decodes once to dense and uses a GEMM."""
    dtype, tokens = torch.bfloat16, triton_prefill.FUSED_MAX_TOKENS + 1
    weight = _masked_weight(70, 40, 0.5, dtype, seed=17)
    x, threshold = _activations(tokens, 40, 0.5, dtype, seed=17)
    bias = torch.randn(70).to(dtype)
    ref = _oracle(x, weight, threshold, bias)
    packed = pack_gpu_weight(weight.to(DEVICE))
    y = triton_prefill.dual_sparse_prefill(x.to(DEVICE), packed, threshold, bias.to(DEVICE))
    assert _scale_free_error(y, ref) <= TOLERANCE[dtype]


def test_fused_partitions_match_separate_layers() -> None:
    """qkv-style fusion: one packed matrix with N = sum of partitions, one input and threshold."""
    dtype, k = torch.float16, 40
    parts = [_masked_weight(n, k, 0.6, dtype, seed=n) for n in (64, 24, 24)]
    x, threshold = _activations(2, k, 0.5, dtype, seed=3)
    packed = pack_gpu_weight(torch.cat(parts).to(DEVICE))
    fused = triton_decode.dual_sparse_decode(x.to(DEVICE), packed, threshold)
    separate = torch.cat([_oracle(x, part, threshold, None) for part in parts], dim=1)
    assert _scale_free_error(fused, separate) <= TOLERANCE[dtype]


def test_threshold_is_rounded_like_the_reference() -> None:
    """A threshold between two bf16 numbers keeps the entry equal to its rounded value."""
    dtype = torch.bfloat16
    weight = _masked_weight(40, 20, 0.5, dtype, seed=5)
    x = torch.full((1, 20), 1.0, dtype=dtype)
    threshold = 1.001  # rounds to 1.0 in bf16, so |x| < threshold is False everywhere
    ref = dual_sparse_linear_reference(x.float(), weight.float(), 0.0)
    packed = pack_gpu_weight(weight.to(DEVICE))
    y = triton_decode.dual_sparse_decode(x.to(DEVICE), packed, threshold)
    assert _scale_free_error(y, ref) <= TOLERANCE[dtype]


def test_nan_activation_is_never_hidden() -> None:
    """A NaN in a kept channel reaches every output row that has a weight for it.

    The dense reference turns the whole row NaN (``NaN * 0``); a kernel that skips pruned
    weights may leave the other rows finite, and those must equal the product without it.
    """
    dtype = torch.float16
    weight = _masked_weight(40, 20, 0.5, dtype, seed=7)
    weight[:, 3] = 0
    weight[::2, 3] = 1.0  # channel 3 feeds the even rows only
    x, threshold = _activations(1, 20, 0.5, dtype, seed=7)
    x[0, 3] = float("nan")
    without = x.clone()
    without[0, 3] = 0
    ref = _oracle(without, weight, threshold, None)
    packed = pack_gpu_weight(weight.to(DEVICE))
    for name, y in _run_all(x.to(DEVICE), packed, weight.to(DEVICE), threshold, None).items():
        nan = torch.isnan(y).cpu()[0]
        assert nan[::2].all(), name
        finite = ~nan
        if finite.any():
            assert _scale_free_error(y.cpu()[:, finite], ref[:, finite]) <= TOLERANCE[dtype], name


def test_strided_input_and_empty_batch() -> None:
    dtype = torch.float16
    weight = _masked_weight(50, 30, 0.5, dtype, seed=9)
    wide, threshold = _activations(3, 60, 0.5, dtype, seed=9)
    x = wide[:, ::2]  # stride 2 along K
    ref = _oracle(x, weight, threshold, None)
    packed = pack_gpu_weight(weight.to(DEVICE))
    for name, y in _run_all(x.to(DEVICE), packed, weight.to(DEVICE), threshold, None).items():
        assert _scale_free_error(y, ref) <= TOLERANCE[dtype], name
    empty = torch.empty(0, 30, dtype=dtype, device=DEVICE)
    for y in _run_all(empty, packed, weight.to(DEVICE), threshold, None).values():
        assert y.shape == (0, 50)


def test_custom_ops_have_fake_implementations() -> None:
    dtype = torch.float16
    weight = _masked_weight(40, 20, 0.5, dtype, seed=11).to(DEVICE)
    packed = pack_gpu_weight(weight)
    x = torch.randn(2, 20, dtype=dtype, device=DEVICE)
    sparse_args = (x, packed.values, packed.bitmap, packed.offsets, packed.n, 0.5, None)
    ops = torch.ops.duogpt
    for op, args in (
        (ops.triton_dual_sparse_decode, sparse_args),
        (ops.triton_dual_sparse_prefill, sparse_args),
        (ops.triton_act_only_decode, (x, triton_act_only.act_only_weight(weight), 0.5, None)),
        (ops.triton_unpack_transposed, sparse_args[1:5]),
    ):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


# ---- GPU only: real shapes, CUDA graphs, torch.compile ---------------------------------------

LLAMA_SHAPES = {"o_proj": (4096, 4096), "k_proj": (1024, 4096), "down_proj": (4096, 14336)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", list(LLAMA_SHAPES))
@pytest.mark.parametrize("tokens", [1, 4, 16, 64])
def test_llama_shapes_on_gpu(shape: str, tokens: int) -> None:
    n, k = LLAMA_SHAPES[shape]
    weight = _masked_weight(n, k, 0.5, torch.bfloat16, seed=1).cuda()
    x, threshold = _activations(tokens, k, 0.5, torch.bfloat16, seed=1)
    x = x.cuda()
    ref = _oracle(x, weight, threshold, None)
    outs = _run_all(x, pack_gpu_weight(weight), weight, threshold, None)
    for name, y in outs.items():
        error = _scale_free_error(y, ref)
        assert error <= 8e-3, f"{name}: scale-free error {error:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_and_split_k_determinism() -> None:
    weight = _masked_weight(4096, 4096, 0.5, torch.bfloat16, seed=2).cuda()
    packed = pack_gpu_weight(weight)
    x, threshold = _activations(1, 4096, 0.5, torch.bfloat16, seed=2)
    x = x.cuda()
    eager = triton_decode.dual_sparse_decode(x, packed, threshold)  # also autotunes
    assert torch.equal(eager, triton_decode.dual_sparse_decode(x, packed, threshold))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = triton_decode.dual_sparse_decode(x, packed, threshold)
    x.copy_(-x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, -eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_compile_fullgraph() -> None:
    weight = _masked_weight(1024, 4096, 0.5, torch.float16, seed=3).cuda()
    packed = pack_gpu_weight(weight)

    def layer(x: torch.Tensor) -> torch.Tensor:
        return triton_decode.dual_sparse_decode(x, packed, 0.3) * 2

    x = torch.randn(2, 4096, dtype=torch.float16, device="cuda")
    compiled = torch.compile(layer, fullgraph=True)
    assert torch.equal(compiled(x), layer(x))
