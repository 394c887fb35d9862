"""Memory plan of a calibration run: what it will hold, where, and whether that fits.

The driver keeps two trajectories (``nsamples x seqlen x hidden`` fp32 each), one block twice in
fp32 (dense reference and working copy), the statistics of the widest linear input plus the
solver's ``k x k`` temporaries, and one sample's activations. Trajectories go on the calibration
device when everything fits there, otherwise they stay in host memory and samples are streamed.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

import psutil
import torch
from torch import nn

from vllm_duogpt.calibrate.config import CalibrationConfig, CalibrationError

logger = logging.getLogger(__name__)

GIB = 1 << 30
FP32 = 4
# Solver peak: H, G (statistics) + damped copy, factor, inverse, U, Q, P (method.md 5.1-5.3).
SOLVER_KXK = 8
# Keep this much of the reported free memory unused (allocator slack, fragmentation).
HEADROOM = 0.9


@dataclass
class MemoryPlan:
    """Estimated bytes of each part of a run and where the trajectories live."""

    trajectories: int
    block: int
    statistics: int
    activations: int
    trajectory_device: torch.device

    @property
    def total(self) -> int:
        return self.trajectories + self.block + self.statistics + self.activations

    def describe(self) -> str:
        return (
            f"trajectories {format_bytes(self.trajectories)} (on {self.trajectory_device}), "
            f"block {format_bytes(self.block)}, statistics {format_bytes(self.statistics)}, "
            f"activations {format_bytes(self.activations)}"
        )


def _free_host_bytes() -> int:
    return int(psutil.virtual_memory().available)


def plan_memory(
    config: CalibrationConfig, block: nn.Module, hidden: int, num_heads: int, device: torch.device
) -> MemoryPlan:
    """Estimate a run's memory and decide where the trajectories go.

    Args:
        config: the run's settings.
        block: one decoder block (all blocks are assumed alike).
        hidden: model width.
        num_heads: attention heads (the attention scores of one sample).
        device: calibration device.

    Returns:
        The plan; it was checked against the free memory.

    Raises:
        CalibrationError: it does not fit, naming the flags that shrink it.
    """
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    widest_in = max(m.in_features for m in linears)
    widest_out = max(m.out_features for m in linears)
    params = sum(p.numel() for p in block.parameters())
    trajectories = 2 * config.nsamples * config.seqlen * hidden * FP32
    block_bytes = 2 * params * FP32
    solving = config.weight_sparsity > 0 and config.method != "magnitude"
    statistics = SOLVER_KXK * widest_in**2 * FP32 + 3 * widest_out * widest_in * FP32
    if not solving:
        statistics = 0
    # One sample: the widest projections a few times over, plus attention scores if materialised.
    activations = config.seqlen * (6 * hidden + 4 * widest_out) * FP32
    activations += 2 * num_heads * config.seqlen**2 * FP32
    working = block_bytes + statistics + activations
    host_free = _free_host_bytes()

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if working > HEADROOM * free:
            raise CalibrationError(
                f"one block needs about {working / GIB:.1f} GiB on {device} but "
                f"{free / GIB:.1f} GiB is free; lower --seqlen or use --device cpu"
            )
        on_device = working + trajectories <= HEADROOM * free
        where = device if on_device else torch.device("cpu")
        if not on_device and trajectories > HEADROOM * host_free:
            raise CalibrationError(
                f"the trajectories need {trajectories / GIB:.1f} GiB (2 x nsamples x seqlen x "
                f"hidden x 4 B) and fit neither on {device} nor in the {host_free / GIB:.1f} GiB "
                "of free RAM; lower --nsamples or --seqlen"
            )
    else:
        where = torch.device("cpu")
        if working + trajectories > HEADROOM * host_free:
            raise CalibrationError(
                f"calibration needs about {(working + trajectories) / GIB:.1f} GiB of RAM "
                f"(trajectories {trajectories / GIB:.1f} GiB) but {host_free / GIB:.1f} GiB is "
                "free; lower --nsamples or --seqlen, or use --device cuda"
            )
    plan = MemoryPlan(trajectories, block_bytes, statistics, activations, where)
    logger.info("memory estimate: %s; free RAM %s", plan.describe(), format_bytes(host_free))
    return plan


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
