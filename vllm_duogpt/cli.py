"""The ``duogpt`` command: a thin argparse shell over the package's functions.

Subcommands import their module only when run, so ``duogpt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _run_inspect(args: argparse.Namespace) -> int:
    from vllm_duogpt.inspect_checkpoint import run_inspect

    print(run_inspect(args.checkpoint, args.json))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from vllm_duogpt.torch_model import export_dense

    out = export_dense(args.checkpoint, args.dense)
    print(f"wrote masked dense Hugging Face checkpoint to {out}")
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from vllm_duogpt import vllm_cli

    sys.argv = ["vllm", "serve", args.model, *args.vllm_args]
    return vllm_cli.main()


def _run_demo(args: argparse.Namespace) -> int:
    from vllm_duogpt.demo import run_demo

    return run_demo(
        args.out, args.prompt, args.nsamples, args.seqlen, args.weight_sparsity, args.act_sparsity
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duogpt", description="DuoGPT dual-sparse LLMs: calibrate, inspect, serve."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    from vllm_duogpt.calibrate.assets_cli import add_assets_parsers
    from vllm_duogpt.calibrate.cli import add_calibrate_parser
    from vllm_duogpt.eval_cli import add_eval_parsers
    from vllm_duogpt.report import add_report_parser

    add_calibrate_parser(sub)
    add_assets_parsers(sub)
    add_eval_parsers(sub)
    add_report_parser(sub)

    p = sub.add_parser("inspect", help="per-layer sparsity, thresholds and bytes vs dense")
    p.add_argument("checkpoint", help="DuoGPT checkpoint directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run_inspect)

    p = sub.add_parser("export", help="write the masked dense weights as a plain HF checkpoint")
    p.add_argument("checkpoint", help="DuoGPT checkpoint directory")
    p.add_argument("--dense", required=True, metavar="OUT", help="output directory (new)")
    p.set_defaults(func=_run_export)

    p = sub.add_parser(
        "serve",
        help="vllm serve with the duogpt plugin (arguments after MODEL go to vLLM)",
        add_help=False,
    )
    p.add_argument("model")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_run_serve)

    p = sub.add_parser(
        "demo", help="prepare SmolLM2-135M, prune it, serve it with vLLM, ask one question"
    )
    p.add_argument("--out", default="out/demo", help="working directory (default out/demo)")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=256, help="calibration window length")
    # W20/X30 answers the demo question as the dense model does, served by vLLM through the CPU
    # kernel or the torch reference, on an Intel Xeon. W30/X30, the earlier default, did on an
    # AMD Zen 5 but not on that Xeon, whose calibration arithmetic differs; W20/X30 prunes less
    # and has not run on the Zen 5. Sparser points of SmolLM2-135M lose it (README, "The demo").
    p.add_argument("--weight-sparsity", type=float, default=0.2, help="default 0.2")
    p.add_argument("--act-sparsity", type=float, default=0.3, help="default 0.3")
    p.set_defaults(func=_run_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``duogpt`` command (``argv`` defaults to ``sys.argv[1:]``) and return its code."""
    return execute(build_parser().parse_args(argv))


def execute(args: argparse.Namespace) -> int:
    """Run the command parsed into ``args``; bad input is one error line and code 2."""
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        # Bad input (format errors are ValueErrors): one line that says what is wrong.
        print(f"duogpt {args.command}: error: {err}", file=sys.stderr)
        return 2


def run() -> None:
    """The ``duogpt`` console script: :func:`main`, then exit with its code.

    Commands that run a vLLM engine in this process (``eval``, ``lm-eval``) exit through
    :func:`~vllm_duogpt.process_exit.exit_process`, which skips the interpreter teardown vLLM's
    CPU engine can abort in; the others exit normally.
    """
    args = build_parser().parse_args()
    code = execute(args)
    if args.command in ("eval", "lm-eval"):
        from vllm_duogpt.process_exit import exit_process

        exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
