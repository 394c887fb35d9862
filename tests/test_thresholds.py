"""Activation thresholds (method.md section 3): the exact quantile and its streaming estimate."""

from __future__ import annotations

import pytest
import torch

from vllm_duogpt.calibrate.thresholds import (
    ThresholdEstimator,
    fraction_below,
    threshold_for_sparsity,
)


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_exact_threshold_hits_the_fraction(sparsity):
    x = torch.randn(1000, 37, generator=torch.Generator().manual_seed(0))
    tau = threshold_for_sparsity(x.abs(), sparsity)
    assert fraction_below(x, tau) == pytest.approx(sparsity, abs=1 / x.numel())


def test_zero_sparsity_means_no_threshold():
    assert threshold_for_sparsity(torch.rand(10), 0.0) == 0.0
    estimator = ThresholdEstimator(0.0, expected_updates=2, seed=0)
    estimator.update(torch.randn(5), 0)
    assert estimator.threshold() == 0.0


def test_streaming_is_exact_when_everything_fits():
    g = torch.Generator().manual_seed(1)
    samples = [torch.randn(16, 40, generator=g) for _ in range(5)]
    estimator = ThresholdEstimator(0.5, expected_updates=5, seed=0, max_values=5 * 640)
    for i, s in enumerate(samples):
        estimator.update(s, i)
    assert estimator.kept == 5 * 640
    assert estimator.threshold() == threshold_for_sparsity(torch.cat(samples).abs(), 0.5)


def test_subsample_is_bounded_close_and_seeded():
    g = torch.Generator().manual_seed(2)
    samples = [torch.randn(256, 512, generator=g) * (i + 1) for i in range(8)]
    everything = torch.cat([s.flatten() for s in samples])

    def estimate(seed: int) -> tuple[float, int]:
        estimator = ThresholdEstimator(0.5, expected_updates=8, seed=seed, max_values=1 << 16)
        for i, s in enumerate(samples):
            estimator.update(s, i)
        return estimator.threshold(), estimator.kept

    tau, kept = estimate(0)
    assert kept == 1 << 16
    # Standard error sqrt(0.25 / 65536) = 0.002: allow 5 sigma.
    assert fraction_below(everything, tau) == pytest.approx(0.5, abs=0.01)
    assert estimate(0)[0] == tau
    assert estimate(1)[0] != tau


def test_shards_keep_what_one_estimator_keeps():
    """Splitting the samples over estimators (Ray workers) keeps the same values."""
    g = torch.Generator().manual_seed(3)
    samples = [torch.randn(64, 96, generator=g) for _ in range(6)]

    def estimator_over(indices: list[int]) -> ThresholdEstimator:
        estimator = ThresholdEstimator(0.5, expected_updates=6, seed=7, max_values=6 * 500)
        for i in indices:
            estimator.update(samples[i], i)
        return estimator

    whole = estimator_over(list(range(6)))
    shards = [estimator_over([0, 1, 2]), estimator_over([3, 4, 5])]
    merged = torch.cat([s.values for s in shards])
    assert whole.kept == 6 * 500
    assert torch.equal(merged, whole.values)
    assert threshold_for_sparsity(merged, 0.5) == whole.threshold()


def test_bad_sparsity_is_rejected():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        threshold_for_sparsity(torch.rand(4), 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ThresholdEstimator(-0.1, expected_updates=1, seed=0)
