"""GPU kernel benchmark: dual-sparse Triton kernels vs dense cuBLAS and the activation-only kernel.

On one CUDA GPU, for the LLaMA-3-8B projection shapes, token counts {1, 2, 4, 16, 64, 512} and
sparsities W {0.5, 0.6} x X {0, 0.5} (bf16):

1. checks every kernel against ``dual_sparse_linear_reference`` (fp32) and stops on a mismatch;
2. times dense ``torch.matmul`` (``F.linear``: cuBLAS), the activation-only kernel (up to 16
   tokens) and ours (the decode kernel up to 8 tokens, the many-token kernel above), and
   reports the bytes each one must move and the achieved GB/s;
3. writes the table as ``<out>.md`` and ``<out>.json`` and prints it, with the targets
   (batch 1 W50/X50: >= 2.4x dense and >= 1.4x activation-only; 16 tokens >= 0.97x dense;
   512 tokens >= 0.8x dense);
4. where vLLM is installed (``make setup BACKEND=cuda``) and unless ``--no-vllm``: vLLM
   end-to-end decode at batch 1, 4 and 16, dense bf16 against DuoGPT W50/X50 (bf16 values), on a
   randomly initialised LLaMA-3-8B-shaped model pruned by magnitude (random_llama.py, built
   once into ``--work`` on the GPU: about 16 GB dense and 9 GB sparse on disk), each engine in
   its own process with CUDA graphs (vllm_decode.py); the report is written again with that
   section and its targets (batch 1 >= 1.8x dense, batch 16 >= 0.97x). Without vLLM the report
   says so and the kernel part stands alone.

Timing is what vLLM's decode sees: each call is replayed from a CUDA graph
(``triton.testing.do_bench_cudagraph``), so host launch overhead is excluded, and every graph
walks through enough copies of the weights (at least 4x the L2 cache) that no layer is served
from L2, as in a real forward pass. Run: ``python benchmarks/gpu_kernels.py --out results/gpu``.
Nothing of it has run on a GPU yet: the kernel part was estimated at about 5 minutes on an H200
(most of it Triton compilation and autotuning on the first run), and the end-to-end part adds the
model's first build and two engine start-ups with compilation, a few minutes more.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from random_llama import LLAMA3_8B, build_models
from vllm_decode import ratios_by_batch, render, run_rounds

logger = logging.getLogger("gpu_kernels")

LLAMA3_8B_SHAPES = {  # name: (N, K) of the nn.Linear weight
    "q_proj/o_proj": (4096, 4096),
    "k_proj/v_proj": (1024, 4096),
    "gate_proj/up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}
TOKENS = (1, 2, 4, 16, 64, 512)
WEIGHT_SPARSITY = (0.5, 0.6)
ACT_SPARSITY = (0.0, 0.5)
DTYPE = torch.bfloat16
TOLERANCE = 8e-3  # scale-free error of a bf16 output rounded once
DECODE_MAX_TOKENS = 8
VLLM_BATCHES = (1, 4, 16)
VLLM_TARGETS = {1: 1.8, 16: 0.97}  # batch: duogpt decode tokens/s over dense bf16's, at least


@dataclass
class Row:
    """One table row: a shape, a token count, a sparsity pair and the three kernels' timings."""

    shape: str
    n: int
    k: int
    tokens: int
    weight_sparsity: float
    act_sparsity: float
    ours_kernel: str
    dense_us: float
    dense_gbps: float
    ours_us: float
    ours_gbps: float
    act_only_us: float | None
    act_only_gbps: float | None
    alt_kernel: str | None = None  # the other many-token path, for choosing FUSED_MAX_TOKENS
    alt_us: float | None = None

    @property
    def speedup_vs_dense(self) -> float:
        return self.dense_us / self.ours_us

    @property
    def speedup_vs_act_only(self) -> float | None:
        return None if self.act_only_us is None else self.act_only_us / self.ours_us


@dataclass
class Problem:
    """Weights in the three layouts (several copies each, to defeat L2) and one input."""

    dense: list[torch.Tensor]
    act_only: list[torch.Tensor]
    packed: list  # list[GpuSparseWeight]
    x: torch.Tensor
    threshold: float


def masked_weight(n: int, k: int, sparsity: float, seed: int) -> torch.Tensor:
    """A random bf16 weight pruned to ``sparsity``, with per-column density varying 0.3x-1.7x."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    keep_col = (1 - sparsity) * torch.empty(k, device="cuda").uniform_(0.3, 1.7, generator=gen)
    keep = torch.rand(n, k, device="cuda", generator=gen) < keep_col.clamp(max=1.0)
    return (torch.randn(n, k, device="cuda", generator=gen) * keep).to(DTYPE)


def activations(tokens: int, k: int, sparsity: float, seed: int) -> tuple[torch.Tensor, float]:
    """Gaussian activations and the magnitude threshold that drops ``sparsity`` of them."""
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    x = torch.randn(tokens, k, device="cuda", generator=gen).to(DTYPE)
    if sparsity == 0:
        return x, 0.0
    return x, torch.quantile(x.abs().float().flatten()[: 1 << 24], sparsity).item()


def copies_for(nbytes: int) -> int:
    """How many weight copies one timed graph walks through so none stays in L2."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(1, min(64, math.ceil(4 * l2 / nbytes)))


def build_problem(
    n: int, k: int, tokens: int, ws: float, xs: float, seed: int, rotate: bool = True
) -> Problem:
    """The weight in all three layouts, ``copies_for`` copies each when ``rotate``."""
    from vllm_duogpt.kernels.gpu_layout import GpuSparseWeight, pack_gpu_weight
    from vllm_duogpt.kernels.triton_act_only import act_only_weight

    weight = masked_weight(n, k, ws, seed)
    packed = pack_gpu_weight(weight)
    copies = copies_for(weight.numel() * weight.element_size()) if rotate else 1
    x, threshold = activations(tokens, k, xs, seed)

    def packed_copy() -> GpuSparseWeight:
        tensors = (packed.values.clone(), packed.bitmap.clone(), packed.offsets.clone())
        return GpuSparseWeight(*tensors, packed.n, packed.k, packed.tile_n)

    return Problem(
        dense=[weight.clone() for _ in range(copies)],
        act_only=[act_only_weight(weight) for _ in range(copies)],
        packed=[packed_copy() for _ in range(copies)],
        x=x,
        threshold=threshold,
    )


def ours(x: torch.Tensor, packed, threshold: float) -> torch.Tensor:
    """Our kernel for this token count: decode up to 8 tokens, the many-token op above."""
    from vllm_duogpt.kernels.triton_decode import dual_sparse_decode
    from vllm_duogpt.kernels.triton_prefill import dual_sparse_prefill

    if x.shape[0] <= DECODE_MAX_TOKENS:
        return dual_sparse_decode(x, packed, threshold)
    return dual_sparse_prefill(x, packed, threshold)


def path_name(tokens: int) -> str:
    """Which path ``ours`` takes: decode kernel, fused many-token kernel, or unpack + cuBLAS."""
    from vllm_duogpt.kernels import triton_prefill

    if tokens <= DECODE_MAX_TOKENS:
        return "decode"
    return "fused" if tokens <= triton_prefill.FUSED_MAX_TOKENS else "unpack"


@contextmanager
def other_prefill_path(tokens: int) -> Iterator[str]:
    """Force the many-token op onto the path it would not take for ``tokens``."""
    from vllm_duogpt.kernels import triton_prefill

    saved = triton_prefill.FUSED_MAX_TOKENS
    triton_prefill.FUSED_MAX_TOKENS = tokens if tokens > saved else tokens - 1
    try:
        yield path_name(tokens)
    finally:
        triton_prefill.FUSED_MAX_TOKENS = saved


def act_only(x: torch.Tensor, weight_t: torch.Tensor, threshold: float) -> torch.Tensor:
    from vllm_duogpt.kernels.triton_act_only import triton_act_only_decode

    return triton_act_only_decode(x, weight_t, threshold, None)


def time_us(calls: list[Callable[[], torch.Tensor]]) -> float:
    """Microseconds per call, replaying all calls (one per weight copy) from a CUDA graph."""
    from triton.testing import do_bench_cudagraph

    def run_all() -> None:
        for call in calls:
            call()

    torch.cuda.synchronize()  # the timing stream must not overtake the weights' creation
    return do_bench_cudagraph(run_all, rep=20) * 1000 / len(calls)


def scale_free_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    if torch.isnan(y).any():
        return float("inf")
    scale = ref.abs().mean().item()
    diff = (y.float() - ref).abs()
    return diff.max().item() if scale == 0 else diff.mean().item() / scale


def check_correctness(shapes: dict[str, tuple[int, int]], tokens: tuple[int, ...]) -> list[str]:
    """Every kernel vs the fp32 reference at W50/X50; returns the failures."""
    from vllm_duogpt.kernels.reference import dual_sparse_linear_reference, sparsify_activations

    failures = []
    for name, (n, k) in shapes.items():
        for m in tokens:
            p = build_problem(n, k, m, 0.5, 0.5, seed=m, rotate=False)
            ref = dual_sparse_linear_reference(
                sparsify_activations(p.x, p.threshold).float(), p.dense[0].float(), 0.0
            )
            results = {"ours": ours(p.x, p.packed[0], p.threshold)}
            if m <= 16:
                results["act_only"] = act_only(p.x, p.act_only[0], p.threshold)
            for kernel, y in results.items():
                error = scale_free_error(y, ref)
                logger.info("check %-18s m=%-3d %-8s error %.2e", name, m, kernel, error)
                if not error <= TOLERANCE:
                    failures.append(f"{name} m={m} {kernel}: scale-free error {error:.2e}")
            del p
    return failures


def kernel_table(
    shapes: dict[str, tuple[int, int]],
    tokens: tuple[int, ...],
    weight_sparsity: tuple[float, ...],
    act_sparsity: tuple[float, ...],
    alt_from: int = 64,
) -> list[Row]:
    """Time the three kernels over the grid, and from ``alt_from`` tokens the other
    many-token path too. Dense time depends on neither sparsity and the
    activation-only time not on weight sparsity, so those are measured once and reused."""
    rows = []
    for name, (n, k) in shapes.items():
        for m in tokens:
            dense_us: float | None = None
            act_us: dict[float, float] = {}
            for ws in weight_sparsity:
                for xs in act_sparsity:
                    started = time.time()
                    problem = build_problem(n, k, m, ws, xs, seed=7)
                    x, tau = problem.x, problem.threshold
                    if dense_us is None:
                        dense_us = time_us(
                            [partial(torch.nn.functional.linear, x, w) for w in problem.dense]
                        )
                    if m <= 16 and xs not in act_us:
                        act_us[xs] = time_us(
                            [partial(act_only, x, w, tau) for w in problem.act_only]
                        )
                    ours_us = time_us([partial(ours, x, w, tau) for w in problem.packed])
                    row = make_row(
                        name,
                        n,
                        k,
                        m,
                        ws,
                        xs,
                        problem,
                        dense_us,
                        act_us.get(xs) if m <= 16 else None,
                        ours_us,
                    )
                    if m >= alt_from:
                        with other_prefill_path(m) as alt:
                            row.alt_kernel = alt
                            row.alt_us = time_us([partial(ours, x, w, tau) for w in problem.packed])
                    rows.append(row)
                    logger.info(
                        "%s m=%d W%.1f X%.1f timed in %.1f s",
                        name,
                        m,
                        ws,
                        xs,
                        time.time() - started,
                    )
    return rows


def make_row(
    name: str,
    n: int,
    k: int,
    m: int,
    ws: float,
    xs: float,
    p: Problem,
    dense_us: float,
    act_us: float | None,
    ours_us: float,
) -> Row:
    """Bytes each kernel must move (weights read, activations read, outputs written) / time."""
    from vllm_duogpt.kernels.reference import sparsify_activations

    io = (m * k + m * n) * 2
    active = (sparsify_activations(p.x, p.threshold) != 0).any(dim=0)
    ours_bytes = (
        p.packed[0].bytes_read(active)
        if m <= DECODE_MAX_TOKENS
        else (p.packed[0].bytes_read(torch.ones_like(active)))
    )
    act_bytes = int(active.sum().item()) * n * 2

    def gbps(nbytes: int, us: float | None) -> float | None:
        return None if us is None else (nbytes + io) / us / 1e3

    return Row(
        name,
        n,
        k,
        m,
        ws,
        xs,
        path_name(m),
        dense_us,
        gbps(n * k * 2, dense_us),
        ours_us,
        gbps(ours_bytes, ours_us),
        act_us,
        gbps(act_bytes, act_us),
    )


def target_checks(rows: list[Row]) -> list[str]:
    """The project's performance targets, one line each, at W50/X50."""
    lines = []
    for r in rows:
        if (r.weight_sparsity, r.act_sparsity) != (0.5, 0.5):
            continue
        if r.tokens == 1:
            ok = r.speedup_vs_dense >= 2.4 and (r.speedup_vs_act_only or 0) >= 1.4
            lines.append(
                f"{'PASS' if ok else 'MISS'} {r.shape} batch 1: {r.speedup_vs_dense:.2f}x"
                f" dense (>= 2.4), {r.speedup_vs_act_only:.2f}x act-only (>= 1.4)"
            )
        goal = {16: 0.97, 512: 0.8}.get(r.tokens)
        if goal is not None:
            ok = r.speedup_vs_dense >= goal
            lines.append(
                f"{'PASS' if ok else 'MISS'} {r.shape} {r.tokens} tokens: "
                f"{r.speedup_vs_dense:.2f}x dense (>= {goal})"
            )
    return lines


@dataclass
class EndToEnd:
    """The vLLM end-to-end section of the report."""

    markdown: str
    record: dict  # for the JSON report
    targets: list[str]


def vllm_end_to_end(work: Path, rounds: int) -> EndToEnd:
    """vLLM decode, dense bf16 against DuoGPT W50/X50, on a random LLaMA-3-8B-shaped model."""
    title = "## vLLM end-to-end decode, random LLaMA-3-8B-shaped model, W50/X50"
    if importlib.util.find_spec("vllm") is None:
        reason = "vLLM is not installed (`make setup BACKEND=cuda` installs it)"
        return EndToEnd(f"{title}\n\nNot run: {reason}.\n", {"skipped": reason}, [])
    torch.cuda.empty_cache()  # the engines' processes need the memory the kernel table held
    models = build_models(
        work, LLAMA3_8B, 0.5, 0.5, torch.bfloat16, value_dtype=torch.bfloat16, device="cuda"
    )
    torch.cuda.empty_cache()
    reports = run_rounds(
        models,
        rounds,
        VLLM_BATCHES,
        max_tokens=64,
        prompt_len=128,
        repeats=3,
        dtype="bfloat16",
        enforce_eager=False,
    )
    checks = end_to_end_checks(reports)
    markdown = "\n".join(
        [
            f"{title}\n\nCUDA graphs, bf16, {rounds} round(s).\n\n```\n{render(reports)}\n```\n",
            "Targets:\n",
            *[f"- {line}" for line in checks],
            "",
        ]
    )
    return EndToEnd(markdown, {"rounds": reports}, checks)


def end_to_end_failure(error: Exception) -> EndToEnd:
    """The section when an engine failed: its error (with the log's tail) in place of a table."""
    message = f"vLLM end-to-end decode failed: {error}"
    return EndToEnd(
        f"## vLLM end-to-end decode\n\n```\n{message}\n```\n",
        {"failed": message},
        ["MISS vLLM end-to-end decode: failed (see its section)"],
    )


def end_to_end_checks(reports: list[dict]) -> list[str]:
    """The end-to-end targets (:data:`VLLM_TARGETS`) on the median of the rounds' ratios."""
    by_batch = ratios_by_batch(reports)
    lines = []
    for batch, goal in VLLM_TARGETS.items():
        if batch not in by_batch:
            continue
        values = by_batch[batch]
        median = statistics.median(values)
        lines.append(
            f"{'PASS' if median >= goal else 'MISS'} vLLM decode batch {batch}: {median:.2f}x "
            f"dense (>= {goal}), median of {len(values)} round(s)"
        )
    return lines


def render_markdown(rows: list[Row], targets: list[str], header: str) -> str:
    def fmt(v: float | None, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    lines = [
        header,
        "",
        "| shape | N x K | tokens | W | X | kernel | dense us | dense GB/s | "
        "act-only us | act-only GB/s | ours us | ours GB/s | vs dense | vs act-only | "
        "other path us |",
        "|" + "---|" * 15,
    ]
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.n}x{r.k} | {r.tokens} | {r.weight_sparsity} | {r.act_sparsity} | "
            f"{r.ours_kernel} | {r.dense_us:.1f} | {r.dense_gbps:.0f} | "
            f"{fmt(r.act_only_us, '.1f')} | {fmt(r.act_only_gbps, '.0f')} | {r.ours_us:.1f} | "
            f"{r.ours_gbps:.0f} | {r.speedup_vs_dense:.2f}x | "
            f"{fmt(r.speedup_vs_act_only, '.2f')}{'x' if r.act_only_us else ''} | "
            f"{'n/a' if r.alt_us is None else f'{r.alt_kernel} {r.alt_us:.1f}'} |"
        )
    return "\n".join([*lines, "", "Targets (W50/X50):", "", *[f"- {t}" for t in targets], ""])


def write_report(
    rows: list[Row], targets: list[str], out: Path, end_to_end: EndToEnd | None = None
) -> None:
    import triton

    props = torch.cuda.get_device_properties(0)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "device": props.name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": str(DTYPE),
        "timing": "do_bench_cudagraph, weights rotated past L2",
    }
    header = (
        f"# Dual-sparse GPU kernels on {props.name}, {meta['date']}\n\n"
        f"torch {torch.__version__}, triton "
        f"{triton.__version__}, bf16, CUDA-graph timing, weights rotated past L2."
    )
    markdown = render_markdown(rows, targets, header)
    if end_to_end is not None:
        markdown += "\n" + end_to_end.markdown
        meta["end_to_end"] = end_to_end.record
        targets = [*targets, *end_to_end.targets]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown)
    records = [
        {
            **asdict(r),
            "speedup_vs_dense": r.speedup_vs_dense,
            "speedup_vs_act_only": r.speedup_vs_act_only,
        }
        for r in rows
    ]
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": records, "targets": targets}, indent=2)
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="report path; writes <out>.md and <out>.json"
    )
    parser.add_argument(
        "--shapes", nargs="*", choices=list(LLAMA3_8B_SHAPES), default=list(LLAMA3_8B_SHAPES)
    )
    parser.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    parser.add_argument(
        "--quick", action="store_true", help="W0.5/X0.5 only and tokens 1, 16, 512 (about a minute)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("out/bench-llama3-8b"),
        help="where the end-to-end models are built (once)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="end-to-end dense + duogpt pairs")
    parser.add_argument("--no-vllm", action="store_true", help="skip the end-to-end section")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Compose the sections: correctness, kernel table, report."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not torch.cuda.is_available():
        print("gpu_kernels.py needs a CUDA GPU; none is visible here.", file=sys.stderr)
        return 2
    shapes = {name: LLAMA3_8B_SHAPES[name] for name in args.shapes}
    tokens = (1, 16, 512) if args.quick else tuple(args.tokens)
    ws, xs = ((0.5,), (0.5,)) if args.quick else (WEIGHT_SPARSITY, ACT_SPARSITY)
    started = time.time()

    failures = check_correctness(shapes, tuple(m for m in (1, 4, 16, 512) if m in tokens))
    if failures:
        print(
            "kernel output does not match the reference:\n" + "\n".join(failures), file=sys.stderr
        )
        return 1
    rows = kernel_table(shapes, tokens, ws, xs)
    targets = target_checks(rows)
    write_report(rows, targets, args.out)  # kept even if the end-to-end part fails
    status = 0
    if not args.no_vllm:
        try:
            end_to_end = vllm_end_to_end(args.work, args.rounds)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            end_to_end, status = end_to_end_failure(error), 1
        write_report(rows, targets, args.out, end_to_end)
    print(args.out.with_suffix(".md").read_text())
    logger.info("done in %.0f s", time.time() - started)
    return status


if __name__ == "__main__":
    sys.exit(main())
