"""Perplexity, calibration time and peak memory of DuoGPT against its baselines on one model.

Each row is one :func:`vllm_duogpt.calibrate.pipeline.calibrate` into a temporary directory and
one torch-backend perplexity of the written checkpoint on Pride and Prejudice (held out of the
``austen`` calibration data), in fixed, non-overlapping windows. Finished rows are written to
``<out>/calibration_table.json`` as soon as they finish, so a killed run keeps them; ``--resume``
skips rows already there. The markdown table goes to stdout and ``<out>/calibration_table.md``.

Example (sized for a 2-core CPU; one calibration of SmolLM2-135M takes ~10 minutes)::

    nice -n 5 .venv/bin/python benchmarks/calibration_table.py --out results/calibration \\
        --nsamples 8 --seqlen 256 --eval-windows 16 --eval-seqlen 256 --resume
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_duogpt.calibrate.config import CalibrationConfig
from vllm_duogpt.calibrate.memory import format_bytes
from vllm_duogpt.calibrate.models import resolve_model
from vllm_duogpt.calibrate.pipeline import calibrate
from vllm_duogpt.evaluate import perplexity

logger = logging.getLogger("calibration_table")

EVAL_DATA = "austen-pride"
FP32 = 4


@dataclass(frozen=True)
class Row:
    """One line of the table: a calibration setting, or ``None`` settings for the dense model."""

    key: str
    label: str
    method: str | None
    weight_sparsity: float = 0.5
    act_sparsity: float = 0.5
    pattern: str = "unstructured"
    alpha: float = 0.0


def main_rows(alpha: float) -> list[Row]:
    """The main table, in the order rows are run (most important first)."""
    rows = [Row("dense", "dense", None)]
    for method in ("duogpt", "sparsegpt", "wanda", "magnitude"):
        rows.append(
            Row(
                f"{method}-w50x50",
                f"{method} W50/X50",
                method,
                alpha=alpha if method == "duogpt" else 0.0,
            )
        )
    for method in ("duogpt", "sparsegpt"):
        rows.append(
            Row(
                f"{method}-2:4x50",
                f"{method} 2:4 + X50",
                method,
                pattern="2:4",
                alpha=alpha if method == "duogpt" else 0.0,
            )
        )
    rows.append(
        Row("w0x50", "W0/X50 (activation only)", "duogpt", weight_sparsity=0.0, alpha=alpha)
    )
    rows.append(
        Row("sparsegpt-w50x0", "sparsegpt W50/X0 (weight only)", "sparsegpt", act_sparsity=0.0)
    )
    # Last: the 2:4 target compares against Wanda too, but the row is the least informative.
    rows.append(Row("wanda-2:4x50", "wanda 2:4 + X50", "wanda", pattern="2:4"))
    return rows


def sweep_rows(alphas: list[float], alpha: float) -> list[Row]:
    """DuoGPT W50/X50 at each alpha; the main row's alpha reuses the main row's key."""
    return [
        Row(
            "duogpt-w50x50" if a == alpha else f"duogpt-w50x50-a{a:g}",
            f"alpha {a:g}",
            "duogpt",
            alpha=a,
        )
        for a in alphas
    ]


def memory_bound_bytes(model_dir: Path, nsamples: int, seqlen: int) -> tuple[int, int, int]:
    """(one decoder block in fp32, the two fp32 trajectories, 1.5x their sum) from config.json.

    Counts a Llama-style block: q/k/v/o projections (grouped-query k/v), gate/up/down MLP and two
    RMSNorm weights, plus biases where the config turns them on.
    """
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden = cfg["hidden_size"]
    inter = cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv = cfg.get("num_key_value_heads", heads) * head_dim
    q = heads * head_dim
    attn = hidden * q + 2 * hidden * kv + q * hidden
    if cfg.get("attention_bias"):
        attn += q + 2 * kv + hidden
    mlp = 3 * hidden * inter + (2 * inter + hidden if cfg.get("mlp_bias") else 0)
    block = (attn + mlp + 2 * hidden) * FP32
    trajectories = 2 * nsamples * seqlen * hidden * FP32
    return block, trajectories, int(1.5 * (block + trajectories))


def run_row(row: Row, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Calibrate (unless dense) and score one row; returns its JSON record."""
    record: dict[str, Any] = {
        "key": row.key,
        "label": row.label,
        "method": row.method,
        "weight_sparsity": row.weight_sparsity,
        "act_sparsity": row.act_sparsity,
        "pattern": row.pattern,
        "alpha": row.alpha,
    }
    if row.method is None:
        record.update(weight_sparsity=0.0, act_sparsity=0.0)
        result = perplexity(
            args.model, EVAL_DATA, args.eval_seqlen, args.eval_windows, backend="torch"
        )
        record.update(ppl=result.ppl, eval_seconds=result.seconds + result.load_seconds)
        return record
    out = scratch / row.key.replace(":", "_")
    config = CalibrationConfig(
        model=args.model,
        out=out,
        method=row.method,
        weight_sparsity=row.weight_sparsity,
        act_sparsity=row.act_sparsity,
        pattern=row.pattern,
        alpha=row.alpha,
        calib_data=args.calib_data,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
    )
    try:
        report = calibrate(config)
        result = perplexity(
            str(out), EVAL_DATA, args.eval_seqlen, args.eval_windows, backend="torch"
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(config.partial_dir, ignore_errors=True)
    record.update(
        ppl=result.ppl,
        eval_seconds=result.seconds + result.load_seconds,
        calib_seconds=report.seconds,
        peak_memory_bytes=report.peak_memory_bytes,
        peak_rss_bytes=report.peak_rss_bytes,
        measured_weight_sparsity=report.weight_sparsity,
        measured_act_sparsity=report.act_sparsity,
        warnings=len(report.warnings),
    )
    return record


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "calib_data": args.calib_data,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "seed": args.seed,
        "eval_data": EVAL_DATA,
        "eval_windows": args.eval_windows,
        "eval_seqlen": args.eval_seqlen,
    }


def _load(path: Path, settings: dict[str, Any], resume: bool) -> dict[str, Any]:
    if resume and path.exists():
        data = json.loads(path.read_text())
        if data["settings"] != settings:
            sys.exit(
                f"{path} was written with {data['settings']}, not {settings}; "
                "drop --resume or pick another --out"
            )
        return data
    return {"settings": settings, "rows": {}}


def _save(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)  # atomic: a kill mid-write never leaves a torn file


def _cells(rec: dict[str, Any] | None, label: str) -> str:
    if rec is None:
        return f"| {label} | not run | | | |"
    calib = f"{rec['calib_seconds']:.0f} s" if "calib_seconds" in rec else "-"
    peak = format_bytes(rec["peak_memory_bytes"]) if "peak_memory_bytes" in rec else "-"
    rss = format_bytes(rec["peak_rss_bytes"]) if "peak_rss_bytes" in rec else "-"
    return f"| {label} | {rec['ppl']:.2f} | {calib} | {peak} | {rss} |"


def render(data: dict[str, Any], args: argparse.Namespace, sweep: list[Row]) -> str:
    """The markdown of everything finished so far, with settings header and targets footer."""
    s, rows = data["settings"], data["rows"]
    head = [
        "| setting | ppl | calibration time | peak memory (report) | peak RSS |",
        "|---|---:|---:|---:|---:|",
    ]
    lines = [
        f"## Calibration table: {s['model']}",
        "",
        f"Calibration: {s['nsamples']} windows x {s['seqlen']} tokens of `{s['calib_data']}`, "
        f"seed {s['seed']}. Perplexity: torch backend, first {s['eval_windows']} fixed "
        f"non-overlapping windows x {s['eval_seqlen']} tokens of `{s['eval_data']}` "
        "(Pride and Prejudice, held out of calibration). CPU, fp32.",
        "",
        *head,
    ]
    lines += [_cells(rows.get(r.key), r.label) for r in main_rows(args.alpha)]
    if sweep:
        lines += ["", "### DuoGPT W50/X50, alpha sweep", "", *head]
        lines += [_cells(rows.get(r.key), r.label) for r in sweep]
    block, traj, bound = memory_bound_bytes(resolve_model(s["model"]), s["nsamples"], s["seqlen"])
    lines += [
        "",
        f"Memory bound: 1.5 x (one block {format_bytes(block)} + two trajectories "
        f"{format_bytes(traj)}) = {format_bytes(bound)}.",
        "",
        "Targets:",
    ]
    lines += _targets(rows, bound)
    return "\n".join(lines) + "\n"


def _targets(rows: dict[str, Any], bound: int) -> list[str]:
    def ppl(key: str) -> float | None:
        return rows[key]["ppl"] if key in rows else None

    out = []
    for tag, suffix in (("W50/X50", "w50x50"), ("2:4+X50", "2:4x50")):
        duo = ppl(f"duogpt-{suffix}")
        for other in ("sparsegpt", "wanda"):
            ref = ppl(f"{other}-{suffix}")
            if duo is None or ref is None:
                out.append(f"- {tag}: DuoGPT ppl < {other}: not measured")
            else:
                verdict = "met" if duo < ref else "MISSED"
                out.append(f"- {tag}: DuoGPT ppl {duo:.2f} < {other} {ref:.2f}: {verdict}")
    duo, sgpt = rows.get("duogpt-w50x50"), rows.get("sparsegpt-w50x50")
    if duo and sgpt:
        ratio = duo["calib_seconds"] / sgpt["calib_seconds"]
        out.append(
            f"- calibration time DuoGPT / SparseGPT = {ratio:.2f} (target <= 1.3): "
            f"{'met' if ratio <= 1.3 else 'MISSED'}"
        )
    else:
        out.append("- calibration time DuoGPT / SparseGPT (target <= 1.3): not measured")
    peaks = [r for r in rows.values() if r.get("method") == "duogpt" and "peak_memory_bytes" in r]
    if peaks:
        worst = max(r["peak_memory_bytes"] for r in peaks)
        out.append(
            f"- DuoGPT peak memory {format_bytes(worst)} <= bound {format_bytes(bound)}: "
            f"{'met' if worst <= bound else 'MISSED'}"
        )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib-data", default="austen")
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.25, help="DuoGPT alpha of the main rows")
    p.add_argument("--alpha-sweep", default="", help="comma-separated alphas, e.g. 0,0.125,0.25")
    p.add_argument("--rows", default="", help="comma-separated row keys (default: all)")
    p.add_argument("--out", type=Path, default=Path("results/calibration"))
    p.add_argument("--resume", action="store_true", help="skip rows already in the JSON")
    p.add_argument(
        "--stop-after", type=float, default=None, help="launch no new row after this many minutes"
    )
    p.add_argument("--list", action="store_true", help="print the row keys and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    alphas = [float(a) for a in args.alpha_sweep.split(",") if a.strip()]
    sweep = sweep_rows(alphas, args.alpha)
    everything = {r.key: r for r in [*main_rows(args.alpha), *sweep]}
    if args.list:
        print("\n".join(everything))
        return 0
    keys = [k.strip() for k in args.rows.split(",") if k.strip()] or list(everything)
    unknown = [k for k in keys if k not in everything]
    if unknown:
        sys.exit(f"unknown --rows {unknown}; known: {list(everything)}")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / "calibration_table.json", args.out / "calibration_table.md"
    data = _load(json_path, _settings(args), args.resume)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="duogpt-table-") as scratch:
        for key in keys:
            if key in data["rows"]:
                logger.info("skipping %s: already in %s", key, json_path)
                continue
            if args.stop_after is not None and time.monotonic() - started > 60 * args.stop_after:
                logger.info("stop-after reached; not launching %s", key)
                break
            logger.info("row %s", key)
            data["rows"][key] = run_row(everything[key], args, Path(scratch))
            _save(json_path, data)
            md_path.write_text(render(data, args, sweep))
            logger.info("row %s: ppl %.3f", key, data["rows"][key]["ppl"])
    table = render(data, args, sweep)
    md_path.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
