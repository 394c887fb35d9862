"""Resume state of an unfinished calibration run, in ``<out>.partial/``.

After every block the driver saves what the rest of the run depends on: the two trajectories (the
next block's dense and pruned inputs), the finished blocks' pruned weights, the thresholds and the
metrics so far. Nothing else carries state: the threshold subsampling draws from generators seeded
by (seed, block, input), so no global RNG state needs saving, and a resumed run computes exactly
what an uninterrupted one would.

Every file is written to a temporary name and moved into place with ``os.replace``; ``state.json``
goes last and names the trajectory file it belongs to, so a run killed at any instant leaves
either the previous block's consistent state or the new one. Files a killed run left behind and
``state.json`` does not name are ignored and cleaned up.

Layout: ``state.json``, ``block_00003.pt`` (pruned linear weights of block 3, model dtype),
``trajectories_00004.pt`` (inputs of block 4: ``{"dense": ..., "pruned": ...}``, fp32).
Internal files use ``torch.save`` (it streams tensors; safetensors' writer copies every tensor
into memory first, which doubles the trajectories' footprint) and load with ``weights_only``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_duogpt.calibrate.config import CalibrationError

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_VERSION = 1


@dataclass
class PartialState:
    """What a resumed run restores.

    Attributes:
        next_block: first block still to calibrate.
        thresholds: finished linears' input thresholds, by full module name.
        reports: finished linears' metrics (``LinearReport`` fields), in order.
        warnings: notes collected so far.
        seconds: calibration time spent before the interruption.
    """

    next_block: int = 0
    thresholds: dict[str, float] = field(default_factory=dict)
    reports: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def windows_digest(windows: torch.Tensor) -> str:
    """SHA-256 of the calibration token ids (a resumed run must use the same windows)."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _block_file(block: int) -> str:
    return f"block_{block:05d}.pt"


def _trajectory_file(block: int) -> str:
    return f"trajectories_{block:05d}.pt"


def save_block(
    folder: Path,
    block: int,
    weights: dict[str, torch.Tensor],
    dense: torch.Tensor,
    pruned: torch.Tensor,
    state: PartialState,
    fingerprint: dict[str, Any],
    digest: str,
) -> None:
    """Record that ``block`` is finished: its weights, the next inputs, then ``state.json``.

    Args:
        folder: the ``<out>.partial`` directory.
        block: index of the finished block.
        weights: the block's pruned linear weights by full name (CPU).
        dense: ``[nsamples, seqlen, hidden]`` dense-path inputs of block ``block + 1``.
        pruned: pruned-path inputs of block ``block + 1``.
        state: progress so far, with ``next_block == block + 1``.
        fingerprint: settings of this run (checked on resume).
        digest: :func:`windows_digest` of the calibration windows.
    """
    folder.mkdir(parents=True, exist_ok=True)
    cpu_weights = {k: v.detach().cpu() for k, v in weights.items()}
    _atomic_torch_save(cpu_weights, folder / _block_file(block))
    _atomic_torch_save(
        {"dense": dense.detach().cpu(), "pruned": pruned.detach().cpu()},
        folder / _trajectory_file(state.next_block),
    )
    record = {
        "version": STATE_VERSION,
        "fingerprint": fingerprint,
        "windows_sha256": digest,
        "trajectories": _trajectory_file(state.next_block),
        "next_block": state.next_block,
        "thresholds": state.thresholds,
        "reports": state.reports,
        "warnings": state.warnings,
        "seconds": state.seconds,
    }
    _atomic_write_text(json.dumps(record, indent=1) + "\n", folder / STATE_FILE)
    _remove_stale(folder, keep=record["trajectories"])


def _remove_stale(folder: Path, keep: str) -> None:
    for path in folder.iterdir():
        if (path.name.startswith("trajectories_") and path.name != keep) or path.name.endswith(
            ".tmp"
        ):
            path.unlink(missing_ok=True)


def load_state(
    folder: Path, fingerprint: dict[str, Any], digest: str
) -> tuple[PartialState, dict[str, torch.Tensor]] | None:
    """Read the resume state and the finished blocks' weights.

    Returns:
        ``(state, weights)`` or None when ``folder`` holds no state yet (killed before the first
        block finished).

    Raises:
        CalibrationError: the state was written with other settings or other data.
    """
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("version") != STATE_VERSION:
        raise CalibrationError(f"{path} has state version {record.get('version')}; delete it")
    if record["fingerprint"] != fingerprint:
        diff = sorted(k for k in fingerprint if record["fingerprint"].get(k) != fingerprint.get(k))
        raise CalibrationError(
            f"{folder} was written with different settings ({', '.join(diff)}); rerun with the "
            "same flags or delete it"
        )
    if record["windows_sha256"] != digest:
        raise CalibrationError(
            f"{folder} was calibrated on different data; rerun with the same --calib-data/"
            "--nsamples/--seqlen/--seed or delete it"
        )
    _remove_stale(folder, keep=record["trajectories"])
    weights: dict[str, torch.Tensor] = {}
    for block in range(record["next_block"]):
        weights.update(torch.load(folder / _block_file(block), weights_only=True))
    state = PartialState(
        next_block=record["next_block"],
        thresholds={k: float(v) for k, v in record["thresholds"].items()},
        reports=list(record["reports"]),
        warnings=list(record["warnings"]),
        seconds=float(record["seconds"]),
    )
    return state, weights


def load_trajectories(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense and pruned inputs of the next block, as saved by :func:`save_block`."""
    record = json.loads((folder / STATE_FILE).read_text())
    data = torch.load(folder / record["trajectories"], weights_only=True)
    return data["dense"], data["pruned"]
