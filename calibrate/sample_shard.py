"""The per-sample work of calibrating one decoder block, over one slice of the samples.

A :class:`SampleShard` holds a slice of both trajectories (the dense and the pruned path's inputs
to the block) and fp32 copies of the block (the dense one, and the working one the driver prunes),
and runs every pass that streams samples: the threshold capture, the statistics, and the final
pass that advances the trajectories. Its results are partial (values, sums) so that the driver
combines the shards' results the same way whether there is one shard in this process or one per
Ray worker (``ray_pool``); the math is in ``solver`` and ``thresholds`` either way.
"""

from __future__ import annotations

import copy
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
from vllm_duogpt.calibrate.solver import LayerStats, accumulate, init_stats
from vllm_duogpt.calibrate.thresholds import ThresholdEstimator


@dataclass
class OutputSums:
    """One linear's output error over a shard's samples (sums, so shards add up).

    Attributes:
        err: ``sum ||y_pruned - y_dense||^2``.
        ref: ``sum ||y_dense||^2``.
        zeros: input entries that were exactly zero on the pruned path.
        total: input entries seen.
    """

    err: float = 0.0
    ref: float = 0.0
    zeros: int = 0
    total: int = 0

    def add(self, other: OutputSums) -> None:
        self.err += other.err
        self.ref += other.ref
        self.zeros += other.zeros
        self.total += other.total


class SampleShard:
    """One block's sample passes over samples ``first_sample ..`` of the calibration set.

    Args:
        nsamples: samples in the whole calibration set (the threshold estimator's budget).
        device: where the block runs (fp32).
        call: the block's call arguments (rotary embeddings, masks) for one sample.
        cpu_block: the block as it is in the model; copied, never modified.
        dense, pruned: ``[n, seqlen, hidden]`` slices of the two trajectories, advanced in place
            by :meth:`advance`.
        first_sample: index of the slice's first sample in the calibration set.
    """

    def __init__(
        self,
        nsamples: int,
        device: torch.device,
        call: LayerCall,
        cpu_block: nn.Module,
        dense: torch.Tensor,
        pruned: torch.Tensor,
        first_sample: int,
    ) -> None:
        if len(dense) == 0 or dense.shape != pruned.shape:
            raise ValueError(f"bad trajectory slices {tuple(dense.shape)} / {tuple(pruned.shape)}")
        self.nsamples = nsamples
        self.device = device
        self.call = call.to(device)
        self.dense = dense
        self.pruned = pruned
        self.first_sample = first_sample
        self.dense_block = copy.deepcopy(cpu_block).to(device=device, dtype=torch.float32)
        self.block = copy.deepcopy(self.dense_block)
        self.groups: list[LinearGroup] = linear_groups(
            self.block, self._sample(pruned, 0), self.call
        )
        self._sparsify: list[torch.utils.hooks.RemovableHandle] = []

    def _sample(self, trajectory: torch.Tensor, s: int) -> torch.Tensor:
        return trajectory[s : s + 1].to(self.device)

    @property
    def group_names(self) -> list[list[str]]:
        """The block's linears grouped by shared input, in call order."""
        return [list(g.names) for g in self.groups]

    @torch.no_grad()
    def threshold_values(self, group: int, sparsity: float, seed: int) -> torch.Tensor:
        """The threshold estimator's kept ``|x|`` of the group's input on the pruned path."""
        estimator = ThresholdEstimator(sparsity, self.nsamples, seed)
        current = {"sample": 0}
        first = self.groups[group].modules[0]
        handle = first.register_forward_pre_hook(
            capture_hook(lambda x: estimator.update(x, current["sample"]))
        )
        with hooks([handle]):
            for s in range(len(self.pruned)):
                current["sample"] = self.first_sample + s
                run_until_captured(self.block, self._sample(self.pruned, s), self.call)
        return estimator.values

    def sparsify(self, group: int, threshold: float) -> None:
        """Zero the group's input below ``threshold`` from now on (pruned path only)."""
        hook = sparsify_hook(threshold)
        self._sparsify += [m.register_forward_pre_hook(hook) for m in self.groups[group].modules]

    @torch.no_grad()
    def statistics(self, group: int, residual: bool) -> LayerStats:
        """H, G, a of the group's input over this shard's samples (method.md 4, 6.3).

        ``X^`` comes from the pruned path after the group's threshold, ``X~`` from the dense path
        (only when ``residual``: the baselines need H alone).
        """
        members = self.groups[group]
        k = members.in_features
        stats = init_stats(k, self.device)
        seen: dict[str, torch.Tensor] = {}

        def keep(key: str) -> Callable[[torch.Tensor], None]:
            return lambda x: seen.__setitem__(key, x)

        # Registered after the group's sparsify hooks, so it sees X^ already thresholded.
        handles = [members.modules[0].register_forward_pre_hook(capture_hook(keep("hat")))]
        dense_first = self.dense_block.get_submodule(members.names[0])
        handles.append(dense_first.register_forward_pre_hook(capture_hook(keep("dense"))))
        with hooks(handles):
            for s in range(len(self.pruned)):
                if residual:
                    run_until_captured(self.dense_block, self._sample(self.dense, s), self.call)
                run_until_captured(self.block, self._sample(self.pruned, s), self.call)
                x_dense = seen["dense"].reshape(-1, k) if residual else None
                accumulate(stats, seen["hat"].reshape(-1, k), x_dense)
        return stats

    @torch.no_grad()
    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Write pruned weights (by linear name relative to the block) into the working block."""
        for name, weight in weights.items():
            self.block.get_submodule(name).weight.copy_(weight)

    @torch.no_grad()
    def advance(self) -> dict[str, OutputSums]:
        """Run both paths through the finished block, overwriting the trajectory slices.

        Returns:
            Each linear's output error sums over this shard, by name relative to the block.
        """
        dense_out: dict[str, torch.Tensor] = {}
        sums: dict[str, OutputSums] = {}

        def on_dense(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                dense_out[name] = output

            return hook

        def on_pruned(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                target = dense_out.pop(name)
                sums.setdefault(name, OutputSums()).add(
                    OutputSums(
                        err=float((output - target).double().square().sum()),
                        ref=float(target.double().square().sum()),
                        zeros=int((args[0] == 0).sum()),
                        total=args[0].numel(),
                    )
                )

            return hook

        names = [n for n, m in self.block.named_modules() if isinstance(m, nn.Linear)]
        handles = [
            self.dense_block.get_submodule(n).register_forward_hook(on_dense(n)) for n in names
        ]
        handles += [self.block.get_submodule(n).register_forward_hook(on_pruned(n)) for n in names]
        # The group thresholds' hooks go too: the block is finished.
        sparsify, self._sparsify = self._sparsify, []
        with hooks(handles + sparsify):
            for s in range(len(self.pruned)):
                out_dense = block_output(self.dense_block, self._sample(self.dense, s), self.call)
                out_pruned = block_output(self.block, self._sample(self.pruned, s), self.call)
                self.dense[s].copy_(out_dense[0])
                self.pruned[s].copy_(out_pruned[0])
        return sums
