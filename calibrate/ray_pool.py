"""Data-parallel calibration over Ray workers (``duogpt calibrate --workers N``).

Each worker is a Ray actor holding one :class:`~vllm_duogpt.calibrate.sample_shard.SampleShard`
per block: a contiguous slice of the calibration samples' two trajectories and fp32 copies of the
current block. The driver (``driver.BlockCalibrator``) sums the workers' statistics and error
sums, concatenates their threshold values, and hands the solves of a group's members out to the
workers, so the members of [q, k, v] and [gate, up] are solved in parallel; every worker then
receives the pruned weights. The math is the single-process code: the same ``SampleShard`` and
``solve_linear`` run inside the actors.

Data movement per block: the block's weights go into Ray's object store once (``ray.put``) and
every worker reads that one copy; each trajectory slice goes out at the start of the block and
comes back at its end, so the driver always holds the last finished block's trajectories. That
is what makes a lost worker cheap: the block is retried on the remaining workers from those
trajectories (``WorkerLost``), and ``--resume`` still works from the driver's per-block saves.

This module imports Ray; nothing imports it unless ``--workers`` is above 1.
"""

from __future__ import annotations

import logging
import os
import resource
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError
from torch import nn

from vllm_duogpt.calibrate.blocks import LayerCall
from vllm_duogpt.calibrate.config import CalibrationConfig, CalibrationError
from vllm_duogpt.calibrate.driver import WorkerLost, solve_linear
from vllm_duogpt.calibrate.sample_shard import SampleShard
from vllm_duogpt.calibrate.solver import LayerStats, SolveResult

logger = logging.getLogger(__name__)

_PING_SECONDS = 60.0


class CalibrationWorker:
    """The body of one Ray actor: a sample shard per block, and solves on request."""

    def __init__(self, config: CalibrationConfig, device: str, calls: list[LayerCall]) -> None:
        self.config = config
        self.device = torch.device(device)
        self.calls = calls
        self.shard: SampleShard | None = None

    def start_block(
        self,
        index: int,
        cpu_block: nn.Module,
        dense: torch.Tensor,
        pruned: torch.Tensor,
        first_sample: int,
    ) -> list[list[str]]:
        # Ray hands out read-only views of the object store; the shard advances its own copy.
        self.shard = SampleShard(
            self.config.nsamples, self.device, self.calls[index], cpu_block,
            dense.clone(), pruned.clone(), first_sample,
        )  # fmt: skip
        return self.shard.group_names

    def call(self, method: str, *args: Any) -> Any:
        # Results leave on the CPU: the driver need not see this worker's GPU.
        return _to_cpu(getattr(self.shard, method)(*args))

    def solve(self, weight: torch.Tensor, stats: LayerStats | None) -> SolveResult | None:
        if stats is not None:
            stats = _stats_to(stats, self.device)
        result = solve_linear(self.config, weight.to(self.device), stats)
        if result is not None:
            result.W, result.mask = result.W.cpu(), result.mask.cpu()
        return result

    def trajectories(self) -> tuple[torch.Tensor, torch.Tensor]:
        shard, self.shard = self.shard, None
        assert shard is not None
        return shard.dense.cpu(), shard.pruned.cpu()

    def peak_bytes(self) -> int:
        """Peak memory of this worker: device memory on a GPU, else peak resident set size."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def pid(self) -> int:
        return os.getpid()


def _stats_to(stats: LayerStats, device: torch.device | str) -> LayerStats:
    return LayerStats(
        H=stats.H.to(device), G=stats.G.to(device), a=stats.a.to(device), nsamples=stats.nsamples
    )


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, LayerStats):
        return _stats_to(value, "cpu")
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _slices(nsamples: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, nearly equal ``[start, stop)`` sample ranges, one per worker."""
    base, extra = divmod(nsamples, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class RayShardPool:
    """``driver.ShardPool`` over Ray actors, one per worker.

    Args:
        config: the run's settings (``workers``, ``ray_address``).
        calls: every block's call arguments (put into the object store once).

    Raises:
        CalibrationError: more workers than samples, or the cluster cannot host them.
    """

    def __init__(self, config: CalibrationConfig, calls: list[LayerCall]) -> None:
        if config.workers > config.nsamples:
            raise CalibrationError(
                f"--workers {config.workers} exceeds --nsamples {config.nsamples}: each worker "
                "needs at least one sample; pass fewer workers"
            )
        self.config = config
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            # address=None starts a local cluster; "auto" or host:port joins one.
            ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=True)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        use_gpu = config.device == "cuda"
        if use_gpu and gpus < config.workers:
            raise CalibrationError(
                f"--workers {config.workers} with --device cuda needs {config.workers} GPUs; the "
                f"Ray cluster has {gpus}"
            )
        options = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": 1}
        actor = ray.remote(CalibrationWorker).options(max_restarts=0, **options)
        calls_ref = ray.put(calls)
        self.actors = [
            actor.remote(config, "cuda" if use_gpu else "cpu", calls_ref)
            for _ in range(config.workers)
        ]
        self.pids = self._get([a.pid.remote() for a in self.actors])
        self._bounds: list[tuple[int, int]] = []
        logger.info(
            "calibrating on %d Ray workers (%s each)",
            config.workers, "1 GPU" if use_gpu else "1 CPU",
        )  # fmt: skip

    def _get(self, refs: list[Any]) -> list[Any]:
        try:
            return ray.get(refs)
        except RayActorError as err:
            raise WorkerLost(f"a Ray worker died: {type(err).__name__}") from err

    def start_block(
        self, index: int, cpu_block: nn.Module, dense: torch.Tensor, pruned: torch.Tensor
    ) -> list[list[str]]:
        block_ref = ray.put(cpu_block)
        self._bounds = _slices(len(dense), len(self.actors))
        refs = [
            a.start_block.remote(index, block_ref, dense[lo:hi], pruned[lo:hi], lo)
            for a, (lo, hi) in zip(self.actors, self._bounds, strict=True)
        ]
        return self._get(refs)[0]

    def call(self, method: str, *args: Any) -> list[Any]:
        # Each argument goes into the object store once, however many workers read it.
        refs = [ray.put(arg) for arg in args]
        return self._get([a.call.remote(method, *refs) for a in self.actors])

    def solve(
        self, weights: list[torch.Tensor], stats: LayerStats | None
    ) -> list[SolveResult | None]:
        stats_ref = ray.put(stats)
        refs = [
            self.actors[i % len(self.actors)].solve.remote(w, stats_ref)
            for i, w in enumerate(weights)
        ]
        return self._get(refs)

    def finish_block(self, dense: torch.Tensor, pruned: torch.Tensor) -> None:
        parts = self._get([a.trajectories.remote() for a in self.actors])
        for (lo, hi), (d, p) in zip(self._bounds, parts, strict=True):
            dense[lo:hi].copy_(d)
            pruned[lo:hi].copy_(p)

    def drop_lost_workers(self) -> int:
        alive = []
        for actor, pid in zip(self.actors, self.pids, strict=True):
            try:
                ray.get(actor.pid.remote(), timeout=_PING_SECONDS)
                alive.append((actor, pid))
            except (RayActorError, GetTimeoutError):
                logger.warning("Ray worker (pid %d) is gone", pid)
        self.actors = [a for a, _ in alive]
        self.pids = [p for _, p in alive]
        return len(self.actors)

    def peak_bytes(self) -> list[int]:
        """Each live worker's peak memory (``CalibrationWorker.peak_bytes``)."""
        return self._get([a.peak_bytes.remote() for a in self.actors])

    def close(self) -> None:
        """Stop the workers, and the local Ray cluster if this pool started it."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._started_ray:
            ray.shutdown()
