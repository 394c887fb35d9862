"""The DuoGPT one-shot solver: statistics, the residual-aware OBS column sweep, and baselines.

Pure functions on tensors (no modules, hooks, devices or logging), in the paper's notation
(method.md sections 4-5). For one linear ``W`` (``n`` outputs x ``k`` inputs):

- ``X^``: its input on the pruned path (sparsified), ``X~``: its input in the dense model;
- ``H = X^ X^^T``, ``G = dX X^^T``, ``a = diag(dX dX^T)`` with ``dX = X~ - X^`` (section 4);
- the solver minimises ``||W' X^ - W X~||^2`` row by row under the sparsity mask (section 5).

Baselines share the statistics: SparseGPT is the sweep with ``alpha = 0`` (the residual term and
``G`` drop out), Wanda and magnitude pruning are masks without weight updates.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch

Pattern = Literal["unstructured"] | tuple[int, int]
LazyValues = Literal["pre_mask", "post_mask"]

MAX_DAMPING_RETRIES = 4


class SolverError(RuntimeError):
    """The factorisation failed even after raising the damping."""


@dataclass
class LayerStats:
    """Streaming calibration statistics of one linear input (method.md section 4).

    Every entry is normalised by the running token count like SparseGPT's Hessian
    (``2 / tokens * sum``), so the three are on the same scale and their ratios are what matter.

    Attributes:
        H: ``[k, k]`` activation-aware Hessian ``X^ X^^T``.
        G: ``[k, k]`` cross term ``dX X^^T``.
        a: ``[k]`` residual energy per input, ``diag(dX dX^T)``.
        nsamples: tokens accumulated so far.
    """

    H: torch.Tensor
    G: torch.Tensor
    a: torch.Tensor
    nsamples: int = 0


@dataclass
class SolveResult:
    """Outcome of pruning one weight.

    Attributes:
        loss: change of the calibration objective ``||W' X^ - W X~||^2`` (statistics' scale)
            against leaving ``W`` untouched; for ``G = 0`` it is SparseGPT's pruning error.
        W: ``[n, k]`` fp32 pruned weight, pruned entries exactly zero.
        mask: ``[n, k]`` bool, True where the solver pruned.
        damping_used: the damping ``lambda`` finally added to ``diag(H)``.
        warnings: human-readable notes (raised damping, dead inputs) for the driver to log.
    """

    loss: float
    W: torch.Tensor
    mask: torch.Tensor
    damping_used: float
    warnings: list[str] = field(default_factory=list)


@contextmanager
def _fp32_matmul() -> Iterator[None]:
    # Section 5: the factorisation and the sweep are ill-conditioned; TF32's 10-bit mantissa
    # visibly changes the masks on GPU. Restore the caller's setting afterwards.
    prev_matmul = torch.backends.cuda.matmul.allow_tf32
    prev_cudnn = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_matmul
        torch.backends.cudnn.allow_tf32 = prev_cudnn


def init_stats(k: int, device: torch.device | str = "cpu") -> LayerStats:
    """Empty statistics for a linear with ``k`` inputs."""
    zeros = torch.zeros(k, k, dtype=torch.float32, device=device)
    return LayerStats(H=zeros, G=zeros.clone(), a=torch.zeros(k, device=device), nsamples=0)


# x_hat, x_dense: [m, k]
def accumulate(
    stats: LayerStats, x_hat: torch.Tensor, x_dense: torch.Tensor | None = None
) -> LayerStats:
    """Add ``m`` calibration tokens to the statistics (streaming, section 4).

    The tensors of ``stats`` are updated in place (a fresh ``k x k`` copy per sample would double
    peak memory on the largest layers) and ``stats`` is returned.

    Args:
        stats: statistics so far.
        x_hat: ``[m, k]`` inputs on the pruned path, already sparsified.
        x_dense: ``[m, k]`` the same tokens' inputs in the dense model; None leaves ``G`` and
            ``a`` untouched (baselines that do not use the residual).

    Returns:
        ``stats``, now covering ``nsamples + m`` tokens.
    """
    m, k = x_hat.shape
    if stats.H.shape != (k, k):
        raise ValueError(f"x_hat has {k} inputs but the statistics are for {stats.H.shape[0]}")
    if m == 0:
        return stats
    with _fp32_matmul():
        total = stats.nsamples + m
        keep = stats.nsamples / total
        scale = math.sqrt(2.0 / total)
        Xh = x_hat.to(torch.float32) * scale
        stats.H.mul_(keep).addmm_(Xh.T, Xh)
        if x_dense is not None:
            if x_dense.shape != x_hat.shape:
                raise ValueError(f"x_dense {tuple(x_dense.shape)} vs x_hat {tuple(x_hat.shape)}")
            dX = x_dense.to(torch.float32) * scale - Xh
            stats.G.mul_(keep).addmm_(dX.T, Xh)
            stats.a.mul_(keep).add_(dX.square().sum(0))
        else:
            stats.G.mul_(keep)
            stats.a.mul_(keep)
        stats.nsamples = total
    return stats


def merge_stats(parts: list[LayerStats]) -> LayerStats:
    """Statistics of the union of disjoint token sets, from each set's statistics.

    Each part is a token-weighted mean, so the union is ``sum(n_i * S_i) / sum(n_i)``; one part
    is returned as it is (the single-process path stays bit-identical). Equal to accumulating
    every token into one :class:`LayerStats` up to fp32 summation order.

    Raises:
        ValueError: no parts, or parts of different sizes.
    """
    if not parts:
        raise ValueError("no statistics to merge")
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if any(p.H.shape != first.H.shape for p in parts):
        raise ValueError(f"statistics of different sizes: {[tuple(p.H.shape) for p in parts]}")
    total = sum(p.nsamples for p in parts)
    merged = init_stats(first.H.shape[0], first.H.device)
    for p in parts:
        weight = p.nsamples / total
        merged.H.add_(p.H.to(merged.H.device), alpha=weight)
        merged.G.add_(p.G.to(merged.G.device), alpha=weight)
        merged.a.add_(p.a.to(merged.a.device), alpha=weight)
    merged.nsamples = total
    return merged


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float, list[str]]:
    """Section 5.1-5.2: damp ``H`` and return ``U`` with ``H^-1 = U^T U`` (U upper)."""
    k = H.shape[0]
    mean_diag = float(torch.diag(H).mean())
    damp = percdamp * mean_diag if percdamp > 0 else 0.0
    notes: list[str] = []
    idx = torch.arange(k, device=H.device)
    for attempt in range(MAX_DAMPING_RETRIES + 1):
        Hd = H.clone()
        Hd[idx, idx] += damp
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0 and bool(torch.isfinite(L).all()):
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                if attempt:
                    notes.append(
                        f"Cholesky failed; damping raised to {damp:.3g} "
                        f"({damp / mean_diag:.3g} x mean diag H) after {attempt} retries"
                    )
                return U, damp, notes
        # x10 per retry: the usual failure is a near-singular H from too few calibration tokens.
        damp = damp * 10.0 if damp > 0 else max(mean_diag, 1e-8) * 0.01
    raise SolverError(
        f"Cholesky of H failed even with damping {damp / 10:.3g}; "
        "use more calibration data (--nsamples/--seqlen) or a larger percdamp"
    )


def _nm(pattern: Pattern) -> tuple[int, int] | None:
    if pattern == "unstructured":
        return None
    n_keep, m_group = pattern
    if not 0 < n_keep < m_group:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {n_keep}:{m_group}")
    return n_keep, m_group


def _smallest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the ``count`` smallest entries of ``score`` (ties: lower index first)."""
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if count > 0:
        mask[torch.argsort(score.flatten(), stable=True)[:count]] = True
    return mask.view_as(score)


def _smallest_per_row(score: torch.Tensor, count: int) -> torch.Tensor:
    mask = torch.zeros_like(score, dtype=torch.bool)
    if count > 0:
        mask.scatter_(1, torch.argsort(score, dim=1, stable=True)[:, :count], True)
    return mask


# W: [n, k]
def prune_duogpt(
    W: torch.Tensor,
    stats: LayerStats,
    sparsity: float,
    pattern: Pattern = "unstructured",
    alpha: float = 0.25,
    blocksize: int = 128,
    percdamp: float = 0.01,
    lazy_values: LazyValues = "pre_mask",
) -> SolveResult:
    """Prune ``W`` with the residual-aware OBS sweep (method.md section 5).

    ``alpha = 0`` is SparseGPT exactly (same mask ordering, same updates).

    Args:
        W: ``[n, k]`` weight (not modified).
        stats: statistics of this linear's input.
        sparsity: fraction of each ``n x blocksize`` block to prune (unstructured).
        pattern: ``"unstructured"`` or ``(N, M)``: keep N of every M inputs per row (2:4 ->
            ``(2, 4)``); ``sparsity`` is then ignored.
        alpha: scale of the residual correction (section 5.6).
        blocksize: columns per lazy batch ``B`` (section 5.5); a multiple of M for N:M.
        percdamp: damping as a fraction of ``mean(diag H)`` (section 5.1).
        lazy_values: column values propagated through ``P`` after each block: ``"pre_mask"``
            (the values before masking, the same as inside the block, so the result does not
            depend on ``blocksize``) or ``"post_mask"`` (the authors' code: the masked values).

    Returns:
        The pruned weight, its mask, the objective change and the damping used.

    Raises:
        SolverError: the factorisation fails even after raising the damping.
        ValueError: inconsistent shapes or arguments.
    """
    n, k = W.shape
    if stats.H.shape != (k, k):
        raise ValueError(f"W has {k} inputs but the statistics are for {stats.H.shape[0]}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if lazy_values not in ("pre_mask", "post_mask"):
        raise ValueError(f"lazy_values must be 'pre_mask' or 'post_mask', got {lazy_values!r}")
    nm = _nm(pattern)
    if nm is not None and (blocksize % nm[1] or k % nm[1]):
        raise ValueError(f"N:M {nm[0]}:{nm[1]} needs blocksize ({blocksize}) and k ({k}) % M == 0")

    with _fp32_matmul():
        W0 = W.detach().to(torch.float32)
        W1 = W0.clone()
        H = stats.H.clone()
        notes: list[str] = []

        # 5.1: dead inputs never reach the output on the pruned path; pin them so H stays PD.
        dead = torch.diag(H) == 0
        if bool(dead.any()):
            H[dead, dead] = 1.0
            W1[:, dead] = 0.0
            notes.append(f"{int(dead.sum())} dead inputs (diag H == 0): their columns set to 0")

        # 5.2: upper Cholesky factor of H^-1.
        U, damp, damp_notes = _inverse_cholesky(H, percdamp)
        notes += damp_notes
        d = torch.diag(U)

        # 5.3-5.4: residual propagation P and the residual-aware saliency coefficient.
        use_residual = alpha != 0.0
        if use_residual:
            Q = stats.G @ U.T
            Qs = torch.triu(Q, diagonal=1)
            P = alpha * (Qs @ U)
            b = Qs.square().sum(1)
            c = torch.diag(Q) / d
            coef = alpha * (stats.a - b + 2.0 * c)
            del Q, Qs  # k x k each: the largest layers are memory-bound here
        else:
            P = None
            coef = None

        mask = torch.zeros(n, k, dtype=torch.bool, device=W1.device)

        def saliency(w_cols: torch.Tensor, cols: slice) -> torch.Tensor:
            score = w_cols.square() / d[cols].square()
            if coef is not None:
                score = score + w_cols.square() * coef[cols]
            return score

        # 5.5: column sweep in lazy blocks of B columns. The block is held transposed
        # ([B, n], "T" suffix) so each column and each trailing update is contiguous memory.
        for i1 in range(0, k, blocksize):
            i2 = min(i1 + blocksize, k)
            count = i2 - i1
            WbT = W1[:, i1:i2].T.contiguous()
            QbT = torch.empty_like(WbT)
            EbT = torch.empty_like(WbT)
            WpreT = torch.empty_like(WbT) if use_residual else None
            Ub = U[i1:i2, i1:i2]
            Pb = P[i1:i2, i1:i2] if P is not None else None
            if nm is None:
                # SparseGPT's adaptive mask: one threshold over the whole n x B block.
                score = saliency(WbT.T, slice(i1, i2))
                maskT = _smallest(score, int(score.numel() * sparsity)).T.contiguous()
            else:
                maskT = torch.zeros_like(WbT, dtype=torch.bool)
            for i in range(count):
                w = WbT[i].clone()
                if nm is not None and i % nm[1] == 0:
                    cols = slice(i1 + i, i1 + i + nm[1])
                    score = saliency(WbT[i : i + nm[1]].T, cols)
                    maskT[i : i + nm[1]] = _smallest_per_row(score, nm[1] - nm[0]).T
                q = w.masked_fill(maskT[i], 0.0)
                QbT[i] = q
                e = (w - q) / Ub[i, i]
                EbT[i] = e
                WbT[i:].addr_(Ub[i, i:], e, alpha=-1.0)
                if Pb is not None and WpreT is not None:
                    WbT[i:].addr_(Pb[i, i:], w)
                    WpreT[i] = w
            W1[:, i1:i2] = QbT.T
            mask[:, i1:i2] = maskT.T
            if i2 < k:
                tail = EbT.T @ U[i1:i2, i2:]
                if P is not None and WpreT is not None:
                    propagated = WpreT if lazy_values == "pre_mask" else QbT
                    tail -= propagated.T @ P[i1:i2, i2:]
                W1[:, i2:] -= tail

        loss = _objective_change(W0, W1, stats)
    return SolveResult(loss=loss, W=W1, mask=mask, damping_used=damp, warnings=notes)


def _objective_change(W0: torch.Tensor, W1: torch.Tensor, stats: LayerStats) -> float:
    """``||W1 X^ - W0 X~||^2 - ||W0 X^ - W0 X~||^2`` from the statistics (exact, section 4).

    With ``D = W1 - W0``: ``tr(D H D^T) - 2 tr(D G^T W0^T)``.
    """
    D = W1 - W0
    return float(((D @ stats.H) * D).sum() - 2.0 * ((D @ stats.G.T) * W0).sum())


def _mask_result(W: torch.Tensor, mask: torch.Tensor, stats: LayerStats | None) -> SolveResult:
    W0 = W.detach().to(torch.float32)
    W1 = W0.masked_fill(mask, 0.0)
    loss = _objective_change(W0, W1, stats) if stats is not None else float("nan")
    return SolveResult(loss=loss, W=W1, mask=mask, damping_used=0.0)


def _row_mask(score: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    nm = _nm(pattern)
    n, k = score.shape
    if nm is None:
        return _smallest_per_row(score, int(k * sparsity))
    n_keep, m_group = nm
    if k % m_group:
        raise ValueError(f"N:M {n_keep}:{m_group} needs k ({k}) % M == 0")
    grouped = score.reshape(n * k // m_group, m_group)
    return _smallest_per_row(grouped, m_group - n_keep).reshape(n, k)


# W: [n, k]
def prune_wanda(
    W: torch.Tensor, stats: LayerStats, sparsity: float, pattern: Pattern = "unstructured"
) -> SolveResult:
    """Wanda: prune the smallest ``|W_rj| * ||x_j||_2`` within each output row.

    ``||x_j||`` comes from ``diag(H)`` (pruned-path inputs); its scale is irrelevant because the
    comparison is within a row. No weight update.
    """
    with _fp32_matmul():
        score = W.detach().to(torch.float32).abs() * torch.diag(stats.H).sqrt()
        return _mask_result(W, _row_mask(score, sparsity, pattern), stats)


# W: [n, k]
def prune_magnitude(
    W: torch.Tensor,
    sparsity: float,
    pattern: Pattern = "unstructured",
    stats: LayerStats | None = None,
) -> SolveResult:
    """Magnitude pruning: the smallest ``|W|`` over the whole matrix (unstructured, the per-layer
    baseline of the SparseGPT and Wanda papers) or per row and group of M (N:M).

    ``stats``, when given, only serves to report the objective change.
    """
    with _fp32_matmul():
        score = W.detach().to(torch.float32).abs()
        if _nm(pattern) is None:
            mask = _smallest(score, int(score.numel() * sparsity))
        else:
            mask = _row_mask(score, sparsity, pattern)
        return _mask_result(W, mask, stats)
