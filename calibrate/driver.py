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
Samples are streamed one at a time; the block runs in fp32 on the calibration device.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vllm_duogpt.calibrate.blocks import (
    LayerCall,
    LinearGroup,
    block_output,
    capture_hook,
    hooks,
    linear_groups,
    run_until_captured,
    sparsify_hook,
)
from vllm_duogpt.calibrate.config import CalibrationConfig
from vllm_duogpt.calibrate.memory import MemoryPlan
from vllm_duogpt.calibrate.solver import (
    LayerStats,
    SolveResult,
    accumulate,
    init_stats,
    prune_duogpt,
    prune_magnitude,
    prune_wanda,
)
from vllm_duogpt.calibrate.thresholds import ThresholdEstimator


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


class BlockCalibrator:
    """Calibrates blocks one after another, advancing the two trajectories it holds in place."""

    def __init__(
        self,
        config: CalibrationConfig,
        device: torch.device,
        calls: list[LayerCall],
        dense: torch.Tensor,
        pruned: torch.Tensor,
        plan: MemoryPlan,
    ) -> None:
        self.config = config
        self.device = device
        self.calls = calls
        self.dense = dense
        self.pruned = pruned
        self.plan = plan
        self.held_peak = 0

    def _sample(self, trajectory: torch.Tensor, s: int) -> torch.Tensor:
        return trajectory[s : s + 1].to(self.device)

    def _hold(self, extra: int) -> None:
        self.held_peak = max(
            self.held_peak, self.plan.trajectories + self.plan.block + self.plan.activations + extra
        )

    @torch.no_grad()
    def threshold(self, block: nn.Module, group: LinearGroup, call: LayerCall, seed: int) -> float:
        """Section 3 threshold of the group's input, on the pruned path as it now runs."""
        if self.config.act_sparsity == 0.0:
            return 0.0
        estimator = ThresholdEstimator(self.config.act_sparsity, self.config.nsamples, seed)
        with hooks([group.modules[0].register_forward_pre_hook(capture_hook(estimator.update))]):
            for s in range(self.config.nsamples):
                run_until_captured(block, self._sample(self.pruned, s), call)
        return estimator.threshold()

    @torch.no_grad()
    def statistics(
        self, dense_block: nn.Module, block: nn.Module, group: LinearGroup, call: LayerCall
    ) -> LayerStats:
        """Stream every sample through both paths into H, G, a of the group's input (4, 6.3)."""
        k = group.in_features
        stats = init_stats(k, self.device)
        self._hold(2 * k * k * 4)
        residual = self.config.method == "duogpt"
        seen: dict[str, torch.Tensor] = {}

        def keep(key: str) -> Callable[[torch.Tensor], None]:
            return lambda x: seen.__setitem__(key, x)

        # Registered after the group's sparsify hooks, so it sees X^ already thresholded.
        handles = [group.modules[0].register_forward_pre_hook(capture_hook(keep("hat")))]
        dense_first = dense_block.get_submodule(group.names[0])
        handles.append(dense_first.register_forward_pre_hook(capture_hook(keep("dense"))))
        with hooks(handles):
            for s in range(self.config.nsamples):
                if residual:
                    run_until_captured(dense_block, self._sample(self.dense, s), call)
                run_until_captured(block, self._sample(self.pruned, s), call)
                x_dense = seen["dense"].reshape(-1, k) if residual else None
                accumulate(stats, seen["hat"].reshape(-1, k), x_dense)
        return stats

    def solve(self, weight: torch.Tensor, stats: LayerStats | None) -> SolveResult | None:
        """Prune one weight with the configured method (None: weights stay as they are)."""
        cfg = self.config
        if cfg.weight_sparsity == 0.0:
            return None
        pattern = cfg.solver_pattern
        if cfg.method == "magnitude":
            return prune_magnitude(weight, cfg.weight_sparsity, pattern)
        assert stats is not None
        if cfg.method == "wanda":
            return prune_wanda(weight, stats, cfg.weight_sparsity, pattern)
        alpha = cfg.alpha if cfg.method == "duogpt" else 0.0
        return prune_duogpt(
            weight, stats, cfg.weight_sparsity, pattern, alpha,
            blocksize=cfg.blocksize, percdamp=cfg.percdamp, lazy_values=cfg.lazy_values,
        )  # fmt: skip

    @torch.no_grad()
    def advance(
        self, dense_block: nn.Module, block: nn.Module, call: LayerCall
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Run both paths through the finished block (in place) and measure every linear.

        Returns:
            ``(rel_error, act_sparsity)`` by linear name relative to the block.
        """
        dense_out: dict[str, torch.Tensor] = {}
        err: dict[str, torch.Tensor] = {}
        ref: dict[str, torch.Tensor] = {}
        zeros: dict[str, int] = {}
        total: dict[str, int] = {}

        def on_dense(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                dense_out[name] = output

            return hook

        def on_pruned(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                target = dense_out.pop(name)
                diff = (output - target).double().square().sum()
                err[name] = err.get(name, 0) + diff
                ref[name] = ref.get(name, 0) + target.double().square().sum()
                zeros[name] = zeros.get(name, 0) + int((args[0] == 0).sum())
                total[name] = total.get(name, 0) + args[0].numel()

            return hook

        names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        handles = [dense_block.get_submodule(n).register_forward_hook(on_dense(n)) for n in names]
        handles += [block.get_submodule(n).register_forward_hook(on_pruned(n)) for n in names]
        with hooks(handles):
            for s in range(self.config.nsamples):
                out_dense = block_output(dense_block, self._sample(self.dense, s), call)
                out_pruned = block_output(block, self._sample(self.pruned, s), call)
                self.dense[s].copy_(out_dense[0])
                self.pruned[s].copy_(out_pruned[0])
        rel = {n: float((err[n] / ref[n].clamp_min(1e-30)).sqrt()) for n in names}
        act = {n: zeros[n] / max(total[n], 1) for n in names}
        return rel, act

    @torch.no_grad()
    def block(self, index: int, cpu_block: nn.Module) -> tuple[list[LinearReport], list[str]]:
        """Calibrate one decoder block in place (its linear weights are overwritten)."""
        call = self.calls[index].to(self.device)
        dense_block = copy.deepcopy(cpu_block).to(device=self.device, dtype=torch.float32)
        block = copy.deepcopy(dense_block)
        self._hold(0)
        groups = linear_groups(block, self._sample(self.pruned, 0), call)
        solving = self.config.weight_sparsity > 0 and self.config.method != "magnitude"
        reports: list[LinearReport] = []
        notes: list[str] = []
        sparsify: list[torch.utils.hooks.RemovableHandle] = []
        with hooks(sparsify):
            for g, group in enumerate(groups):
                start = time.perf_counter()
                seed = _derived_seed(self.config.seed, index, g)
                tau = self.threshold(block, group, call, seed)
                if tau > 0.0:
                    hook = sparsify_hook(tau)
                    sparsify += [m.register_forward_pre_hook(hook) for m in group.modules]
                stats = self.statistics(dense_block, block, group, call) if solving else None
                shared = time.perf_counter() - start
                for name, module in zip(group.names, group.modules, strict=True):
                    t0 = time.perf_counter()
                    result = self.solve(module.weight, stats)
                    loss, damping = 0.0, 0.0
                    if result is not None:
                        module.weight.copy_(result.W)
                        notes += [f"{name}: {w}" for w in result.warnings]
                        loss, damping = result.loss, result.damping_used
                    del result  # its W and mask would double the block's footprint
                    weight = module.weight
                    reports.append(
                        LinearReport(
                            name=name,
                            shape=(weight.shape[0], weight.shape[1]),
                            seconds=shared + time.perf_counter() - t0,
                            loss=loss,
                            rel_error=float("nan"),
                            weight_sparsity=float((weight == 0).sum()) / weight.numel(),
                            act_sparsity=float("nan"),
                            threshold=tau,
                            damping=damping,
                        )
                    )
                del stats
            rel, act = self.advance(dense_block, block, call)
        for r in reports:
            r.rel_error, r.act_sparsity = rel[r.name], act[r.name]
            target = cpu_block.get_submodule(r.name).weight
            target.copy_(block.get_submodule(r.name).weight.to(target.device, target.dtype))
        return reports, notes
