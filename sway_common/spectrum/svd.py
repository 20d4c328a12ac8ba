"""Spectra of a LoRA update and of a base weight, numpy only, never a dense ΔW.

- :func:`lowrank_svd`: the thin SVD of ``ΔW = scale · B·A`` from its factors: a QR of
  ``B`` and of ``Aᵀ`` and the SVD of an r×r core, ``O(r²·(out + in))``.
- :func:`randomized_svd`: the top-k SVD of a base weight ``W`` (Halko, Martinsson and
  Tropp 2011: a seeded Gaussian sketch, power iterations, a small SVD), with ``‖W‖_F``.
- :func:`module_figures`: what one module's update is, from those two alone: its size
  relative to ``W``, its effective ranks, how much of it lies in ``W``'s top singular
  directions, and its *intruder dimensions* (Shuttleworth et al. 2024): singular vectors
  of ``W + ΔW`` among its top ``top_n`` with no close counterpart (|cos| ≥ ``cos``) among
  ``W``'s top k. The top singular vectors of ``W_k + ΔW`` (``W_k`` the rank-k part of
  ``W``) come from a rank-r update of ``W``'s cached SVD (Brand 2006): the SVD of a
  ``(k+r)×(k+r)`` matrix, not of ``W + ΔW``. The tail of ``W`` beyond its top k is left
  out of both sides of the comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]

FIGURES: tuple[str, ...] = (
    "rel_fro",
    "rel_spec",
    "stable_rank",
    "eff_rank",
    "rank90",
    "align_out",
    "align_in",
    "intruders",
)
"""Every figure of a module, in report order:

- ``rel_fro``: ``‖ΔW‖_F / ‖W‖_F``; ``rel_spec``: ``‖ΔW‖₂ / ‖W‖₂``;
- ``stable_rank``: ``‖ΔW‖_F² / ‖ΔW‖₂²``; ``eff_rank``: ``exp`` of the entropy of the
  singular values normalised to sum 1 (Roy and Vetterli 2007); ``rank90``: how many
  singular values hold 90% of ``‖ΔW‖_F²``;
- ``align_out`` / ``align_in``: the share of ``‖ΔW‖_F²`` inside the span of ``W``'s top-k
  left / right singular vectors (a random direction puts ``k/out`` / ``k/in`` there);
- ``intruders``: the number of intruder dimensions among ``W + ΔW``'s top ``top_n``."""
ENERGY = 0.9
RESIDUAL_TOL = 1e-4
ORTHONORMAL_TOL = 1e-10
"""Below this (in units of a unit vector) a residual is float32 roundoff, not a direction."""


@dataclass(frozen=True)
class LowRankSVD:
    """``ΔW = u · diag(s) · vᵀ``: ``u`` (out, r) and ``v`` (in, r) orthonormal, ``s`` descending."""

    u: F64
    s: F64
    v: F64

    def scaled(self, c: float) -> LowRankSVD:
        """The SVD of ``c · ΔW`` (the same vectors)."""
        return LowRankSVD(self.u, self.s * abs(c), self.v)


@dataclass(frozen=True)
class TopSVD:
    """A base weight's top-k SVD, ``W ≈ u · diag(s) · vᵀ``, and its Frobenius norm."""

    u: F32
    s: F64
    v: F32
    fro: float

    @property
    def k(self) -> int:
        return int(self.s.size)


def thin_qr(x: F64) -> tuple[F64, F64]:
    """The thin QR of a tall ``x``: CholeskyQR2 (two Cholesky passes on the small Gram
    matrix, matrix products only; Fukaya et al. 2014), cheaper than Householder
    QR on a tall thin matrix; Householder QR where ``x`` is too ill-conditioned for it
    (the Cholesky fails, or the columns come out less than orthonormal)."""
    try:
        r1 = np.linalg.cholesky(x.T @ x).T
        q = x @ np.linalg.inv(r1)
        r2 = np.linalg.cholesky(q.T @ q).T
        q = q @ np.linalg.inv(r2)
        if np.abs(q.T @ q - np.eye(q.shape[1])).max() < ORTHONORMAL_TOL:
            return q, r2 @ r1
    except np.linalg.LinAlgError:
        pass
    q, r = np.linalg.qr(x)
    return q, r


def lowrank_svd(a: NDArray[np.floating], b: NDArray[np.floating], scale: float) -> LowRankSVD:
    """The thin SVD of ``scale · b @ a`` (``a`` (r, in), ``b`` (out, r)) without forming it.

    ``b = Q_B R_B`` and ``aᵀ = Q_A R_A``, so ``ΔW = Q_B (scale · R_B R_Aᵀ) Q_Aᵀ``: the
    SVD of the r×r core, rotated back by the two orthonormal bases.
    """
    qb, rb = thin_qr(np.asarray(b, dtype=np.float64))
    qa, ra = thin_qr(np.asarray(a, dtype=np.float64).T)
    uc, s, vct = np.linalg.svd(float(scale) * (rb @ ra.T), full_matrices=False)
    return LowRankSVD(qb @ uc, s, qa @ vct.T)


def randomized_svd(
    w: NDArray[np.floating], k: int, *, oversample: int = 8, power_iters: int = 2, seed: int = 0
) -> TopSVD:
    """The top ``k`` singular triplets of ``w`` (out, in) from a seeded randomized sketch.

    ``k + oversample`` columns, ``power_iters`` power iterations (each re-orthonormalised),
    products in float32, the final small SVD in float64. Exact (to float32) when
    ``k + oversample`` reaches ``min(out, in)``.
    """
    w32 = np.asarray(w, dtype=np.float32)
    width = min(k + oversample, *w32.shape)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(w32 @ rng.standard_normal((w32.shape[1], width), dtype=np.float32))
    for _ in range(power_iters):
        z, _ = np.linalg.qr(w32.T @ q)
        q, _ = np.linalg.qr(w32 @ z)
    ub, s, vt = np.linalg.svd((q.T @ w32).astype(np.float64), full_matrices=False)
    k = min(k, width)
    u = (q.astype(np.float64) @ ub[:, :k]).astype(np.float32)
    fro = float(np.sqrt(np.sum(np.square(w32, dtype=np.float64))))
    return TopSVD(u, s[:k], np.ascontiguousarray(vt[:k].T, dtype=np.float32), fro)


def _orth_complement(x: F32, basis: F32) -> F32:
    """An orthonormal basis of what ``x``'s (unit) columns hold outside ``basis``'s span:
    projected out twice (one pass loses orthogonality when ``x`` lies almost inside), and
    directions below :data:`RESIDUAL_TOL` dropped (there ``x`` lies inside the span)."""
    res = x - basis @ (basis.T @ x)
    res = res - basis @ (basis.T @ res)
    q, r = thin_qr(res.astype(np.float64))
    ur, sv, _ = np.linalg.svd(r)
    return np.asarray(q @ ur[:, sv > RESIDUAL_TOL], dtype=np.float32)


@dataclass(frozen=True)
class Projection:
    """``ΔW``'s singular vectors in orthonormal bases of the column and row spaces of
    ``W_k + ΔW``: ``pu = Pᵀu`` with ``P = [U_k, Q_u]``, ``pv = Qᵀv`` with ``Q = [V_k, Q_v]``
    (``Q_u``, ``Q_v``: what ``u``, ``v`` add to ``W``'s top-k vectors). Their first k rows
    are ``U_kᵀu`` and ``V_kᵀv``. The same for any rescaling of ``ΔW``."""

    pu: F64
    pv: F64


def project(delta: LowRankSVD, base: TopSVD) -> Projection:
    uk, vk = base.u, base.v
    u, v = delta.u.astype(np.float32), delta.v.astype(np.float32)
    qu, qv = _orth_complement(u, uk), _orth_complement(v, vk)
    pu = np.vstack([uk.T @ u, qu.T @ u]).astype(np.float64)
    pv = np.vstack([vk.T @ v, qv.T @ v]).astype(np.float64)
    return Projection(pu, pv)


def intruder_cosines(s: F64, proj: Projection, base: TopSVD, top_n: int) -> F64:
    """For each of the top ``top_n`` left singular vectors of ``W_k + u·diag(s)·vᵀ``: its
    largest |cos| with any of ``W``'s top-k left singular vectors.

    In the bases ``P`` and ``Q`` of :class:`Projection` the matrix is ``P · M · Qᵀ`` with
    ``M = diag(S_k, 0) + pu · diag(s) · pvᵀ``, a ``(k+r)×(k+r)`` matrix; the left singular
    vectors of ``M`` hold the cosines with ``U_k`` in their first k rows.
    """
    m = (proj.pu * s) @ proj.pv.T
    m[: base.k, : base.k] += np.diag(base.s)
    um, _, _ = np.linalg.svd(m)
    n = min(top_n, base.k)
    return np.abs(um[: base.k, :n]).max(axis=0)


def scaled_figures(
    delta: LowRankSVD, base: TopSVD, scales: tuple[float, ...], *, top_n: int, cos: float
) -> list[dict[str, float] | None]:
    """:func:`module_figures` of ``c · ΔW`` for each ``c`` in ``scales``, projected once."""
    energy = float(np.sum(delta.s * delta.s))
    if not energy > 0 or not math.isfinite(energy):
        return [None for _ in scales]
    proj = project(delta, base)
    k = base.k
    s = delta.s
    p = s[s > 0] / float(np.sum(s))
    shape = {
        "stable_rank": energy / float(s[0]) ** 2,
        "eff_rank": float(np.exp(-np.sum(p * np.log(p)))),
        "rank90": float(np.searchsorted(np.cumsum(s * s) / energy, ENERGY - 1e-12) + 1),
        "align_out": float(np.sum((proj.pu[:k] * s) ** 2)) / energy,
        "align_in": float(np.sum((proj.pv[:k] * s) ** 2)) / energy,
    }
    out: list[dict[str, float] | None] = []
    for c in scales:
        c = abs(c)
        if not c > 0:
            out.append(None)
            continue
        fro, spec = c * math.sqrt(energy), c * float(s[0])
        intruders = intruder_cosines(c * s, proj, base, top_n) < cos
        out.append(
            {
                "rel_fro": fro / base.fro if base.fro > 0 else math.inf,
                "rel_spec": spec / float(base.s[0]) if base.s[0] > 0 else math.inf,
                **shape,
                "intruders": float(np.sum(intruders)),
            }
        )
    return out


def module_figures(
    delta: LowRankSVD, base: TopSVD, *, top_n: int = 10, cos: float = 0.5
) -> dict[str, float] | None:
    """The :data:`FIGURES` of one module's update; None when ``ΔW`` is zero (no spectrum)."""
    return scaled_figures(delta, base, (1.0,), top_n=top_n, cos=cos)[0]
