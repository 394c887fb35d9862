"""``duogpt inspect``: per-layer sparsity, thresholds and bytes of a DuoGPT checkpoint."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from vllm_duogpt import format as fmt


@dataclass
class LinearSummary:
    """One compressed linear as stored on disk."""

    name: str
    rows: int
    cols: int
    weight_sparsity: float
    input_threshold: float
    compressed_bytes: int
    dense_bytes: int

    @property
    def ratio(self) -> float:
        return self.compressed_bytes / self.dense_bytes


@dataclass
class CheckpointSummary:
    """All linears plus totals; ``other_bytes`` counts the dense tensors (embeddings, norms...)."""

    linears: list[LinearSummary]
    other_bytes: int
    quantization_config: dict[str, Any]

    @property
    def compressed_bytes(self) -> int:
        return sum(s.compressed_bytes for s in self.linears)

    @property
    def dense_bytes(self) -> int:
        return sum(s.dense_bytes for s in self.linears)

    def to_json(self) -> dict[str, Any]:
        return {
            "quantization_config": self.quantization_config,
            "linears": [asdict(s) | {"ratio": s.ratio} for s in self.linears],
            "totals": {
                "linear_compressed_bytes": self.compressed_bytes,
                "linear_dense_bytes": self.dense_bytes,
                "linear_ratio": self.compressed_bytes / max(self.dense_bytes, 1),
                "other_bytes": self.other_bytes,
                "checkpoint_bytes": self.compressed_bytes + self.other_bytes,
                "dense_checkpoint_bytes": self.dense_bytes + self.other_bytes,
            },
        }


def summarize(ckpt_dir: str | os.PathLike[str]) -> CheckpointSummary:
    """Read a checkpoint's tensors and summarise every compressed linear (validating it)."""
    config = fmt.read_config(ckpt_dir)
    tensors = dict(fmt.iter_checkpoint_tensors(ckpt_dir))
    linears = []
    for name, parts in sorted(fmt.group_sparse_parts(tensors).items(), key=_layer_order):
        rows, cols = fmt.validate_parts(parts, name)
        if fmt.THRESHOLD not in parts:
            raise fmt.FormatError(f"{name}: missing {fmt.THRESHOLD}")
        values = parts[fmt.VALUES]
        linears.append(
            LinearSummary(
                name=name,
                rows=rows,
                cols=cols,
                weight_sparsity=1.0 - values.numel() / (rows * cols),
                input_threshold=fmt.threshold_value(parts[fmt.THRESHOLD], name),
                compressed_bytes=fmt.compressed_nbytes(parts),
                dense_bytes=rows * cols * values.element_size(),
            )
        )
    other = sum(
        t.numel() * t.element_size() for k, t in tensors.items() if not k.endswith(fmt.ALL_PARTS)
    )
    return CheckpointSummary(linears, other, config["quantization_config"])


def format_table(summary: CheckpointSummary) -> str:
    """A fixed-width table of the summary, one line per linear plus totals."""
    lines = [
        f"{'linear':<44} {'shape':>12} {'w-sparsity':>10} {'threshold':>10} "
        f"{'bytes':>10} {'dense':>10} {'ratio':>6}"
    ]
    for s in summary.linears:
        lines.append(
            f"{s.name:<44} {f'{s.rows}x{s.cols}':>12} {s.weight_sparsity:>10.3f} "
            f"{s.input_threshold:>10.4g} {s.compressed_bytes:>10} {s.dense_bytes:>10} "
            f"{s.ratio:>6.3f}"
        )
    totals = summary.to_json()["totals"]
    lines.append(
        f"linears: {totals['linear_compressed_bytes']} bytes vs {totals['linear_dense_bytes']} "
        f"dense ({totals['linear_ratio']:.3f}x); whole checkpoint {totals['checkpoint_bytes']} vs "
        f"{totals['dense_checkpoint_bytes']} dense"
    )
    return "\n".join(lines)


def run_inspect(ckpt_dir: str, as_json: bool) -> str:
    """Text for ``duogpt inspect`` (JSON when ``as_json``)."""
    summary = summarize(ckpt_dir)
    return json.dumps(summary.to_json(), indent=2) if as_json else format_table(summary)


def _layer_order(item: tuple[str, Any]) -> tuple:
    # Sort model.layers.10 after model.layers.9.
    return tuple(int(p) if p.isdigit() else p for p in item[0].split("."))
