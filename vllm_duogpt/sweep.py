"""``duogpt sweep``: calibrate a grid of sparsities, evaluate it, plot accuracy against speed.

The grid is methods x weight sparsities x activation sparsities. Points that do not depend on
the method are run once and shared: the dense model (W0/X0) and activation-only sparsity (W0,
TEAL-style thresholds). Every calibrated checkpoint stays under ``OUT/checkpoints/<key>``, so a
rerun (or a larger grid in the same ``OUT``) reuses what is there; an interrupted calibration
is resumed. Each point gets:

- perplexity on the evaluation text (``evaluate.perplexity``, torch backend: no engine start-up
  per point, and it agrees with the vLLM backend within 0.5%, a tested property), kept in
  ``sweep.json`` and reused by later runs;
- decoder-linear time per decoded token (``linear_speed``) and the speed-up over the dense fp32
  model, all measured again in every run (ratios only mean something within one run);
- the checkpoint's size.

Rows are saved to ``OUT/sweep.json`` as they finish (a killed sweep keeps them); the table goes
to ``OUT/sweep.md`` and the frontier plot to ``OUT/frontier.png``. ``sweep.json`` has the
``{"settings", "rows"}`` shape ``duogpt report --sweep-json`` reads.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vllm_duogpt.report import atomic_png, atomic_write

logger = logging.getLogger(__name__)

METHODS = ("duogpt", "sparsegpt", "wanda")
DENSE = "dense"
ACTIVATION_ONLY = "activation-only"
SWEEP_JSON = "sweep.json"
SWEEP_TABLE = "sweep.md"
FRONTIER_PLOT = "frontier.png"


@dataclass(frozen=True)
class SweepPoint:
    """One grid point; ``method`` is ``dense``, ``activation-only`` or a calibration method."""

    method: str
    weight_sparsity: float
    act_sparsity: float

    @property
    def key(self) -> str:
        if self.method == DENSE:
            return DENSE
        return f"{self.method}-w{self.weight_sparsity:g}-x{self.act_sparsity:g}"

    @property
    def label(self) -> str:
        if self.method == DENSE:
            return DENSE
        return f"{self.method} W{self.weight_sparsity * 100:g}/X{self.act_sparsity * 100:g}"


@dataclass
class SweepSettings:
    """What a sweep runs and how it measures (recorded in ``sweep.json``)."""

    model: str
    methods: list[str]
    weight_sparsities: list[float]
    act_sparsities: list[float]
    calib_data: str = "austen"
    nsamples: int = 8
    seqlen: int = 256
    eval_data: str = "austen-pride"
    eval_seqlen: int = 256
    eval_windows: int | None = 16
    alpha: float = 0.25
    seed: int = 0


def parse_fractions(text: str, flag: str) -> list[float]:
    """``"0.3,0.5"`` -> ``[0.3, 0.5]``; each in ``[0, 1)``.

    Raises:
        ValueError: empty, unparsable or out-of-range values (naming ``flag``).
    """
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"{flag} {text!r}: {err}; pass numbers like 0.3,0.5") from err
    if not values or any(not 0.0 <= v < 1.0 for v in values):
        raise ValueError(f"{flag} {text!r}: give comma-separated fractions in [0, 1)")
    return sorted(set(values))


def plan_points(
    methods: Sequence[str], weight_sparsities: Sequence[float], act_sparsities: Sequence[float]
) -> list[SweepPoint]:
    """The grid, with method-independent points once: dense first, then activation-only.

    Raises:
        ValueError: an unknown method.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods {list(methods)}: use some of {', '.join(METHODS)}")
    points = [SweepPoint(DENSE, 0.0, 0.0)]
    points += [SweepPoint(ACTIVATION_ONLY, 0.0, x) for x in act_sparsities if x > 0]
    points += [
        SweepPoint(m, w, x)
        for m in methods
        for w in weight_sparsities
        if w > 0
        for x in act_sparsities
    ]
    return points


def calibrated_checkpoint(point: SweepPoint, settings: SweepSettings, out: Path) -> Path:
    """The point's checkpoint under ``out/checkpoints``, calibrated unless it is already there."""
    from vllm_duogpt.calibrate.config import CalibrationConfig
    from vllm_duogpt.calibrate.pipeline import calibrate

    ckpt = out / "checkpoints" / point.key
    if (ckpt / "config.json").exists():  # checkpoints are written atomically
        logger.info("%s: reusing %s", point.label, ckpt)
        return ckpt
    # Activation-only: no weight is pruned, so the method only names the thresholds' run.
    method = "duogpt" if point.method == ACTIVATION_ONLY else point.method
    config = CalibrationConfig(
        model=settings.model, out=ckpt, method=method,
        weight_sparsity=point.weight_sparsity, act_sparsity=point.act_sparsity,
        alpha=settings.alpha if method == "duogpt" else 0.0, calib_data=settings.calib_data,
        nsamples=settings.nsamples, seqlen=settings.seqlen, seed=settings.seed,
    )  # fmt: skip
    config.resume = config.partial_dir.exists()
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    report = calibrate(config)
    logger.info("%s: calibrated in %.1fs", point.label, report.seconds)
    return ckpt


def score_point(point: SweepPoint, model_dir: Path, settings: SweepSettings) -> dict[str, Any]:
    """The point's row: its perplexity and size (the timing is added by :func:`time_point`)."""
    from vllm_duogpt.bench import checkpoint_file_bytes
    from vllm_duogpt.evaluate import perplexity

    ppl = perplexity(
        str(model_dir), settings.eval_data, settings.eval_seqlen,
        max_windows=settings.eval_windows, backend="torch",
    )  # fmt: skip
    return {
        **asdict(point),
        "key": point.key,
        "label": point.label,
        # report.py plots rows with method None as the dense reference
        "method": None if point.method == DENSE else point.method,
        "ppl": ppl.ppl,
        "model_bytes": checkpoint_file_bytes(model_dir),
        "checkpoint": str(model_dir),
    }


def time_point(row: dict[str, Any], model_dir: Path, tokens: Any) -> None:
    """Add the decoder-linear time per token of the row's model (measured now)."""
    from vllm_duogpt.linear_speed import decoder_linear_time

    timing = decoder_linear_time(model_dir, tokens)
    row.update(
        linear_ms_per_token=timing.seconds_per_token * 1e3,
        kernel=timing.kernel,
        threads=timing.threads,
    )


def _load_rows(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if data.get("settings", {}).get("measure") != settings["measure"]:
        logger.warning("%s was measured with other settings: starting its rows afresh", path)
        return {}
    return data.get("rows", {})


def _save(path: Path, settings: dict[str, Any], rows: dict[str, Any]) -> None:
    atomic_write(path, (json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n").encode())


def run_sweep(settings: SweepSettings, out: str | os.PathLike[str]) -> dict[str, Any]:
    """Calibrate, evaluate and time the grid; write ``sweep.json``, ``sweep.md``, the plot.

    Checkpoints under ``out/checkpoints`` and perplexities already in ``sweep.json`` (with the
    same evaluation settings) are reused; every point's timing is measured again.

    Returns:
        ``{"settings", "rows"}`` as written to ``sweep.json``.
    """
    from transformers import AutoTokenizer

    from vllm_duogpt.calibrate.calib_data import eval_windows, load_eval_text
    from vllm_duogpt.calibrate.models import resolve_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points = plan_points(settings.methods, settings.weight_sparsities, settings.act_sparsities)
    model_dir = resolve_model(settings.model)
    record = asdict(settings)
    # Rows are comparable only when measured the same way; calibration settings live in the
    # checkpoints themselves.
    record["measure"] = {k: record[k] for k in ("eval_data", "eval_seqlen", "eval_windows")}
    rows = _load_rows(out / SWEEP_JSON, record)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Inputs for the timing: the last tokens of the first evaluation window.
    tokens = eval_windows(load_eval_text(settings.eval_data), tokenizer, settings.eval_seqlen, 1)
    for i, point in enumerate(points, 1):
        logger.info("[%d/%d] %s", i, len(points), point.label)
        ckpt = model_dir if point.method == DENSE else calibrated_checkpoint(point, settings, out)
        row = rows.get(point.key) or score_point(point, ckpt, settings)
        # Speed-ups are ratios within one run: every point is timed again, only perplexity
        # and calibration are reused.
        time_point(row, ckpt, tokens)
        rows[point.key] = row
        _save(out / SWEEP_JSON, record, rows)
    dense_ms = rows[DENSE]["linear_ms_per_token"]
    for row in rows.values():
        row["speedup"] = dense_ms / row["linear_ms_per_token"]
    _save(out / SWEEP_JSON, record, rows)
    data = {"settings": record, "rows": rows}
    atomic_write(out / SWEEP_TABLE, (render_table(data) + "\n").encode())
    plot_frontier(data, out / FRONTIER_PLOT)
    return data


def render_table(data: dict[str, Any]) -> str:
    """The sweep as a markdown table, sorted by method then sparsity."""
    s = data["settings"]
    rows = sorted(
        data["rows"].values(),
        key=lambda r: (r["method"] or "", r["weight_sparsity"], r["act_sparsity"]),
    )
    lines = [
        f"{s['model']}: calibrated on {s['calib_data']} ({s['nsamples']} x {s['seqlen']} tokens), "
        f"perplexity on {s['eval_data']} ({s['eval_windows'] or 'all'} windows of "
        f"{s['eval_seqlen']} tokens, transformers); decoder-linear time per decoded "
        "token at batch 1 (real inputs, the serving kernel; dense = fp32 torch).",
        "",
        "| method | W | X | perplexity | linear ms/token | speed-up vs dense | size MiB | kernel |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method'] or DENSE} | {r['weight_sparsity']:g} | {r['act_sparsity']:g} "
            f"| {r['ppl']:.2f} | {r['linear_ms_per_token']:.3f} | {r['speedup']:.2f}x "
            f"| {r['model_bytes'] / 2**20:.1f} | {r['kernel']} |"
        )
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The ``(speed-up, perplexity)`` points no other point beats on both (faster and lower)."""
    front: list[tuple[float, float]] = []
    for speed, ppl in sorted(points, key=lambda p: (-p[0], p[1])):
        if not front or ppl < front[-1][1]:
            front.append((speed, ppl))
    return sorted(front)


def plot_frontier(data: dict[str, Any], path: Path) -> None:
    """Perplexity against measured speed-up, one colour per method, each method's front drawn."""
    atomic_png(path, lambda fig: _draw_frontier(fig, data), figsize=(9, 6), dpi=120)


def _draw_frontier(fig: Any, data: dict[str, Any]) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax = fig.subplots()
    rows = list(data["rows"].values())
    markers = {"duogpt": "o", "sparsegpt": "s", "wanda": "^", ACTIVATION_ONLY: "D"}
    for method in [*METHODS, ACTIVATION_ONLY]:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        xs = [r["speedup"] for r in mine]
        ys = [r["ppl"] for r in mine]
        dots = ax.scatter(xs, ys, marker=markers[method], label=method, zorder=3)
        front = pareto_front(list(zip(xs, ys, strict=True)))
        ax.plot(*zip(*front, strict=True), color=dots.get_facecolor()[0], alpha=0.6)
        for r in mine:
            tag = f"W{r['weight_sparsity'] * 100:g}/X{r['act_sparsity'] * 100:g}"
            ax.annotate(tag, (r["speedup"], r["ppl"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    dense = data["rows"].get(DENSE)
    if dense:
        ax.scatter([dense["speedup"]], [dense["ppl"]], marker="*", s=150, color="black",
                   label=f"dense ({dense['ppl']:.1f})", zorder=4)  # fmt: skip
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    s = data["settings"]
    ax.set_xlabel("decoder-linear speed-up over dense fp32 at batch 1 (measured, ×)")
    ax.set_ylabel(f"perplexity on {s['eval_data']} (log scale, lower is better)")
    ax.set_title(f"{s['model']}: accuracy vs decode speed (lines: each method's frontier)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
