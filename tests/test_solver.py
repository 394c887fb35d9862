"""DuoGPT solver invariants (method.md section 5) against an independent SparseGPT and the data."""

from __future__ import annotations

import pytest
import torch

from vllm_duogpt.calibrate.solver import (
    LayerStats,
    SolverError,
    accumulate,
    init_stats,
    merge_stats,
    prune_duogpt,
    prune_magnitude,
    prune_wanda,
)
from vllm_duogpt.calibrate.thresholds import threshold_for_sparsity
from vllm_duogpt.kernels.reference import sparsify_activations


def correlated_inputs(m: int, k: int, seed: int, act_sparsity: float = 0.5):
    """Dense inputs with correlated, unevenly scaled channels and their thresholded version."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    scales = torch.rand(k, generator=g) * 3 + 0.1
    x_dense = (torch.randn(m, k, generator=g) * scales) @ mixing
    tau = threshold_for_sparsity(x_dense.abs(), act_sparsity)
    return x_dense, sparsify_activations(x_dense, tau)


def stats_of(x_hat: torch.Tensor, x_dense: torch.Tensor | None, chunk: int = 300) -> LayerStats:
    stats = init_stats(x_hat.shape[1])
    for i in range(0, x_hat.shape[0], chunk):
        accumulate(stats, x_hat[i : i + chunk], None if x_dense is None else x_dense[i : i + chunk])
    return stats


def objective(W_new, W, x_hat, x_dense) -> float:
    """``||W' X^ - W X~||^2`` on the data itself."""
    diff = x_hat.double() @ W_new.double().T - x_dense.double() @ W.double().T
    return float(diff.square().sum())


def reference_sparsegpt(W, H, sparsity, blocksize=128, percdamp=0.01, nm=None):
    """Plain SparseGPT: explicit inverse, column-by-column full updates, threshold masks."""
    W = W.clone().float()
    H = H.clone()
    k = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(k)
    U = torch.linalg.cholesky(torch.linalg.inv(H)).T  # H^-1 = U^T U
    mask = torch.zeros_like(W, dtype=torch.bool)
    for col in range(k):
        if nm is None and col % blocksize == 0:
            cols = slice(col, min(col + blocksize, k))
            score = W[:, cols] ** 2 / torch.diag(U)[cols] ** 2
            n_prune = int(score.numel() * sparsity)
            if n_prune:
                mask[:, cols] = score <= score.flatten().sort().values[n_prune - 1]
        if nm is not None and col % nm[1] == 0:
            cols = slice(col, col + nm[1])
            score = W[:, cols] ** 2 / torch.diag(U)[cols] ** 2
            ranks = score.argsort(dim=1).argsort(dim=1)
            mask[:, cols] = ranks < nm[1] - nm[0]
        w = W[:, col].clone()
        q = torch.where(mask[:, col], torch.zeros_like(w), w)
        W[:, col:] -= torch.outer((w - q) / U[col, col], U[col, col:])
        W[:, col] = q
    return W, mask


def test_accumulate_matches_one_shot_formulas():
    x_dense, x_hat = correlated_inputs(1000, 48, seed=1)
    stats = stats_of(x_hat, x_dense, chunk=137)
    dx = x_dense - x_hat
    assert stats.nsamples == 1000
    torch.testing.assert_close(stats.H, 2 / 1000 * x_hat.T @ x_hat, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.G, 2 / 1000 * dx.T @ x_hat, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.a, 2 / 1000 * dx.square().sum(0), rtol=1e-4, atol=1e-4)


def test_merged_shards_match_one_stream():
    """Statistics of disjoint token sets (Ray workers) merge into those of the whole stream."""
    x_dense, x_hat = correlated_inputs(1000, 48, seed=4)
    whole = stats_of(x_hat, x_dense, chunk=100)
    parts = [stats_of(x_hat[:300], x_dense[:300], 100), stats_of(x_hat[300:], x_dense[300:], 100)]
    merged = merge_stats(parts)
    assert merged.nsamples == 1000
    for name in ("H", "G", "a"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name))
    assert merge_stats([whole]) is whole
    with pytest.raises(ValueError, match="different sizes"):
        merge_stats([whole, stats_of(x_hat[:, :8], x_dense[:, :8])])


@pytest.mark.parametrize("pattern", ["unstructured", (2, 4)])
@pytest.mark.parametrize("act_sparsity", [0.0, 0.5])
def test_alpha_zero_is_sparsegpt(pattern, act_sparsity):
    # p_x = 0: dX = 0, the problem is SparseGPT's. p_x > 0 with alpha = 0: G must drop out.
    x_dense, x_hat = correlated_inputs(1200, 200, seed=2, act_sparsity=act_sparsity)
    if act_sparsity == 0.0:
        x_hat = x_dense
    stats = stats_of(x_hat, x_dense)
    W = torch.randn(24, 200, generator=torch.Generator().manual_seed(3))
    result = prune_duogpt(W, stats, 0.5, pattern, alpha=0.0, blocksize=128)
    nm = None if pattern == "unstructured" else pattern
    ref_W, ref_mask = reference_sparsegpt(W, stats.H, 0.5, blocksize=128, nm=nm)
    assert torch.equal(result.mask, ref_mask)
    torch.testing.assert_close(result.W, ref_W, rtol=1e-4, atol=1e-4)
    assert result.warnings == []


def test_every_block_has_exactly_the_target_zeros():
    x_dense, x_hat = correlated_inputs(800, 300, seed=4)
    W = torch.randn(40, 300, generator=torch.Generator().manual_seed(5))
    for sparsity in (0.5, 0.7):
        result = prune_duogpt(W, stats_of(x_hat, x_dense), sparsity, alpha=0.25, blocksize=128)
        for i1 in range(0, 300, 128):
            block = result.W[:, i1 : i1 + 128]
            assert int((block == 0).sum()) == int(block.numel() * sparsity)
        assert torch.equal(result.W == 0, result.mask)


@pytest.mark.parametrize("pattern", [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_holds(pattern):
    n_keep, m_group = pattern
    x_dense, x_hat = correlated_inputs(600, 64, seed=6)
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(7))
    result = prune_duogpt(W, stats_of(x_hat, x_dense), 0.0, pattern, alpha=0.25, blocksize=32)
    zeros = (result.W == 0).reshape(16, 64 // m_group, m_group).sum(-1)
    assert bool((zeros == m_group - n_keep).all())


def test_no_pruning_with_alpha_lowers_the_loss():
    x_dense, x_hat = correlated_inputs(2000, 96, seed=8)
    W = torch.randn(32, 96, generator=torch.Generator().manual_seed(9))
    before = objective(W, W, x_hat, x_dense)
    result = prune_duogpt(W, stats_of(x_hat, x_dense), 0.0, alpha=0.5)
    after = objective(result.W, W, x_hat, x_dense)
    assert after < 0.97 * before
    # The reported loss is the same objective change, on the statistics' 2/m scale.
    assert result.loss == pytest.approx((after - before) * 2 / 2000, rel=1e-3)
    assert not result.mask.any()


def test_duogpt_beats_sparsegpt_then_sparsify():
    x_dense, x_hat = correlated_inputs(3000, 128, seed=10)
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(11))
    # SparseGPT on the dense model, activation sparsity switched on afterwards.
    plain = prune_duogpt(W, stats_of(x_dense, None), 0.5, alpha=0.0)
    # SparseGPT with the activation-aware Hessian (the pipeline's sparsegpt baseline).
    aware = prune_duogpt(W, stats_of(x_hat, None), 0.5, alpha=0.0)
    duo = prune_duogpt(W, stats_of(x_hat, x_dense), 0.5, alpha=0.25)
    loss_plain = objective(plain.W, W, x_hat, x_dense)
    loss_aware = objective(aware.W, W, x_hat, x_dense)
    loss_duo = objective(duo.W, W, x_hat, x_dense)
    assert loss_duo < loss_aware < loss_plain
    assert duo.loss == pytest.approx(
        (loss_duo - objective(W, W, x_hat, x_dense)) * 2 / 3000, rel=1e-3
    )


def test_lazy_values_pre_mask_is_blocksize_invariant():
    # With N:M masks chosen column group by column group, the sweep with pre-mask values equals
    # the unblocked sweep whatever B is; the authors' post-mask variant does not.
    x_dense, x_hat = correlated_inputs(1500, 128, seed=12)
    stats = stats_of(x_hat, x_dense)
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(13))
    pre = [prune_duogpt(W, stats, 0.5, (2, 4), 0.5, blocksize=b) for b in (16, 128)]
    post = [prune_duogpt(W, stats, 0.5, (2, 4), 0.5, blocksize=b, lazy_values="post_mask")
            for b in (16, 128)]  # fmt: skip
    torch.testing.assert_close(pre[0].W, pre[1].W, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(post[0].W, post[1].W, rtol=1e-4, atol=1e-4)
    # One block: nothing is propagated lazily, so the variants coincide.
    torch.testing.assert_close(post[1].W, pre[1].W, rtol=1e-5, atol=1e-5)
    for r in (*pre, *post):
        assert bool(torch.isfinite(r.W).all())
        zeros = (r.W == 0).reshape(32, 32, 4).sum(-1)
        assert bool((zeros == 2).all())
    # Both lower the objective against the activation-aware SparseGPT.
    base = objective(prune_duogpt(W, stats, 0.5, (2, 4), 0.0, blocksize=16).W, W, x_hat, x_dense)
    assert objective(pre[0].W, W, x_hat, x_dense) < base
    assert objective(post[0].W, W, x_hat, x_dense) < base


def test_cholesky_failure_raises_damping_without_nan():
    k = 16
    g = torch.Generator().manual_seed(14)
    basis, _ = torch.linalg.qr(torch.randn(k, k, generator=g))
    eigs = torch.ones(k)
    eigs[0] = -0.05  # damping 0.01 x mean(diag) fails, 0.1 x succeeds
    H = basis @ torch.diag(eigs) @ basis.T
    stats = LayerStats(H=H, G=torch.zeros(k, k), a=torch.zeros(k), nsamples=100)
    W = torch.randn(8, k, generator=g)
    result = prune_duogpt(W, stats, 0.5, alpha=0.25)
    mean_diag = float(torch.diag(H).mean())
    assert result.damping_used == pytest.approx(0.1 * mean_diag, rel=1e-5)
    assert any("damping raised" in w for w in result.warnings)
    assert bool(torch.isfinite(result.W).all()) and torch.isfinite(torch.tensor(result.loss))


def test_hopeless_hessian_raises_solver_error():
    H = torch.tensor([[1.0, 1000.0], [1000.0, 1.0]])
    stats = LayerStats(H=H, G=torch.zeros(2, 2), a=torch.zeros(2), nsamples=10)
    with pytest.raises(SolverError, match="damping"):
        prune_duogpt(torch.ones(2, 2), stats, 0.5)


def test_dead_inputs_are_zeroed_and_finite():
    x_dense, x_hat = correlated_inputs(500, 64, seed=15)
    x_hat[:, [3, 17, 40]] = 0.0
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(16))
    for alpha in (0.0, 0.25):
        result = prune_duogpt(W, stats_of(x_hat, x_dense), 0.5, alpha=alpha)
        assert bool(torch.isfinite(result.W).all())
        assert bool((result.W[:, [3, 17, 40]] == 0).all())
        assert any("dead inputs" in w for w in result.warnings)


def test_wanda_prunes_smallest_weight_times_input_norm_per_row():
    x_dense, x_hat = correlated_inputs(400, 64, seed=17)
    W = torch.randn(12, 64, generator=torch.Generator().manual_seed(18))
    result = prune_wanda(W, stats_of(x_hat, None), 0.5)
    score = W.abs() * x_hat.norm(dim=0)
    expected = score <= score.sort(dim=1).values[:, 31:32]
    assert torch.equal(result.mask, expected)
    assert torch.equal(result.W, W.masked_fill(expected, 0.0))
    nm = prune_wanda(W, stats_of(x_hat, None), 0.5, (2, 4))
    assert bool(((nm.W == 0).reshape(12, 16, 4).sum(-1) == 2).all())


def test_magnitude_prunes_globally_smallest():
    W = torch.randn(20, 50, generator=torch.Generator().manual_seed(19))
    result = prune_magnitude(W, 0.6)
    assert int(result.mask.sum()) == 600
    assert float(W.abs()[result.mask].max()) <= float(W.abs()[~result.mask].min())
    assert torch.isnan(torch.tensor(result.loss))


def test_tf32_setting_is_restored():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        x_dense, x_hat = correlated_inputs(200, 32, seed=20)
        prune_duogpt(torch.randn(4, 32), stats_of(x_hat, x_dense), 0.5)
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
