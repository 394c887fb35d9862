"""Typed, validated settings of one calibration run (what ``duogpt calibrate`` passes on)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

METHODS = ("duogpt", "sparsegpt", "wanda", "magnitude")
DEVICES = ("cpu", "cuda")
LAZY_VALUES = ("pre_mask", "post_mask")
_NM = re.compile(r"^(\d+):(\d+)$")


class CalibrationError(ValueError):
    """A user-facing problem with the inputs of a calibration run; the message is one line."""


def parse_pattern(pattern: str) -> str | tuple[int, int]:
    """``"unstructured"`` or ``"N:M"`` (keep N of every M weights per row) -> solver pattern.

    Raises:
        CalibrationError: anything else.
    """
    if pattern == "unstructured":
        return pattern
    match = _NM.match(pattern)
    if match is None or not 0 < int(match[1]) < int(match[2]):
        raise CalibrationError(
            f"--pattern {pattern!r} is not understood; use 'unstructured' or N:M with 0 < N < M "
            "(e.g. 2:4)"
        )
    return int(match[1]), int(match[2])


@dataclass
class CalibrationConfig:
    """Settings of one calibration run.

    Attributes:
        model: local model directory, bundled name or hub id (``resolve_model``).
        out: directory of the finished checkpoint; ``<out>.partial/`` holds resume state.
        method: ``duogpt``, ``sparsegpt`` (DuoGPT with ``alpha = 0``), ``wanda`` or
            ``magnitude``.
        weight_sparsity: fraction of weights pruned, in ``[0, 1)``; 0 = activation-only.
        act_sparsity: fraction of activations below the thresholds, in ``[0, 1)``;
            0 = weight-only.
        pattern: ``unstructured`` or ``N:M`` (keep N of every M, e.g. ``2:4``).
        alpha: DuoGPT residual-correction scale (method.md 5.6).
        calib_data: calibration data spec (``load_calibration_windows``).
        nsamples: calibration windows.
        seqlen: tokens per window.
        seed: seed of the window draw and of the threshold subsampling.
        device: where blocks are calibrated.
        resume: continue from ``<out>.partial/``.
        blocksize: lazy-batch columns of the solver (method.md 5.5).
        percdamp: Hessian damping as a fraction of ``mean(diag H)`` (method.md 5.1).
        lazy_values: ``pre_mask`` or ``post_mask`` values in the lazy block update (5.5).
        workers: Ray workers sharing the samples (data parallel); 1 runs in this process and
            never imports Ray.
        ray_address: Ray cluster to join (``auto``, ``host:port``); None starts a local one.
    """

    model: str
    out: Path
    method: str = "duogpt"
    weight_sparsity: float = 0.5
    act_sparsity: float = 0.5
    pattern: str = "unstructured"
    alpha: float = 0.25
    calib_data: str = "austen"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    device: str = "cpu"
    resume: bool = False
    blocksize: int = 128
    percdamp: float = 0.01
    lazy_values: str = "pre_mask"
    workers: int = 1
    ray_address: str | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if not self.model:
            raise CalibrationError("--model is empty; pass a model directory or name")
        if self.method not in METHODS:
            raise CalibrationError(f"--method {self.method!r} is unknown; use one of {METHODS}")
        for flag, value in (
            ("--weight-sparsity", self.weight_sparsity),
            ("--act-sparsity", self.act_sparsity),
        ):
            if not 0.0 <= value < 1.0:
                raise CalibrationError(f"{flag} {value} is outside [0, 1); pass e.g. 0.5")
        nm = parse_pattern(self.pattern)
        if isinstance(nm, tuple) and self.weight_sparsity != 0.0:
            implied = 1.0 - nm[0] / nm[1]
            if abs(self.weight_sparsity - implied) > 1e-9:
                raise CalibrationError(
                    f"--pattern {self.pattern} prunes {implied:g} of the weights but "
                    f"--weight-sparsity is {self.weight_sparsity:g}; pass --weight-sparsity "
                    f"{implied:g}"
                )
            if self.blocksize % nm[1]:
                raise CalibrationError(
                    f"blocksize {self.blocksize} is not a multiple of M={nm[1]} of --pattern "
                    f"{self.pattern}"
                )
        if self.alpha < 0.0:
            raise CalibrationError(f"--alpha {self.alpha} is negative; pass a value >= 0")
        if self.method != "duogpt" and self.alpha != 0.0:
            # Only DuoGPT has a residual term; keep the record honest.
            self.alpha = 0.0
        for flag, value in (("--nsamples", self.nsamples), ("--seqlen", self.seqlen)):
            if int(value) != value or value < 1:
                raise CalibrationError(f"{flag} {value} must be a positive integer")
        if int(self.workers) != self.workers or self.workers < 1:
            raise CalibrationError(f"--workers {self.workers} must be a positive integer")
        if self.blocksize < 1:
            raise CalibrationError(f"blocksize {self.blocksize} must be a positive integer")
        if self.device not in DEVICES:
            raise CalibrationError(f"--device {self.device!r} is unknown; use one of {DEVICES}")
        if not 0.0 <= self.percdamp:
            raise CalibrationError(f"percdamp {self.percdamp} must be >= 0")
        if self.lazy_values not in LAZY_VALUES:
            raise CalibrationError(
                f"lazy_values {self.lazy_values!r} is unknown; use one of {LAZY_VALUES}"
            )

    @property
    def solver_pattern(self) -> str | tuple[int, int]:
        """The pattern in the solver's form: ``"unstructured"`` or ``(N, M)``."""
        return parse_pattern(self.pattern)

    @property
    def partial_dir(self) -> Path:
        """Where resume state lives while the run is unfinished."""
        return self.out.with_name(self.out.name + ".partial")

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run that wrote the partial state."""
        record = asdict(self)
        # Where the work runs does not change the result (up to fp32 summation order).
        for volatile in ("out", "resume", "device", "workers", "ray_address"):
            record.pop(volatile)
        return record

    def quantization_info(self) -> dict[str, Any]:
        """Calibration settings recorded in the checkpoint's ``quantization_config``."""
        return {
            "calibration_method": self.method,
            "weight_sparsity": self.weight_sparsity,
            "act_sparsity": self.act_sparsity,
            "pattern": self.pattern,
            "alpha": self.alpha,
            "calib_data": self.calib_data,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "seed": self.seed,
            "blocksize": self.blocksize,
            "percdamp": self.percdamp,
            "lazy_values": self.lazy_values,
            "activation_rule": "threshold",
        }
