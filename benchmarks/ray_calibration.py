"""Calibration wall time and per-worker peak memory for 1 and N Ray workers.

Each worker count is one DuoGPT calibration (``--workers N``) of the same model on the same
windows, in its own process so that peak memory is that run's. The single-process run (1 worker)
does not use Ray; its "worker" memory is the process's own peak RSS. With N > 1 the driver
starts a local Ray cluster (or joins ``--ray-address``) and each worker reports its peak RSS
(CPU) or peak allocated device memory (GPU). Each checkpoint's masks are compared with the first
run's: fp32 results depend on summation order (the statistics are summed per worker, and a
1-thread worker's matrix products round differently from a 2-thread process's), and a weight
whose saliency ties the cut-off at that precision can land on either side.

Example (this machine, 2 cores)::

    .venv/bin/python benchmarks/ray_calibration.py --workers 1,2 --nsamples 8 --seqlen 256 \\
        --out results/ray_calibration

On a multi-GPU node: ``--device cuda --workers 1,8``; on a running cluster add
``--ray-address auto`` (run it on the head node).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vllm_duogpt import format as fmt
from vllm_duogpt.calibrate.memory import format_bytes

_ONE_RUN = """
import json, sys
from vllm_duogpt.calibrate.config import CalibrationConfig
from vllm_duogpt.calibrate.pipeline import calibrate
settings = json.loads(sys.argv[1])
report = calibrate(CalibrationConfig(**settings))
print("RESULT " + json.dumps({
    "seconds": report.seconds,
    "driver_peak_rss": report.peak_rss_bytes,
    "worker_peaks": report.worker_peak_bytes,
}))
"""


def run_once(settings: dict[str, Any]) -> dict[str, Any]:
    """One calibration in a fresh process; its report's timing and memory."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _ONE_RUN, json.dumps(settings)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"calibration failed:\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    result["process_seconds"] = time.perf_counter() - started
    return result


def mask_differences(a: Path, b: Path) -> tuple[int, int]:
    """How many of the pruned linears' mask entries differ between two checkpoints, of how many."""
    state_a, thresholds, _ = fmt.read_checkpoint(a)
    state_b, _, _ = fmt.read_checkpoint(b)
    keys = [f"{name}.weight" for name in thresholds]
    differ = sum(int(((state_a[k] == 0) != (state_b[k] == 0)).sum()) for k in keys)
    return differ, sum(state_a[k].numel() for k in keys)


def render(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"DuoGPT W{args.weight_sparsity:g}/X{args.act_sparsity:g} calibration of {args.model}, "
        f"{args.nsamples} x {args.seqlen} tokens of {args.calib_data}, device {args.device}.",
        "",
        "| workers | calibration s | process s | driver peak RSS | each worker's peak "
        "| mask entries unlike 1 worker's |",
        "|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        peaks = r["worker_peaks"] or [r["driver_peak_rss"]]
        lines.append(
            f"| {r['workers']} | {r['seconds']:.1f} | {r['process_seconds']:.1f} "
            f"| {format_bytes(r['driver_peak_rss'])} "
            f"| {', '.join(format_bytes(p) for p in peaks)} "
            f"| {r['mask_differ']} of {r['mask_entries']} "
            f"({r['mask_differ'] / r['mask_entries']:.1e}) |"
        )
    lines += [
        "",
        "calibration s: the pipeline's own timer (includes Ray start-up for N > 1); process s: "
        "the whole process (imports, model load). Worker memory: peak RSS on CPUs (Ray and "
        "torch included), peak allocated device memory on GPUs; 1 worker = the process itself.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--calib-data", default="austen")
    p.add_argument("--weight-sparsity", type=float, default=0.5)
    p.add_argument("--act-sparsity", type=float, default=0.5)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--ray-address", default=None)
    p.add_argument("--out", type=Path, help="directory for ray_calibration.md and .json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(x) for x in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="duogpt-ray-bench-") as scratch:
        reference = None
        for workers in counts:
            out = Path(scratch) / f"w{workers}"
            settings = {
                "model": args.model, "out": str(out), "nsamples": args.nsamples,
                "seqlen": args.seqlen, "calib_data": args.calib_data,
                "weight_sparsity": args.weight_sparsity, "act_sparsity": args.act_sparsity,
                "device": args.device, "workers": workers, "ray_address": args.ray_address,
            }  # fmt: skip
            result = run_once(settings)
            reference = reference or out
            differ, entries = mask_differences(reference, out)
            result.update(workers=workers, mask_differ=differ, mask_entries=entries)
            rows.append(result)
            print(f"{workers} worker(s): {result['seconds']:.1f}s", file=sys.stderr)
    table = render(rows, args)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ray_calibration.md").write_text(table + "\n")
        record = {"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
        (args.out / "ray_calibration.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
