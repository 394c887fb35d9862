"""The CPU dual-sparse kernel and its layout against the torch reference.

The oracle is ``dual_sparse_linear_reference`` applied to the weight the layout actually holds
(``unpack_cpu_weight``: the checkpoint values rounded once to 16 bits). Every ISA path the machine
has (scalar, AVX2, AVX-512) runs over a named table of shapes, weight sparsities {0.5, 0.7},
activation sparsities {0, 0.5, 0.9, 1.0}, token counts {1, 3, 64}, 1 and 2 threads and both ways
of reading the runs (``READS``: a prefetch cursor, or streams side by side), and on AVX-512 both
ways of widening 16-bit values (``WIDENINGS``, named after their bf16 step); the 50%
case packs a float32 weight (bf16 values), the 70% case an fp16 checkpoint (fp16 values). 64
tokens take the GEMM path on AVX2 and scalar, the decode path on AVX-512; a separate test forces
each path for every token count. The first run builds the extension (20-30 s), later runs load
it from the cache.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from functools import cache

import pytest
import torch

from vllm_duogpt.kernels import cpu_kernel
from vllm_duogpt.kernels.cpu_kernel import (
    ISA_LEVELS,
    READS,
    WIDENINGS,
    cap_cpu_kernel_isa,
    cpu_dense16_linear,
    cpu_dual_sparse_linear,
    cpu_kernel_available,
    set_cpu_reads,
    set_cpu_widening,
)
from vllm_duogpt.kernels.cpu_layout import (
    CpuSparseWeight,
    choose_value_dtype,
    pack_cpu_weight,
    unpack_cpu_weight,
)
from vllm_duogpt.kernels.reference import dual_sparse_linear_reference

SHAPES = {  # name: (out_features N, in_features K)
    "1x7": (1, 7),
    "13x37": (13, 37),
    "100x257": (100, 257),
    "256x1000": (256, 1000),
    "llama-ish 512x1376": (512, 1376),
}
# weight sparsity -> checkpoint dtype: covers both 16-bit decoders without doubling the table
# (0: nothing pruned, stored without bitmaps)
WEIGHT_CASES = {0.0: torch.bfloat16, 0.5: torch.float32, 0.7: torch.float16}
ACT_SPARSITY = (0.0, 0.5, 0.9, 1.0)
TOKENS = (1, 3, 64)
THREADS = (1, 2)
TOLERANCE = 2e-6  # fp32 accumulation in another order than the reference's

AVAILABLE, REASON = cpu_kernel_available()
needs_kernel = pytest.mark.skipif(not AVAILABLE, reason=REASON)


def scale_free_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``|y - ref|.mean() / |ref|.mean()``; NaN (which fails every ``<=``) on any NaN."""
    if torch.isnan(y).any() or torch.isnan(ref).any():
        return float("nan")
    return float((y - ref).abs().mean() / ref.abs().mean().clamp_min(1e-30))


def masked_weight(n: int, k: int, sparsity: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    return w * (torch.rand(n, k, generator=gen) >= sparsity)


def threshold_for(x: torch.Tensor, sparsity: float) -> float:
    """The ``|x|`` quantile that drops a fraction ``sparsity`` of ``x`` (above the max for 1)."""
    if sparsity == 0.0:
        return 0.0
    if sparsity == 1.0:
        return float(x.abs().max()) * 2 + 1
    return float(torch.quantile(x.abs().flatten(), sparsity))


@cache
def packed_case(name: str, sparsity: float) -> tuple[CpuSparseWeight, torch.Tensor]:
    n, k = SHAPES[name]
    weight = masked_weight(n, k, sparsity, seed=n * 7919 + k).to(WEIGHT_CASES[sparsity])
    # small panels of two segments: the larger shapes span several, as real layers do with the
    # default 4096 / 2048 (one token reads whole runs, several tokens a segment at a time)
    packed = pack_cpu_weight(weight, panel_rows=256, segment_rows=128)
    return packed, unpack_cpu_weight(packed).float()


@pytest.fixture
def kernel_config() -> Iterator[None]:
    """Restore the kernel's ISA cap, prefill crossover, reads, widening and torch's thread count
    after a test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.ops.duogpt.cpu_kernel_config(2, -2, -2, -2)  # all ISAs, measured crossover, CPU's ways


def supported_isas() -> list[str]:
    detected = cpu_kernel_available()[1].split("detected=")[1].split()[0] if AVAILABLE else ""
    return [name for name, level in ISA_LEVELS.items() if level <= ISA_LEVELS.get(detected, 0)]


# ---------------------------------------------------------------- layout


@pytest.mark.parametrize("panel_rows, segment_rows", [(64, 64), (256, 64), (4096, 2048)])
@pytest.mark.parametrize("name", list(SHAPES))
def test_round_trip_is_exact(name: str, panel_rows: int, segment_rows: int) -> None:
    n, k = SHAPES[name]
    for dtype in (torch.bfloat16, torch.float16):
        weight = masked_weight(n, k, 0.5, seed=1).to(dtype)
        packed = pack_cpu_weight(weight, panel_rows=panel_rows, segment_rows=segment_rows)
        assert packed.value_dtype == dtype
        assert packed.offsets.numel() == packed.n_panels * k * panel_rows // segment_rows + 1
        assert torch.equal(unpack_cpu_weight(packed), weight)


def test_layout_words_by_hand() -> None:
    # one channel of 192 rows: segments of two blocks (128 rows), so segment 0 holds blocks 0-1
    # and segment 1 block 2 alone; kept rows 0 | 65, 127 | 131, each worth its row number + 1
    weight = torch.zeros(192, 1)
    for row in (0, 65, 127, 131):
        weight[row, 0] = row + 1
    packed = pack_cpu_weight(weight, panel_rows=256, segment_rows=128)

    def bf16(v: float) -> int:
        return int(torch.tensor(v).bfloat16().view(torch.int16))

    # each block: its bitmap (4 words, row r of the block is bit r), then its kept values
    expected = [1, 0, 0, 0, bf16(1), 2, 0, 0, -(2**15), bf16(66), bf16(128)]  # segment 0
    expected += [8, 0, 0, 0, bf16(132)]  # segment 1
    assert packed.offsets.tolist() == [0, 11, 16]
    assert packed.data[:16].tolist() == expected
    assert torch.equal(unpack_cpu_weight(packed), weight.bfloat16())


def test_value_dtype_choice() -> None:
    weight = torch.randn(8, 8)
    assert choose_value_dtype(weight) == torch.bfloat16
    assert choose_value_dtype(weight.half()) == torch.float16
    assert choose_value_dtype(weight.bfloat16()) == torch.bfloat16
    assert torch.equal(unpack_cpu_weight(pack_cpu_weight(weight)), weight.bfloat16())
    forced = pack_cpu_weight(weight, value_dtype=torch.float16)
    assert torch.equal(unpack_cpu_weight(forced), weight.half())


def test_bytes_per_weight_at_half_sparsity() -> None:
    weight = masked_weight(4096, 1024, 0.5, seed=2)  # one default panel of two segments
    packed = pack_cpu_weight(weight)
    # values 1.0 + bitmap 0.125 + offsets 8/2048 per weight (docstring of cpu_layout)
    assert packed.bytes_per_weight == pytest.approx(1.0 + 0.125 + 8 / 2048, abs=0.01)


def test_nearly_dense_weight_is_stored_without_bitmaps() -> None:
    """From 15/16 kept entries on, runs hold every row's value, zeros included."""
    gen = torch.Generator().manual_seed(5)
    for zeros, bitmaps in ((0.0, False), (0.05, False), (0.1, True)):
        weight = torch.randn(200, 96, generator=gen)
        weight *= torch.rand(200, 96, generator=gen) >= zeros
        packed = pack_cpu_weight(weight.half(), panel_rows=128)
        assert packed.bitmaps == bitmaps, zeros
        assert torch.equal(unpack_cpu_weight(packed), weight.half())
    # bitmap-free: 2 bytes per row, rows padded to whole 64-row blocks, plus the offsets
    dense = pack_cpu_weight(torch.randn(4096, 1024))
    assert not dense.bitmaps
    assert dense.bytes_per_weight == pytest.approx(2 + 8 / 2048, abs=0.01)


@pytest.mark.parametrize("weight_sparsity", [0.0, 0.5])
def test_pack_rejects_bad_input(weight_sparsity: float) -> None:
    with pytest.raises(ValueError, match="2-D float"):
        pack_cpu_weight(torch.ones(4, dtype=torch.float32))
    with pytest.raises(ValueError, match="multiple of 64"):
        pack_cpu_weight(torch.ones(4, 4), panel_rows=100)
    for segment_rows in (0, 96, 192):  # not a multiple of 64 / does not divide 256
        with pytest.raises(ValueError, match="segment_rows"):
            pack_cpu_weight(torch.ones(4, 4), panel_rows=256, segment_rows=segment_rows)
    packed = pack_cpu_weight(masked_weight(200, 4, weight_sparsity, seed=6), panel_rows=64)
    offsets = packed.offsets.clone()
    offsets[5] += 1  # panel 1, channel 1
    with pytest.raises(ValueError, match="disagree"):
        unpack_cpu_weight(dataclasses.replace(packed, offsets=offsets))
    packed = pack_cpu_weight(
        masked_weight(200, 4, weight_sparsity, seed=6), panel_rows=128, segment_rows=64
    )
    offsets = packed.offsets.clone()
    offsets[3] += 1  # panel 0, channel 1, segment 1: the run's start and end stay right
    with pytest.raises(ValueError, match="segment 1 starts disagree"):
        unpack_cpu_weight(dataclasses.replace(packed, offsets=offsets))


# ---------------------------------------------------------------- kernel vs reference


@needs_kernel
def test_isa_cap_names_the_path_it_runs(kernel_config) -> None:
    for isa in supported_isas():
        assert cap_cpu_kernel_isa(isa).startswith(f"isa={isa} ")
    with pytest.raises(ValueError, match="unknown ISA 'sse2'"):
        cap_cpu_kernel_isa("sse2")
    missing = [isa for isa in ISA_LEVELS if isa not in supported_isas()]
    for isa in missing:  # a path above this CPU's: refused, not silently run lower
        with pytest.raises(ValueError, match=f"cannot run the {isa} path"):
            cap_cpu_kernel_isa(isa)


@needs_kernel
@pytest.mark.parametrize(
    ("setting", "setter", "choices"),
    [("reads", set_cpu_reads, READS), ("widening", set_cpu_widening, WIDENINGS)],
)
def test_decode_settings_name_the_way_they_run(setting, setter, choices, kernel_config) -> None:
    def chosen(config: str) -> str:
        return config.split(f" {setting}=")[1].split()[0]

    default = chosen(setter(None))
    assert default in choices
    for name in choices:
        assert chosen(setter(name)) == name
    assert chosen(setter(None)) == default
    with pytest.raises(ValueError, match=f"unknown {setting} 'random'"):
        setter("random")


# Every ISA path, and the AVX-512 one with each widening (only it widens by shifts).
ISA_WIDENINGS = [(isa, "unpack") for isa in ISA_LEVELS] + [("avx512", "shift")]


@needs_kernel
@pytest.mark.parametrize("reads", list(READS))
@pytest.mark.parametrize(("isa", "widening"), ISA_WIDENINGS)
@pytest.mark.parametrize("weight_sparsity", list(WEIGHT_CASES))
@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_reference(
    name: str, weight_sparsity: float, isa: str, reads: str, widening: str, kernel_config
) -> None:
    if isa not in supported_isas():
        pytest.skip(f"this CPU has no {isa}")
    cap_cpu_kernel_isa(isa)
    set_cpu_reads(reads)
    set_cpu_widening(widening)
    packed, weight = packed_case(name, weight_sparsity)
    assert packed.bitmaps == (weight_sparsity > 0)
    n, k = SHAPES[name]
    gen = torch.Generator().manual_seed(3)
    for tokens in TOKENS:
        x = torch.randn(tokens, k, generator=gen)
        bias = torch.randn(n, generator=gen) if tokens != 3 else None
        for act_sparsity in ACT_SPARSITY:
            tau = threshold_for(x, act_sparsity)
            ref = dual_sparse_linear_reference(x, weight, tau, bias)
            for threads in THREADS:
                torch.set_num_threads(threads)
                y = cpu_dual_sparse_linear(x, packed, tau, bias)
                err = scale_free_error(y, ref)
                assert y.shape == ref.shape
                assert err <= TOLERANCE, (
                    f"{name} W{weight_sparsity} X{act_sparsity} M={tokens} threads={threads} "
                    f"{isa} {reads} {widening}: error {err}"
                )


@needs_kernel
@pytest.mark.parametrize("crossover", [0, 10**9], ids=["prefill", "decode"])
def test_widenings_give_the_same_floats(crossover: int, kernel_config) -> None:
    """The widenings only place rows in other lanes or convert them in another order: every row
    sums the same products in the same order, so the outputs are equal bit for bit (bf16 values
    with and without bitmaps, fp16 values)."""
    torch.ops.duogpt.cpu_kernel_config(-1, crossover, -1, -1)
    for weight_sparsity in WEIGHT_CASES:
        packed, _ = packed_case("llama-ish 512x1376", weight_sparsity)
        for tokens in (1, 3, 64):
            x = torch.randn(tokens, 1376, generator=torch.Generator().manual_seed(tokens))
            tau = threshold_for(x, 0.5)
            outputs = []
            for widening in WIDENINGS:
                set_cpu_widening(widening)
                outputs.append(cpu_dual_sparse_linear(x, packed, tau))
            assert torch.equal(outputs[0], outputs[1]), (weight_sparsity, tokens)


@needs_kernel
@pytest.mark.parametrize("widening", list(WIDENINGS))
@pytest.mark.parametrize("crossover", [0, 10**9])
def test_decode_and_prefill_paths_agree(crossover: int, widening: str, kernel_config) -> None:
    """Every token count through the decode path, and through the GEMM path, either way of
    widening."""
    torch.ops.duogpt.cpu_kernel_config(-1, crossover, -1, WIDENINGS[widening])
    packed, weight = packed_case("llama-ish 512x1376", 0.5)
    for tokens in (1, 2, 17, 64):
        x = torch.randn(tokens, 1376)
        tau = threshold_for(x, 0.5)
        err = scale_free_error(
            cpu_dual_sparse_linear(x, packed, tau), dual_sparse_linear_reference(x, weight, tau)
        )
        assert err <= TOLERANCE, f"M={tokens} crossover={crossover} {widening}: error {err}"


@needs_kernel
@pytest.mark.parametrize("isa", list(ISA_LEVELS))
def test_prefill_walks_the_slices_of_large_panels(isa: str, kernel_config) -> None:
    """Prefill multiplies 256-row slices: panels of 640 rows take three (256, 256, 128), each
    channel's cursor carrying on where the last slice stopped, and a last panel of 60 rows takes
    a partial one."""
    if isa not in supported_isas():
        pytest.skip(f"this CPU has no {isa}")
    torch.ops.duogpt.cpu_kernel_config(ISA_LEVELS[isa], 0, -1, -1)
    weight = masked_weight(700, 300, 0.5, seed=5)
    packed = pack_cpu_weight(weight, panel_rows=640)
    weight = unpack_cpu_weight(packed).float()
    gen = torch.Generator().manual_seed(6)
    x, bias = torch.randn(9, 300, generator=gen), torch.randn(700, generator=gen)
    tau = threshold_for(x, 0.5)
    ref = dual_sparse_linear_reference(x, weight, tau, bias)
    for threads in THREADS:
        torch.set_num_threads(threads)
        err = scale_free_error(cpu_dual_sparse_linear(x, packed, tau, bias), ref)
        assert err <= TOLERANCE, f"{isa} threads={threads}: error {err}"


@needs_kernel
@pytest.mark.parametrize("crossover", [0, 10**9])
def test_threads_under_inference_mode(crossover: int, kernel_config) -> None:
    """vLLM runs the model under torch.inference_mode with a thread per core: the kernel's worker
    threads (both paths, dense 16-bit too) must handle the inference tensors they get."""
    torch.set_num_threads(2)
    torch.ops.duogpt.cpu_kernel_config(-1, crossover, -1, -1)
    packed, weight = packed_case("llama-ish 512x1376", 0.5)
    x, bias = torch.randn(64, 1376), torch.randn(512)
    tau = threshold_for(x, 0.5)
    with torch.inference_mode():
        y = cpu_dual_sparse_linear(x, packed, tau, bias)
        dense = torch.ops.duogpt.cpu_dense16_linear(x, weight.half(), bias)
    assert scale_free_error(y, dual_sparse_linear_reference(x, weight, tau, bias)) <= TOLERANCE
    assert scale_free_error(dense, x @ weight.half().float().T + bias) <= TOLERANCE


@needs_kernel
@pytest.mark.parametrize("reads", list(READS))
@pytest.mark.parametrize("weight_sparsity", [0.0, 0.5])
def test_inactive_channels_are_never_read(
    weight_sparsity: float, reads: str, kernel_config
) -> None:
    """Poison the runs of channels whose activation is zero: the output must not notice."""
    set_cpu_reads(reads)
    n, k = 300, 64
    weight = masked_weight(n, k, weight_sparsity, seed=4).half()
    packed = pack_cpu_weight(weight, panel_rows=128, segment_rows=64)  # 3 panels of 2 segments
    x = torch.randn(2, k)
    x[:, ::2] = 0.0  # even channels inactive for both tokens
    data = packed.data.clone()
    nan_bits = torch.tensor(0x7E00, dtype=torch.int16)  # fp16 NaN, and a bitmap with bits set
    seg = packed.n_segments
    for panel in range(packed.n_panels):
        for channel in range(0, k, 2):
            run = panel * k + channel
            data[packed.offsets[run * seg] : packed.offsets[(run + 1) * seg]] = nan_bits
    poisoned = dataclasses.replace(packed, data=data)
    for tokens in (1, 2):  # whole runs, then a segment at a time
        ref = dual_sparse_linear_reference(x[:tokens], weight.float(), 0.0)
        y = cpu_dual_sparse_linear(x[:tokens], poisoned, 0.0)
        assert scale_free_error(y, ref) <= TOLERANCE, tokens


@needs_kernel
@pytest.mark.parametrize("crossover", [10**9, 0], ids=["decode", "prefill"])
def test_nan_activation_reaches_the_rows_that_keep_its_channel(
    crossover: int, kernel_config
) -> None:
    torch.ops.duogpt.cpu_kernel_config(-1, crossover, -1, -1)
    packed, weight = packed_case("100x257", 0.5)
    x = torch.randn(1, 257)
    x[0, 5] = float("nan")
    y = cpu_dual_sparse_linear(x, packed, 0.1)
    # never silently dropped; SIMD paths also spread it to pruned rows (0 * NaN), like torch
    assert torch.isnan(y[0, weight[:, 5] != 0]).all()


@needs_kernel
def test_leading_dims_and_dtypes() -> None:
    packed, weight = packed_case("13x37", 0.5)
    x = torch.randn(2, 3, 37, dtype=torch.bfloat16)
    y = cpu_dual_sparse_linear(x, packed, 0.3, torch.ones(13, dtype=torch.bfloat16))
    ref = dual_sparse_linear_reference(x.float(), weight, 0.3, torch.ones(13)).to(torch.bfloat16)
    assert y.shape == (2, 3, 13) and y.dtype == torch.bfloat16
    assert scale_free_error(y.float(), ref.float()) <= 1e-2
    with pytest.raises(ValueError, match="does not match"):
        cpu_dual_sparse_linear(torch.randn(1, 36), packed, 0.3)


@needs_kernel
def test_op_traces_under_torch_compile() -> None:
    packed, weight = packed_case("256x1000", 0.5)
    x = torch.randn(3, 1000)
    bias = torch.randn(256)
    op = torch.ops.duogpt.cpu_dual_sparse_linear.default
    args = (
        x,
        packed.data,
        packed.offsets,
        256,
        packed.panel_rows,
        packed.value_kind,
        True,
        0.5,
        bias,
    )
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))

    def layer(inp: torch.Tensor) -> torch.Tensor:
        return torch.relu(cpu_dual_sparse_linear(inp, packed, 0.5, bias))

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    ref = torch.relu(dual_sparse_linear_reference(x, weight, 0.5, bias))
    assert scale_free_error(compiled(x), ref) <= TOLERANCE


@needs_kernel
@pytest.mark.parametrize("isa", list(ISA_LEVELS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense16_linear_matches_torch(dtype: torch.dtype, isa: str, kernel_config) -> None:
    """The dense 16-bit product (benchmark baseline, 16-bit lm_head) against torch in fp32.

    37 rows and K = 1001 leave remainders after the 4-row groups and the 16-wide vectors; the
    token counts cover one token, a 4-token tile, and tiles plus leftovers.
    """
    if isa not in supported_isas():
        pytest.skip(f"this CPU has no {isa}")
    cap_cpu_kernel_isa(isa)
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(37, 1001, generator=gen).to(dtype)
    bias = torch.randn(37, generator=gen)
    for tokens in (1, 4, 11):
        x = torch.randn(tokens, 1001, generator=gen)
        for threads in THREADS:
            torch.set_num_threads(threads)
            y = torch.ops.duogpt.cpu_dense16_linear(x, weight, None)
            assert scale_free_error(y, x @ weight.float().T) <= TOLERANCE, (tokens, threads)
            y = torch.ops.duogpt.cpu_dense16_linear(x, weight, bias)
            assert scale_free_error(y, x @ weight.float().T + bias) <= TOLERANCE, (tokens, threads)


@pytest.mark.parametrize("available", [True, False])
def test_dense16_wrapper_keeps_shape_and_dtype(available: bool, monkeypatch) -> None:
    """The Python entry (the 16-bit lm_head's): [..., K] in any float dtype, kernel or fallback."""
    if available and not AVAILABLE:
        pytest.skip(REASON)
    monkeypatch.setattr(cpu_kernel, "_status", (available, "test" if available else "no compiler"))
    monkeypatch.setattr(cpu_kernel, "_warned", False)
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(37, 101, generator=gen).half()
    x = torch.randn(2, 3, 101, generator=gen).bfloat16()
    bias = torch.randn(37, generator=gen).bfloat16()
    y = cpu_dense16_linear(x, weight, bias)
    assert y.shape == (2, 3, 37) and y.dtype == torch.bfloat16
    ref = x.float() @ weight.float().T + bias.float()
    assert scale_free_error(y.float(), ref) <= 1e-2  # the result is rounded to bf16
    with pytest.raises(ValueError, match="K=101"):
        cpu_dense16_linear(torch.randn(2, 100), weight)


def test_fallback_warns_once_and_matches(monkeypatch, caplog) -> None:
    monkeypatch.setattr(cpu_kernel, "_status", (False, "CPU kernel build failed: no compiler"))
    monkeypatch.setattr(cpu_kernel, "_warned", False)
    packed, weight = packed_case("13x37", 0.7)
    x = torch.randn(3, 37)
    with caplog.at_level(logging.WARNING, logger=cpu_kernel.__name__):
        first = cpu_dual_sparse_linear(x, packed, 0.5)
        cpu_dual_sparse_linear(x, packed, 0.5)
    assert [r.message for r in caplog.records if "no compiler" in r.message] != []
    assert len(caplog.records) == 1
    assert torch.equal(first, dual_sparse_linear_reference(x, weight, 0.5))
