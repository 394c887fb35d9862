"""``duogpt calibrate``: a thin argparse shell around :func:`calibrate`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vllm_duogpt.calibrate.config import METHODS, CalibrationConfig, CalibrationError

logger = logging.getLogger(__name__)

EXIT_USAGE = 2


def add_calibrate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``calibrate`` subcommand to ``subparsers``."""
    defaults = CalibrationConfig(model="-", out=Path("-"))
    parser = subparsers.add_parser(
        "calibrate",
        help="prune a model with DuoGPT and calibrate activation thresholds",
        description="Calibrate a LLaMA-family model for dual sparsity (pruned weights x "
        "thresholded activations) and write a DuoGPT checkpoint.",
    )
    parser.add_argument("--model", required=True, help="model directory, bundled name or hub id")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory to create")
    parser.add_argument("--method", default=defaults.method, choices=METHODS)
    parser.add_argument(
        "--weight-sparsity", type=float, default=defaults.weight_sparsity,
        help="fraction of weights pruned, in [0, 1); 0 = activation sparsity only",
    )  # fmt: skip
    parser.add_argument(
        "--act-sparsity", type=float, default=defaults.act_sparsity,
        help="fraction of activations zeroed by the thresholds, in [0, 1); 0 = weights only",
    )  # fmt: skip
    parser.add_argument(
        "--pattern", default=defaults.pattern,
        help="'unstructured' or N:M (keep N of every M weights per row, e.g. 2:4)",
    )  # fmt: skip
    parser.add_argument(
        "--alpha", type=float, default=defaults.alpha,
        help="DuoGPT residual-correction scale (ignored by the baselines)",
    )  # fmt: skip
    parser.add_argument(
        "--calib-data", default=defaults.calib_data,
        help="calibration data: austen, austen:<book>, a .txt/.jsonl path, c4, wikitext2, self",
    )  # fmt: skip
    parser.add_argument("--nsamples", type=int, default=defaults.nsamples)
    parser.add_argument("--seqlen", type=int, default=defaults.seqlen)
    parser.add_argument("--device", default=defaults.device, choices=("cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--workers", type=int, default=defaults.workers,
        help="Ray workers splitting the samples (1 GPU each with --device cuda, else 1 CPU); "
        "default 1: no Ray",
    )  # fmt: skip
    parser.add_argument(
        "--ray-address", default=defaults.ray_address,
        help="Ray cluster to join with --workers (auto or HOST:PORT); default: start a local one",
    )  # fmt: skip
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from OUT.partial/"
    )
    parser.add_argument(
        "--lazy-values", default=defaults.lazy_values, choices=("pre_mask", "post_mask"),
        help=argparse.SUPPRESS,
    )  # fmt: skip
    parser.set_defaults(func=run_calibrate)
    return parser


def run_calibrate(args: argparse.Namespace) -> int:
    """Run a calibration from parsed arguments.

    Returns:
        0 on success, 2 on unusable inputs (a one-line message on stderr).
    """
    from vllm_duogpt.calibrate.pipeline import calibrate

    try:
        config = CalibrationConfig(
            model=args.model,
            out=args.out,
            method=args.method,
            weight_sparsity=args.weight_sparsity,
            act_sparsity=args.act_sparsity,
            pattern=args.pattern,
            alpha=args.alpha,
            calib_data=args.calib_data,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            seed=args.seed,
            device=args.device,
            resume=args.resume,
            lazy_values=args.lazy_values,
            workers=args.workers,
            ray_address=args.ray_address,
        )
        report = calibrate(config)
    except (CalibrationError, FileNotFoundError, FileExistsError) as err:
        logger.debug("calibration failed", exc_info=True)
        print(f"duogpt calibrate: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"wrote {report.out_dir}: weight sparsity {report.weight_sparsity:.4f}, activation "
        f"sparsity {report.act_sparsity:.4f}, {report.seconds:.1f}s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m vllm_duogpt.calibrate.cli calibrate ...``)."""
    parser = argparse.ArgumentParser(prog="duogpt")
    add_calibrate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
