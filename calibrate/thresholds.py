"""Per-input activation thresholds: the static rule of method.md section 3.

One magnitude threshold ``tau`` per sparsified input, chosen so that a fraction ``p_x`` of the
calibration entries has ``|x| < tau``; at run time ``x_j := 0`` where ``|x_j| < tau``.

The exact quantile over all calibration entries does not fit in memory for real models (the
down-projection input of an 8B model over 128 x 2048 tokens is 3.7e9 values), so the estimator
keeps a bounded sample: every calibration sample contributes the same number of ``|x|`` values,
drawn uniformly at random (with replacement) from a generator seeded per sample. When the whole
calibration set fits in the budget (``max_values``, 2^24 = 64 MiB of fp32 by default) it keeps
every entry and the quantile is exact. At 2^24 values the standard error of the achieved fraction is
``sqrt(p (1 - p) / 2^24)``, about 1.2e-4 at ``p = 0.5``.

The draws happen on the CPU generator and are then moved to the activations' device, so the same
seed picks the same entries on CPU and GPU.
"""

from __future__ import annotations

import torch

DEFAULT_MAX_VALUES = 1 << 24


def threshold_for_sparsity(magnitudes: torch.Tensor, sparsity: float) -> float:
    """The threshold below which a fraction ``sparsity`` of ``magnitudes`` lies.

    Args:
        magnitudes: ``|x|`` values, any shape, non-empty.
        sparsity: target fraction ``p_x`` in ``[0, 1)``.

    Returns:
        ``tau`` with ``#(magnitudes < tau) = round(sparsity * N)`` when the values are distinct;
        ``0.0`` for ``sparsity == 0`` (nothing is ever zeroed).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"activation sparsity must be in [0, 1), got {sparsity}")
    if sparsity == 0.0:
        return 0.0
    flat = magnitudes.detach().flatten().to(torch.float32)
    if flat.numel() == 0:
        raise ValueError("no activation values to calibrate a threshold on")
    # The (j+1)-th smallest value: exactly j values lie strictly below it (no ties).
    j = min(round(sparsity * flat.numel()), flat.numel() - 1)
    return float(torch.kthvalue(flat.cpu(), j + 1).values)


class ThresholdEstimator:
    """Bounded-memory streaming estimate of one input's activation threshold.

    Each calibration sample draws its entries from its own generator, seeded by ``seed`` and the
    sample's index, so the kept values do not depend on which process saw which samples: shards
    of the calibration set (the Ray workers) each keep their part, and the threshold of the
    concatenated :attr:`values` is the one a single process computes.

    Args:
        sparsity: target fraction ``p_x`` of entries below the threshold.
        expected_updates: how many samples the whole calibration set has; each may contribute
            ``max_values / expected_updates`` values.
        seed: seed of the subsampling (the driver derives it from block and input, so a resumed
            run draws the same entries).
        max_values: about the most values kept in total (over all shards).
    """

    def __init__(
        self,
        sparsity: float,
        expected_updates: int,
        seed: int,
        max_values: int = DEFAULT_MAX_VALUES,
    ) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"activation sparsity must be in [0, 1), got {sparsity}")
        if expected_updates < 1 or max_values < 1:
            raise ValueError("expected_updates and max_values must be positive")
        self.sparsity = sparsity
        self.quota = max(1, max_values // expected_updates)
        self.seed = seed
        self._chunks: list[torch.Tensor] = []

    def update(self, x: torch.Tensor, sample: int) -> None:
        """Record the magnitudes of calibration sample number ``sample`` (any shape)."""
        if self.sparsity == 0.0:
            return
        flat = x.detach().reshape(-1)
        if flat.numel() > self.quota:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + sample)
            idx = torch.randint(flat.numel(), (self.quota,), generator=generator)
            flat = flat[idx.to(flat.device)]
        self._chunks.append(flat.abs().to(device="cpu", dtype=torch.float32))

    @property
    def values(self) -> torch.Tensor:
        """The kept magnitudes (fp32, CPU), in update order."""
        if not self._chunks:
            return torch.empty(0)
        return torch.cat(self._chunks)

    @property
    def kept(self) -> int:
        """How many magnitudes are held."""
        return sum(c.numel() for c in self._chunks)

    def threshold(self) -> float:
        """The threshold for the values recorded so far.

        Raises:
            ValueError: nothing was recorded and the sparsity is not 0.
        """
        if self.sparsity == 0.0:
            return 0.0
        if not self._chunks:
            raise ValueError("no activations recorded for the threshold")
        return threshold_for_sparsity(self.values, self.sparsity)


def fraction_below(x: torch.Tensor, threshold: float) -> float:
    """Fraction of entries of ``x`` that the runtime rule zeroes (``|x| < threshold``)."""
    if x.numel() == 0:
        return 0.0
    return float((x.abs() < threshold).sum()) / x.numel()
