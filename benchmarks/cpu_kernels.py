"""Batch-1 decode speed of the CPU dual-sparse kernel against dense baselines, one run, one table.

For each LLaMA-7B projection shape it times dense float32 ``torch.mv``, dense bf16 ``torch.mv``,
our dense 16-bit kernels (``torch.ops.duogpt.cpu_dense16_linear`` on the row-major weight, and,
``runs``, the dual-sparse kernel itself on the dense weight in its own layout with every channel
read: fair dense 16-bit baselines on CPUs where torch's bf16 mv does not stream at memory speed)
and the dual-sparse kernel at several weight / activation sparsities, and prints time, bytes per
second of the bytes each one has to read, and speed-ups over dense fp32 and over the fastest dense
16-bit kernel, all from the same run.
At batch 1 each sparse configuration also gets a ``read-only`` row: the same call's bytes (the
active channels' runs, split between threads as the kernel splits them) read in the kernel's
order with its software prefetch and no arithmetic (read_ceiling.py; ``--reads`` picks the way
both read, by default the CPU's): what fetching those bytes costs on this machine in that minute,
the yardstick for the kernel row above it (a yardstick, not a strict bound: the reader reads a
line at a time where the kernel reads blocks, and has come out behind the kernel by up to 15%).
With several tokens it also times dense fp32 through oneDNN as vLLM's CPU backend runs dense
linears (vLLM's prepacked ``onednn_mm`` where vLLM is installed), faster than torch's fp32 matmul
(MKL) on AMD CPUs; ``vs fp32`` then compares with the faster of the two.

Honest timing: every configuration cycles through enough copies of its weights (``--pool-mib``)
that they cannot sit in the last-level cache between calls, as a model's layers cannot; the
kernels of a shape are timed round-robin, so load from other processes hits them alike, and each
number is the median (and minimum) over ``--repeats`` calls. Ratios come from one run. Every
weight, the dense baselines' included, sits on huge pages where the system has them, as the
packed layout does (kernels/huge_pages.py): the ratios compare kernels, not page sizes.

Usage::

    python benchmarks/cpu_kernels.py --threads 2
    python benchmarks/cpu_kernels.py --tokens 4 --shapes 4096x4096
    python benchmarks/cpu_kernels.py --tokens 8 --values fp16 --shapes 2048x5632
    python benchmarks/cpu_kernels.py --threads 2 --panel-rows 2048,4096
    python benchmarks/cpu_kernels.py --threads 2 --reads cursor
    python benchmarks/cpu_kernels.py --threads 2 --widening unpack
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/cpu_kernels.py --isa avx2
    python benchmarks/cpu_kernels.py --threads 1 --tokens 512 --repeats 5 \
        --shapes 6144x2048 2048x5632
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from read_ceiling import RangeReader, active_channels, decode_ranges, decode_read

from vllm_duogpt.kernels.cpu_kernel import (
    ISA_LEVELS,
    READS,
    WIDENINGS,
    cap_cpu_kernel_isa,
    cpu_dual_sparse_linear,
    cpu_kernel_available,
    set_cpu_reads,
    set_cpu_widening,
)
from vllm_duogpt.kernels.cpu_layout import DEFAULT_PANEL_ROWS, CpuSparseWeight, pack_cpu_weight
from vllm_duogpt.kernels.huge_pages import to_huge_pages
from vllm_duogpt.kernels.reference import dual_sparse_linear_reference

LLAMA7B_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # (N, K): q/o, up/gate, down
SPARSITIES = ((0.5, 0.5), (0.5, 0.0), (0.0, 0.5), (0.7, 0.5))  # (weight, activation)
VALUE_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --values
VALUE_NAMES = {dtype: name for name, dtype in VALUE_TYPES.items()}


@dataclass
class Row:
    """One line of the table."""

    shape: str
    kernel: str
    seconds: float  # median
    best: float  # minimum
    bytes_read: float


def time_interleaved(
    kernels: dict[str, list[Callable[[], object]]], repeats: int
) -> dict[str, tuple[float, float]]:
    """Median and minimum seconds per call of every kernel, timed round-robin.

    Each kernel cycles through its own calls (one per weight copy). Round-robin rather than one
    kernel after the other, so that a burst of load from other processes hits all kernels alike
    and the ratios stay fair.
    """
    for calls in kernels.values():
        for call in calls:
            call()
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for i in range(repeats):
        for name, calls in kernels.items():
            call = calls[i % len(calls)]
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def n_copies(nbytes: int, pool_mib: int) -> int:
    """Copies of a weight needed to exceed the pool size, so calls miss the caches."""
    return max(2, math.ceil(pool_mib * 2**20 / nbytes))


def copies_of(packed: CpuSparseWeight, pool_mib: int) -> list[CpuSparseWeight]:
    """``packed`` and enough copies of it on huge pages to exceed the pool size."""
    return [packed] + [
        dataclasses.replace(packed, data=to_huge_pages(packed.data))
        for _ in range(n_copies(packed.nbytes, pool_mib) - 1)
    ]


def masked_weight(n: int, k: int, weight_sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """Random ``[n, k]`` weight with a fraction ``weight_sparsity`` of entries zeroed."""
    w = torch.randn(n, k, generator=gen) * 0.02
    return w * (torch.rand(n, k, generator=gen) >= weight_sparsity)


def threshold_for(x: torch.Tensor, act_sparsity: float) -> float:
    """The ``|x|`` quantile that zeroes a fraction ``act_sparsity`` of ``x``."""
    if act_sparsity <= 0:
        return 0.0
    return float(x.abs().flatten().kthvalue(max(1, int(act_sparsity * x.numel()))).values) * (
        1 + 1e-6
    )


def bytes_touched(packed: CpuSparseWeight, x: torch.Tensor, tau: float) -> float:
    """Bytes of the runs the decode kernel reads for the active channels of ``x``."""
    active = active_channels(x, tau)
    return float(packed.run_lengths()[:, active].sum()) * 2


def check_product(
    label: str, weight: torch.Tensor, packed: CpuSparseWeight, x: torch.Tensor, tau: float
) -> None:
    """Stop unless the kernel on this weight copy agrees with the torch reference: a timing of
    a wrong product (a copy that lost part of its layout, say) would be meaningless."""
    ref = dual_sparse_linear_reference(x, weight.to(packed.value_dtype).float(), tau)
    err = float((cpu_dual_sparse_linear(x, packed, tau) - ref).abs().max() / ref.abs().max())
    if not err <= 1e-4:
        raise SystemExit(f"{label}: the kernel disagrees with the reference (error {err:.2e})")


def onednn_fp32(
    weights: list[torch.Tensor], x: torch.Tensor
) -> tuple[str, list[Callable[[], object]]]:
    """Dense fp32 products through oneDNN, as vLLM's CPU backend runs its dense linears: vLLM's own
    ``onednn_mm`` on weights it has prepacked where vLLM is installed, else torch's oneDNN linear;
    no calls where neither exists. (torch's fp32 matmul is MKL's, slower on AMD CPUs.)"""
    try:
        from vllm import _custom_ops as vllm_ops

        if vllm_ops._supports_onednn:
            handles = [vllm_ops.create_onednn_mm(w.t(), 32) for w in weights]
            return "dense fp32 vLLM oneDNN", [
                lambda h=h: vllm_ops.onednn_mm(h, x, None) for h in handles
            ]
    except ImportError:
        pass
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "dense fp32 oneDNN", [
            lambda w=w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
            for w in weights
        ]
    return "", []


def bench_shape(
    n: int,
    k: int,
    tokens: int,
    repeats: int,
    pool_mib: int,
    gen: torch.Generator,
    reader: RangeReader | None,
    reads: str,
    panel_sizes: list[int],
    value_dtype: torch.dtype,
) -> list[Row]:
    """All kernels on one ``[n, k]`` shape; with a reader, the pure read of every sparse
    configuration's bytes too (batch 1), the way the kernel reads them (``reads``); each sparse
    configuration packed with each of ``panel_sizes`` (labelled ``pN`` when there are several)."""
    dense = masked_weight(n, k, 0.0, gen)
    x = torch.randn(tokens, k, generator=gen)
    x1, xb = x[0].contiguous(), x.bfloat16()
    kernels: dict[str, list[Callable[[], object]]] = {}
    bytes_read: dict[str, float] = {}

    # every row reads copies of its own: reading the bytes the row before it has just pulled into
    # the last-level cache would time the cache, not the memory
    def dense_copies(dtype: torch.dtype) -> list[torch.Tensor]:
        count = n_copies(n * k * dtype.itemsize, pool_mib)
        return [to_huge_pages(dense, dtype) for _ in range(count)]

    fp32 = dense_copies(torch.float32)
    kernels["dense fp32 torch"] = [
        lambda w=w: torch.matmul(x, w.t()) if tokens > 1 else torch.mv(w, x1) for w in fp32
    ]
    bytes_read["dense fp32 torch"] = n * k * 4
    kernels["dense bf16 torch"] = [
        lambda w=w: torch.matmul(xb, w.t()) for w in dense_copies(torch.bfloat16)
    ]
    bytes_read["dense bf16 torch"] = n * k * 2
    if tokens > 1:
        label, calls = onednn_fp32(dense_copies(torch.float32), x)
        if calls:
            kernels[label] = calls
            bytes_read[label] = n * k * 4
    if tokens == 1:
        kernels["dense bf16 ours"] = [
            lambda w=w: torch.ops.duogpt.cpu_dense16_linear(x[:1], w, None)
            for w in dense_copies(torch.bfloat16)
        ]
        bytes_read["dense bf16 ours"] = n * k * 2
        # the dense weight in the sparse kernel's own layout (no bitmaps), every channel read
        label = f"dense {VALUE_NAMES[value_dtype]} ours runs"
        runs = pack_cpu_weight(dense, panel_rows=DEFAULT_PANEL_ROWS, value_dtype=value_dtype)
        check_product(label, dense, runs, x[:1], 0.0)
        kernels[label] = [
            lambda p=p: cpu_dual_sparse_linear(x[:1], p, 0.0) for p in copies_of(runs, pool_mib)
        ]
        bytes_read[label] = n * k * 2

    for weight_sparsity, act_sparsity in SPARSITIES:
        weight = masked_weight(n, k, weight_sparsity, gen)
        for panel_rows in panel_sizes:
            packed = pack_cpu_weight(weight, panel_rows=panel_rows, value_dtype=value_dtype)
            pool = copies_of(packed, pool_mib)
            xs = [torch.randn(tokens, k, generator=gen) for _ in pool]
            taus = [threshold_for(xi, act_sparsity) for xi in xs]
            label = f"ours W{round(weight_sparsity * 100)}/X{round(act_sparsity * 100)}"
            if len(panel_sizes) > 1:
                label += f" p{panel_rows}"
            check_product(label, weight, pool[-1], xs[-1], taus[-1])
            kernels[label] = [
                lambda p=p, xi=xi, tau=tau: cpu_dual_sparse_linear(xi, p, tau)
                for p, xi, tau in zip(pool, xs, taus, strict=True)
            ]
            bytes_read[label] = bytes_touched(packed, xs[0], taus[0])
            if reader is not None:
                # copies of its own: reading the bytes the kernel call before it has just pulled
                # into the last-level cache would time the cache, not the memory
                ceiling = f"read-only {label.removeprefix('ours ')}"
                threads = torch.get_num_threads()
                copies = [
                    dataclasses.replace(packed, data=to_huge_pages(packed.data)) for _ in pool
                ]
                kernels[ceiling] = [
                    reader.reader(
                        decode_ranges(c, xi, tau, threads),
                        keep=c.data,
                        **decode_read(c, xi, tau, reads),
                    )
                    for c, xi, tau in zip(copies, xs, taus, strict=True)
                ]
                bytes_read[ceiling] = bytes_read[label]

    timed = time_interleaved(kernels, repeats)
    return [Row(f"{n}x{k}", name, *timed[name], bytes_read[name]) for name in kernels]


def print_table(rows: list[Row]) -> None:
    """Median and best time, GB/s of the bytes read, and speed-ups within each shape.

    Speed-ups compare medians (``vs fp32``, ``vs best16``: the fastest dense fp32 and dense 16-bit
    rows) and, in brackets, minimums: on a shared machine the minimum is the run least disturbed by
    other processes.
    """
    width = max(20, *(len(r.kernel) for r in rows))
    header = (
        f"{'shape':<11} {'kernel':<{width}} {'med ms':>7} {'min ms':>7} {'GB/s':>5} "
        f"{'vs fp32':>15} {'vs best16':>15}"
    )
    print(header)
    print("-" * len(header))
    for shape in dict.fromkeys(r.shape for r in rows):
        group = [r for r in rows if r.shape == shape]
        fp32 = min((r for r in group if r.kernel.startswith("dense fp32")), key=lambda r: r.seconds)
        fp32_min = min(r.best for r in group if r.kernel.startswith("dense fp32"))
        dense16 = [r for r in group if r.kernel.startswith("dense") and "fp32" not in r.kernel]
        best16 = min(dense16, key=lambda r: r.seconds)
        best16_min = min(r.best for r in dense16)
        for r in group:
            print(
                f"{r.shape:<11} {r.kernel:<{width}} {r.seconds * 1e3:7.3f} {r.best * 1e3:7.3f} "
                f"{r.bytes_read / r.seconds / 1e9:5.1f} "
                f"{fp32.seconds / r.seconds:5.2f}x ({fp32_min / r.best:5.2f}x) "
                f"{best16.seconds / r.seconds:5.2f}x ({best16_min / r.best:5.2f}x)"
            )


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1, help="tokens per call (1 = decode)")
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--pool-mib", type=int, default=128, help="weight copies per config")
    parser.add_argument("--shapes", nargs="*", help="NxK, default the LLaMA-7B projections")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--values",
        choices=sorted(VALUE_TYPES),
        default="bf16",
        help="16-bit type of the packed values (a checkpoint's own type: fp16 widens slower)",
    )
    parser.add_argument(
        "--isa",
        choices=list(ISA_LEVELS),
        help="our kernels' code path (default: the best this CPU has); torch's own kernels "
        "follow ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA",
    )
    parser.add_argument(
        "--reads",
        choices=list(READS),
        help="how the dual-sparse kernel, and the read-only rows, read the runs (default: the "
        "way measured faster on this CPU's make)",
    )
    parser.add_argument(
        "--widening",
        choices=list(WIDENINGS),
        help="how the AVX-512 paths make float32 of 16-bit values, named after the bf16 step "
        "(default: the way measured faster on this CPU's make)",
    )
    parser.add_argument(
        "--panel-rows",
        default=str(DEFAULT_PANEL_ROWS),
        help="CPU layout panel sizes to time side by side, comma list of multiples of 64",
    )
    args = parser.parse_args()

    panel_sizes = [int(v) for v in args.panel_rows.split(",")]
    if any(p <= 0 or p % 64 for p in panel_sizes):
        parser.error(f"--panel-rows takes positive multiples of 64, got {args.panel_rows}")
    torch.set_num_threads(args.threads)
    ok, reason = cpu_kernel_available()
    if not ok:
        raise SystemExit(reason)
    if args.isa:
        try:
            reason = cap_cpu_kernel_isa(args.isa)
        except ValueError as exc:
            parser.error(str(exc))
    set_cpu_widening(args.widening)
    reason = set_cpu_reads(args.reads)
    reads = reason.split("reads=")[1].split()[0]
    shapes = (
        [tuple(int(v) for v in s.split("x")) for s in args.shapes]
        if args.shapes
        else LLAMA7B_SHAPES
    )
    print(
        f"{reason}; threads={args.threads} tokens={args.tokens} repeats={args.repeats} "
        f"values={args.values}"
    )
    gen = torch.Generator().manual_seed(args.seed)
    reader = RangeReader() if args.tokens == 1 else None
    rows: list[Row] = []
    for n, k in shapes:
        rows += bench_shape(
            n,
            k,
            args.tokens,
            args.repeats,
            args.pool_mib,
            gen,
            reader,
            reads,
            panel_sizes,
            VALUE_TYPES[args.values],
        )
    print_table(rows)


if __name__ == "__main__":
    main()
