"""Calibration of one decoder block (method.md section 6, steps 2-4).

For each group of linears sharing an input, in call order ([q, k, v] -> [o] -> [gate, up] ->
[down]):

1. calibrate the group's threshold on the pruned path, with everything upstream (including this
   block's earlier groups) already pruned and sparsified, so the calibrated fraction is the one
   the runtime sees;
2. stream the samples through both paths, accumulating H, G and a for the group's shared input
   (X^ after the threshold from the pruned path, X~ from the dense path, same sample);
3. solve every member and write its pruned weight into the working block.

A last pass runs both paths through the finished block: its outputs overwrite the trajectories
(the next block's inputs), and each linear's output is compared with its dense counterpart.

The sample passes run in a pool of :class:`~vllm_duogpt.calibrate.sample_shard.SampleShard`
objects, each over a slice of the samples: one in this process (:class:`LocalShardPool`), or one
per Ray worker (``ray_pool.RayShardPool``). :class:`BlockCalibrator` combines their partial
results (threshold values, statistics, error sums) and runs the solves, so both give the same
checkpoint up to fp32 summation order.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from vllm_duogpt.calibrate.blocks import LayerCall
from vllm_duogpt.calibrate.config import CalibrationConfig, CalibrationError
from vllm_duogpt.calibrate.memory import MemoryPlan
from vllm_duogpt.calibrate.sample_shard import OutputSums, SampleShard
from vllm_duogpt.calibrate.solver import (
    LayerStats,
    SolveResult,
    merge_stats,
    prune_duogpt,
    prune_magnitude,
    prune_wanda,
)
from vllm_duogpt.calibrate.thresholds import threshold_for_sparsity

logger = logging.getLogger(__name__)


@dataclass
class LinearReport:
    """Metrics of one calibrated linear.

    ``seconds`` covers its group's threshold and statistics passes plus its own solve; ``loss`` is
    the solver's objective change (``SolveResult.loss``); ``rel_error`` is
    ``||y_pruned - y_dense|| / ||y_dense||`` over the calibration tokens; ``act_sparsity`` is the
    measured fraction of zeros in the input it sees.
    """

    name: str
    shape: tuple[int, int]
    seconds: float
    loss: float
    rel_error: float
    weight_sparsity: float
    act_sparsity: float
    threshold: float
    damping: float


def _derived_seed(seed: int, block: int, group: int) -> int:
    # Independent of run history, so a resumed run subsamples the same activations.
    return (seed * 1_000_003 + block * 1_009 + group) % (1 << 63)


class WorkerLost(RuntimeError):
    """A shard's worker died; the block it was working on can be retried on the others."""


def solve_linear(
    config: CalibrationConfig, weight: torch.Tensor, stats: LayerStats | None
) -> SolveResult | None:
    """Prune one fp32 weight with the configured method (None: the weight stays as it is)."""
    if config.weight_sparsity == 0.0:
        return None
    pattern = config.solver_pattern
    if config.method == "magnitude":
        return prune_magnitude(weight, config.weight_sparsity, pattern)
    assert stats is not None
    if config.method == "wanda":
        return prune_wanda(weight, stats, config.weight_sparsity, pattern)
    alpha = config.alpha if config.method == "duogpt" else 0.0
    return prune_duogpt(
        weight, stats, config.weight_sparsity, pattern, alpha,
        blocksize=config.blocksize, percdamp=config.percdamp, lazy_values=config.lazy_values,
    )  # fmt: skip


class ShardPool(Protocol):
    """Where a block's sample passes and solves run (this process, or Ray workers)."""

    def start_block(
        self, index: int, cpu_block: nn.Module, dense: torch.Tensor, pruned: torch.Tensor
    ) -> list[list[str]]:
        """Give every shard its slice of the trajectories and a copy of the block.

        Returns:
            The block's linear names grouped by shared input, in call order.
        """

    def call(self, method: str, *args: Any) -> list[Any]:
        """Run ``SampleShard.method(*args)`` on every shard; results in sample order."""

    def solve(
        self, weights: list[torch.Tensor], stats: LayerStats | None
    ) -> list[SolveResult | None]:
        """``solve_linear`` of every weight with the same statistics."""

    def finish_block(self, dense: torch.Tensor, pruned: torch.Tensor) -> None:
        """Copy the shards' advanced trajectory slices back into ``dense`` and ``pruned``."""

    def drop_lost_workers(self) -> int:
        """Forget workers that died; returns how many are left."""

    def peak_bytes(self) -> list[int]:
        """Each worker's peak memory (empty when the work runs in this process)."""

    def close(self) -> None:
        """Release the workers."""


class LocalShardPool:
    """One shard over all samples, in this process: trajectories are advanced in place."""

    def __init__(self, config: CalibrationConfig, device: torch.device, calls: list[LayerCall]):
        self.config = config
        self.device = device
        self.calls = calls
        self.shard: SampleShard | None = None

    def start_block(
        self, index: int, cpu_block: nn.Module, dense: torch.Tensor, pruned: torch.Tensor
    ) -> list[list[str]]:
        self.shard = SampleShard(
            self.config.nsamples, self.device, self.calls[index], cpu_block, dense, pruned, 0
        )
        return self.shard.group_names

    def call(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.shard, method)(*args)]

    def solve(
        self, weights: list[torch.Tensor], stats: LayerStats | None
    ) -> list[SolveResult | None]:
        return [solve_linear(self.config, w.to(self.device), stats) for w in weights]

    def finish_block(self, dense: torch.Tensor, pruned: torch.Tensor) -> None:
        self.shard = None  # it advanced dense and pruned in place

    def drop_lost_workers(self) -> int:
        return 1

    def peak_bytes(self) -> list[int]:
        return []

    def close(self) -> None:
        self.shard = None


class BlockCalibrator:
    """Calibrates blocks one after another, advancing the two trajectories it holds in place."""

    def __init__(
        self,
        config: CalibrationConfig,
        pool: ShardPool,
        dense: torch.Tensor,
        pruned: torch.Tensor,
        plan: MemoryPlan,
    ) -> None:
        self.config = config
        self.pool = pool
        self.dense = dense
        self.pruned = pruned
        self.plan = plan
        self.held_peak = 0

    def _hold(self, extra: int) -> None:
        self.held_peak = max(
            self.held_peak, self.plan.trajectories + self.plan.block + self.plan.activations + extra
        )

    def threshold(self, group: int, seed: int) -> float:
        """Section 3 threshold of the group's input, on the pruned path as it now runs."""
        sparsity = self.config.act_sparsity
        if sparsity == 0.0:
            return 0.0
        values = self.pool.call("threshold_values", group, sparsity, seed)
        return threshold_for_sparsity(torch.cat(values), sparsity)

    def block(self, index: int, cpu_block: nn.Module) -> tuple[list[LinearReport], list[str]]:
        """Calibrate one decoder block; its linear weights are overwritten when it succeeds.

        A worker lost mid-block (Ray) costs a retry of the block on the remaining workers: the
        block and the trajectories are only written once every shard has finished.
        """
        while True:
            try:
                return self._block(index, cpu_block)
            except WorkerLost as err:
                left = self.pool.drop_lost_workers()
                if left == 0:
                    raise CalibrationError(
                        f"every calibration worker died ({err}); rerun with --resume to continue "
                        f"from block {index}"
                    ) from err
                logger.warning("block %d: %s; retrying the block on %d worker(s)", index, err, left)

    @torch.no_grad()
    def _block(self, index: int, cpu_block: nn.Module) -> tuple[list[LinearReport], list[str]]:
        groups = self.pool.start_block(index, cpu_block, self.dense, self.pruned)
        self._hold(0)
        solving = self.config.weight_sparsity > 0 and self.config.method != "magnitude"
        residual = self.config.method == "duogpt"
        reports: list[LinearReport] = []
        notes: list[str] = []
        pruned_weights: dict[str, torch.Tensor] = {}
        for g, names in enumerate(groups):
            start = time.perf_counter()
            tau = self.threshold(g, _derived_seed(self.config.seed, index, g))
            if tau > 0.0:
                self.pool.call("sparsify", g, tau)
            stats = None
            if solving:
                k = cpu_block.get_submodule(names[0]).weight.shape[1]
                self._hold(2 * k * k * 4)
                stats = merge_stats(self.pool.call("statistics", g, residual))
            shared = time.perf_counter() - start
            originals = [cpu_block.get_submodule(n).weight for n in names]
            t0 = time.perf_counter()
            results = self.pool.solve([w.to(torch.float32) for w in originals], stats)
            # Members are solved together (in parallel on Ray workers): each gets the mean.
            own = (time.perf_counter() - t0) / len(names)
            updates = {}
            for name, original, result in zip(names, originals, results, strict=True):
                loss, damping = 0.0, 0.0
                weight = original
                if result is not None:
                    weight = result.W.to(device=original.device, dtype=original.dtype)
                    updates[name] = result.W
                    notes += [f"{name}: {w}" for w in result.warnings]
                    loss, damping = result.loss, result.damping_used
                pruned_weights[name] = weight
                reports.append(
                    LinearReport(
                        name=name,
                        shape=(weight.shape[0], weight.shape[1]),
                        seconds=shared + own,
                        loss=loss,
                        rel_error=float("nan"),
                        weight_sparsity=float((weight == 0).sum()) / weight.numel(),
                        act_sparsity=float("nan"),
                        threshold=tau,
                        damping=damping,
                    )
                )
            del results, stats
            if updates:
                self.pool.call("set_weights", updates)
            del updates
        sums: dict[str, OutputSums] = {}
        for part in self.pool.call("advance"):
            for name, value in part.items():
                sums.setdefault(name, OutputSums()).add(value)
        self.pool.finish_block(self.dense, self.pruned)
        for r in reports:
            s = sums[r.name]
            r.rel_error = math.sqrt(s.err / max(s.ref, 1e-30))
            r.act_sparsity = s.zeros / max(s.total, 1)
            cpu_block.get_submodule(r.name).weight.copy_(pruned_weights[r.name])
        return reports, notes
