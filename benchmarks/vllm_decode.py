"""vLLM end-to-end decode, a dense model against its DuoGPT checkpoint, in rounds.

Each round runs ``duogpt bench`` (``vllm_duogpt.bench.run_bench``) on the dense engine, then on
the DuoGPT one, each in its own process. On a shared machine the speed drifts between the two
engines' runs, so the ratios are taken within each round, and several rounds are summarised by
their median. Used by benchmarks/vllm_cpu_decode.py and benchmarks/gpu_kernels.py.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence

from vllm_duogpt.bench import format_table, run_bench


def run_rounds(
    models: dict[str, str],
    rounds: int,
    batches: Sequence[int],
    max_tokens: int,
    prompt_len: int,
    repeats: int,
    dtype: str = "float32",
    enforce_eager: bool = True,
) -> list[dict]:
    """``rounds`` reports of :func:`run_bench` on ``models`` (the dense label first, ``duogpt``)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    reports = []
    for round_no in range(1, rounds + 1):
        logging.info("round %d of %d", round_no, rounds)
        reports.append(
            run_bench(
                models,
                batches=batches,
                max_tokens=max_tokens,
                prompt_len=prompt_len,
                repeats=repeats,
                dtype=dtype,
                enforce_eager=enforce_eager,
            )
        )
    return reports


def dense_of(report: dict) -> str:
    """The label of the report's dense model (``dense-fp32``, ``dense-bf16``...)."""
    [label] = [name for name in report["results"] if name.startswith("dense")]
    return label


def decode_ratios(report: dict) -> dict[int, float]:
    """Batch size -> duogpt decode tokens/s over the dense model's, within one report."""
    dense, sparse = report["results"][dense_of(report)], report["results"]["duogpt"]
    return {
        d["batch"]: s["decode_tok_s"] / d["decode_tok_s"]
        for d, s in zip(dense["batches"], sparse["batches"], strict=True)
    }


def ratio_lines(report: dict) -> str:
    """DuoGPT over dense, measured in one round: decode speed per batch and resident memory."""
    label = dense_of(report)
    dense, sparse = report["results"][label], report["results"]["duogpt"]
    name = label.replace("-", " ")
    lines = [
        f"batch {batch}: duogpt decode = {ratio:.2f}x {name}"
        for batch, ratio in decode_ratios(report).items()
    ]
    rss = sparse["worker_rss_bytes"] / dense["worker_rss_bytes"]
    weights = sparse["model_weight_bytes"] / dense["model_weight_bytes"]
    lines.append(f"worker RSS: {rss:.2f}x {name}; model weights held: {weights:.2f}x")
    return "\n".join(lines)


def ratios_by_batch(reports: list[dict]) -> dict[int, list[float]]:
    """Batch size -> its duogpt over dense decode ratio in each round (:func:`decode_ratios`)."""
    per_round = [decode_ratios(r) for r in reports]
    return {batch: [ratios[batch] for ratios in per_round] for batch in per_round[0]}


def median_lines(reports: list[dict]) -> str:
    """Each batch's ratio in every round and their median."""
    name = dense_of(reports[0]).replace("-", " ")
    lines = []
    for batch, values in ratios_by_batch(reports).items():
        listed = ", ".join(f"{v:.2f}x" for v in values)
        lines.append(
            f"batch {batch}: duogpt decode = {statistics.median(values):.2f}x {name}, "
            f"median of {len(values)} rounds ({listed})"
        )
    return "\n".join(lines)


def render(reports: list[dict]) -> str:
    """Every round's table and ratios, then (several rounds) the medians."""
    if len(reports) == 1:
        return f"{format_table(reports[0])}\n\n{ratio_lines(reports[0])}"
    rounds = [
        f"round {i}:\n{format_table(r)}\n\n{ratio_lines(r)}" for i, r in enumerate(reports, 1)
    ]
    return "\n\n".join([*rounds, median_lines(reports)])
