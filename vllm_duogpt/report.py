"""``duogpt report``: a model card (``README.md``) and PNG plots for a DuoGPT checkpoint.

The card is built from what the checkpoint itself records (per-linear sparsity, thresholds and
bytes from :func:`~vllm_duogpt.inspect_checkpoint.summarize`, calibration settings from
``quantization_config``) plus optional result files: ``duogpt eval ppl --json`` outputs,
a ``duogpt bench --out`` file and a ``benchmarks/calibration_table.py`` JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_duogpt.format import FormatError
from vllm_duogpt.inspect_checkpoint import CheckpointSummary, LinearSummary, summarize

logger = logging.getLogger(__name__)

README = "README.md"
PLOT_DIR = "report"
LAYER_PLOT = "layers.png"
BYTES_PLOT = "bytes_by_type.png"
SWEEP_PLOT = "perplexity_sweep.png"
# Per-linear calibration metrics (a list of LinearReport dicts under "linears"). The calibration
# pipeline does not write it today, so the card says "not recorded" unless someone saved it.
CALIBRATION_REPORT = "calibration_report.json"
MIB = 2**20


def generate_report(
    ckpt_dir: str | os.PathLike[str],
    eval_jsons: Sequence[str | os.PathLike[str]] = (),
    bench_json: str | os.PathLike[str] | None = None,
    sweep_json: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``CKPT/README.md`` and the plots under ``CKPT/report/``.

    Args:
        ckpt_dir: a DuoGPT checkpoint directory.
        eval_jsons: ``duogpt eval ppl --json`` results (PerplexityResult fields).
        bench_json: a ``duogpt bench --out`` file.
        sweep_json: `duogpt sweep`'s or a calibration-table JSON (``{"settings", "rows"}``) to
            plot perplexity of.

    Returns:
        The path of the written ``README.md``.

    Raises:
        FormatError: when ``ckpt_dir`` is not a valid DuoGPT checkpoint.
        ValueError: when a result file is not JSON or lacks the expected fields.
    """
    ckpt = Path(ckpt_dir)
    summary = summarize(ckpt)
    if not summary.linears:
        raise FormatError(f"{ckpt}: no compressed linears found")
    evals = [_load_json(p, ("ppl", "model", "data")) for p in eval_jsons]
    bench = _load_json(bench_json, ("results",)) if bench_json else None
    sweep = _load_json(sweep_json, ("rows",)) if sweep_json else None
    errors = _calibration_errors(ckpt)

    plot_dir = ckpt / PLOT_DIR
    plot_dir.mkdir(exist_ok=True)
    plots = {"layers": LAYER_PLOT, "bytes": BYTES_PLOT}
    atomic_png(plot_dir / LAYER_PLOT, lambda fig: _plot_layers(fig, summary.linears))
    atomic_png(plot_dir / BYTES_PLOT, lambda fig: _plot_bytes(fig, summary.linears))
    if sweep is not None:
        atomic_png(plot_dir / SWEEP_PLOT, lambda fig: _plot_sweep(fig, sweep))
        plots["sweep"] = SWEEP_PLOT

    text = render_card(ckpt.name, summary, errors, evals, bench, plots)
    out = ckpt / README
    atomic_write(out, text.encode())
    logger.info("wrote %s and %d plots in %s", out, len(plots), plot_dir)
    return out


def render_card(
    name: str,
    summary: CheckpointSummary,
    errors: dict[str, float],
    evals: Sequence[dict[str, Any]],
    bench: dict[str, Any] | None,
    plots: dict[str, str],
) -> str:
    """The markdown of the model card; ``plots`` maps a plot kind to its file in ``report/``."""
    qc = summary.quantization_config
    totals = summary.to_json()["totals"]
    lines = [
        f"# {name}: DuoGPT dual-sparse checkpoint",
        "",
        "Weights pruned by calibration and stored compressed; at run time each linear's input "
        "entries with |x| below its threshold are zeroed (activation sparsity). Serve it with "
        f"`duogpt serve {name}`.",
        "",
        "## Calibration settings",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {key} | {_cell(value)} |" for key, value in sorted(qc.items())]
    lines += [
        "",
        "## Totals",
        "",
        f"- sparse linears: {len(summary.linears)}",
        f"- linear weights: {_mib(totals['linear_compressed_bytes'])} compressed vs "
        f"{_mib(totals['linear_dense_bytes'])} dense (ratio {totals['linear_ratio']:.3f})",
        f"- other tensors (embeddings, norms, head): {_mib(totals['other_bytes'])}",
        f"- whole checkpoint: {_mib(totals['checkpoint_bytes'])} vs "
        f"{_mib(totals['dense_checkpoint_bytes'])} dense",
        f"- overall weight sparsity of the linears: {_weighted_sparsity(summary.linears):.4f}",
        "",
        "## Per-layer table",
        "",
        "| linear | shape | weight sparsity | input threshold | bytes | dense bytes | ratio "
        "| calib. rel. error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary.linears:
        err = f"{errors[s.name]:.4g}" if s.name in errors else "not recorded"
        lines.append(
            f"| {s.name} | {s.rows}x{s.cols} | {s.weight_sparsity:.4f} | {s.input_threshold:.4g} "
            f"| {s.compressed_bytes} | {s.dense_bytes} | {s.ratio:.3f} | {err} |"
        )
    lines += ["", f"![weight sparsity and threshold per layer]({PLOT_DIR}/{plots['layers']})"]
    lines += ["", f"![compressed vs dense MiB per layer type]({PLOT_DIR}/{plots['bytes']})", ""]
    if evals:
        lines += ["## Accuracy", "", "| model | data | backend | tokens | perplexity |"]
        lines.append("|---|---|---|---:|---:|")
        for e in evals:
            window = f"{e.get('windows', '?')} x {e.get('seqlen', '?')}"
            lines.append(
                f"| {e['model']} | {e['data']} | {e.get('backend', '?')} "
                f"| {e.get('tokens', '?')} ({window}) | {e['ppl']:.4f} |"
            )
        lines.append("")
    if "sweep" in plots:
        lines += ["## Perplexity across settings", ""]
        lines += [f"![perplexity per calibration setting]({PLOT_DIR}/{plots['sweep']})", ""]
    if bench is not None:
        lines += _speed_section(bench)
    return "\n".join(lines)


def _speed_section(bench: dict[str, Any]) -> list[str]:
    lines = ["## Speed", ""]
    if bench.get("method"):
        lines += [str(bench["method"]), ""]
    lines += [
        "| model | batch | TTFT (s) | decode tok/s | output tok/s | weights MiB | file MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, res in bench["results"].items():
        for b in res.get("batches", []):
            lines.append(
                f"| {label} | {b['batch']} | {b['ttft_s']:.3f} | {b['decode_tok_s']:.1f} "
                f"| {b['output_tok_s']:.1f} | {_mib_num(res.get('model_weight_bytes'))} "
                f"| {_mib_num(res.get('checkpoint_file_bytes'))} |"
            )
    lines.append("")
    return lines


# --- plots -----------------------------------------------------------------------------------


def _layer_index(name: str) -> int:
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _by_kind(linears: Sequence[LinearSummary]) -> dict[str, list[LinearSummary]]:
    groups: dict[str, list[LinearSummary]] = {}
    for s in linears:
        groups.setdefault(_kind(s.name), []).append(s)
    return groups


def _plot_layers(fig: Any, linears: Sequence[LinearSummary]) -> None:
    from matplotlib.ticker import MaxNLocator

    top, bottom = fig.subplots(2, 1, sharex=True)
    for kind, group in _by_kind(linears).items():
        xs = [_layer_index(s.name) for s in group]
        top.plot(xs, [s.weight_sparsity for s in group], marker="o", label=kind)
        bottom.plot(xs, [s.input_threshold for s in group], marker="s", label=kind)
    top.set_ylabel("weight sparsity (fraction of zeros)")
    top.set_ylim(0.0, 1.0)
    top.set_title("Weight sparsity and activation threshold per decoder layer")
    top.legend(title="linear", fontsize="small", ncol=2)
    bottom.set_ylabel("input threshold τ (|x|, activation units)")
    bottom.set_xlabel("decoder layer index")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.legend(title="linear", fontsize="small", ncol=2)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)


def _plot_bytes(fig: Any, linears: Sequence[LinearSummary]) -> None:
    groups = _by_kind(linears)
    kinds = list(groups)
    dense = [sum(s.dense_bytes for s in groups[k]) / MIB for k in kinds]
    packed = [sum(s.compressed_bytes for s in groups[k]) / MIB for k in kinds]
    ax = fig.subplots()
    xs = range(len(kinds))
    ax.bar([x - 0.2 for x in xs], dense, width=0.4, label="dense")
    ax.bar([x + 0.2 for x in xs], packed, width=0.4, label="compressed (DuoGPT)")
    ax.set_xticks(list(xs), kinds, rotation=30, ha="right")
    ax.set_xlabel("linear type (summed over layers)")
    ax.set_ylabel("size (MiB)")
    ax.set_title("Compressed vs dense weight bytes per linear type")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)


def _plot_sweep(fig: Any, sweep: dict[str, Any]) -> None:
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    rows = [r for r in sweep["rows"].values() if r.get("ppl") is not None]
    if not rows:
        raise ValueError("sweep JSON has no rows with a 'ppl' value")
    dense = [r for r in rows if r.get("method") is None]
    rows = [r for r in rows if r.get("method") is not None]
    ax = fig.subplots()
    labels = [_sweep_label(r) for r in rows]
    ppls = [r["ppl"] for r in rows]
    bars = ax.barh(range(len(rows)), ppls, label="calibrated")
    ax.bar_label(bars, fmt="%.1f", padding=2, fontsize="small")
    # One collapsed setting (magnitude pruning) can be 10x worse and flatten all the others.
    if max(ppls) > 10 * min(ppls + [d["ppl"] for d in dense]):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    if dense:
        ax.axvline(dense[0]["ppl"], color="black", linestyle="--",
                   label=f"dense ({dense[0]['ppl']:.1f})")  # fmt: skip
    data = sweep.get("settings", {}).get("eval_data", "eval data")
    scale = ", log scale" if ax.get_xscale() == "log" else ""
    ax.set_xlabel(f"perplexity on {data} (lower is better{scale})")
    ax.set_ylabel("calibration setting")
    ax.set_title("Perplexity per calibration setting")
    ax.legend()
    ax.grid(axis="x", alpha=0.3)


def _sweep_label(row: dict[str, Any]) -> str:
    label = str(row.get("label", row.get("key", "?")))
    # calibration_table.py labels its sweep rows "alpha 0.25" without naming the method.
    method = str(row.get("method"))
    return label if method.lower() in label.lower() else f"{method} {label}"


def atomic_png(
    path: Path, draw: Any, figsize: tuple[float, float] = (8, 6), dpi: int = 100
) -> None:
    """Draw a figure with ``draw(fig)`` and write it to ``path`` as a PNG, atomically."""
    from matplotlib.figure import Figure

    # A bare Figure uses the Agg canvas for PNG and leaves pyplot's global state alone.
    fig = Figure(figsize=figsize, layout="constrained")
    draw(fig)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a model card is meant to be read by others
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, format="png", dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- inputs and helpers ----------------------------------------------------------------------


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_json(path: str | os.PathLike[str], required: Sequence[str]) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err
    missing = [key for key in required if not isinstance(data, dict) or key not in data]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}")
    return data


def _calibration_errors(ckpt: Path) -> dict[str, float]:
    path = ckpt / CALIBRATION_REPORT
    if not path.is_file():
        return {}
    data = _load_json(path, ("linears",))
    return {r["name"]: float(r["rel_error"]) for r in data["linears"] if "rel_error" in r}


def _weighted_sparsity(linears: Sequence[LinearSummary]) -> float:
    params = sum(s.rows * s.cols for s in linears)
    return sum(s.weight_sparsity * s.rows * s.cols for s in linears) / max(params, 1)


def _mib(nbytes: int) -> str:
    return f"{nbytes / MIB:.2f} MiB"


def _mib_num(nbytes: Any) -> str:
    return f"{nbytes / MIB:.1f}" if isinstance(nbytes, int | float) else "-"


def _cell(value: Any) -> str:
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


# --- CLI -------------------------------------------------------------------------------------


def run_report(args: argparse.Namespace) -> int:
    """``duogpt report``: write the card and print where it went."""
    out = generate_report(args.checkpoint, args.eval_json, args.bench_json, args.sweep_json)
    print(f"wrote {out} (plots in {out.parent / PLOT_DIR})")
    return 0


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to ``duogpt``'s subparsers."""
    p = subparsers.add_parser(
        "report", help="write a model card (README.md) and plots into a checkpoint"
    )
    p.add_argument("checkpoint", help="DuoGPT checkpoint directory")
    p.add_argument(
        "--eval-json", nargs="+", default=[], metavar="FILE",
        help="perplexity results from `duogpt eval ppl --json`",
    )  # fmt: skip
    p.add_argument("--bench-json", metavar="FILE", help="results from `duogpt bench --out`")
    p.add_argument(
        "--sweep-json", metavar="FILE",
        help="sweep.json of `duogpt sweep` (or benchmarks/calibration_table.py's JSON) to plot "
        "perplexity per setting",
    )  # fmt: skip
    p.set_defaults(func=run_report)
    return p
