"""Statistics against a small null sample: z, small-sample p-values, bootstrap, fits.

K null adapters give K numbers, often fewer than ten, so every test here is honest
about small n: a degenerate null yields no z and no p rather than a huge one, and
the parametric p-value uses Student's t written out with the math module (no scipy).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from sway_common.types import NullStats

_CF_MAX_ITER = 20_000
_CF_TOL = 1e-15
_TINY = 1e-300


def _finite_array(values: ArrayLike, what: str) -> NDArray[np.float64]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contain non-finite entries")
    return arr


def _finite(x: float, what: str) -> float:
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{what} is not finite: {x!r}")
    return x


def null_stats(values: Sequence[float]) -> NullStats:
    """Summarise a metric measured under K null adapters.

    ``std`` is the sample standard deviation (ddof=1). The result is degenerate when
    ``n < 2`` or ``std <= max(1e-12, 1e-9 * |mean|)``: dividing by such a std would
    turn roundoff into a z in the thousands. An empty sample is degenerate with mean
    and std 0.0, so callers need no special case for "no nulls drawn".
    """
    arr = _finite_array(values, "null values")
    n = int(arr.size)
    mean = float(arr.mean()) if n else 0.0
    std = float(arr.std(ddof=1)) if n >= 2 else 0.0
    degenerate = n < 2 or std <= max(1e-12, 1e-9 * abs(mean))
    return NullStats(mean=mean, std=std, n=n, values=[float(v) for v in arr], degenerate=degenerate)


def z_score(x: float, stats: NullStats) -> float | None:
    """``(x - mean) / std``, or None when the null is degenerate."""
    x = _finite(x, "observed value")
    if stats.degenerate:
        return None
    return (x - stats.mean) / stats.std


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction for I_x(a, b), evaluated with the modified Lentz method.

    Converges quickly for ``x < (a + 1) / (a + b + 2)``; callers use the symmetry
    I_x(a, b) = 1 - I_{1-x}(b, a) to stay in that region.
    """

    def guard(v: float) -> float:
        return v if abs(v) > _TINY else _TINY

    c = 1.0
    d = 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, _CF_MAX_ITER):
        two_m = 2.0 * m
        # Even step of the fraction.
        coef = m * (b - m) * x / ((a + two_m - 1.0) * (a + two_m))
        d = 1.0 / guard(1.0 + coef * d)
        c = guard(1.0 + coef / c)
        h *= d * c
        # Odd step.
        coef = -(a + m) * (a + b + m) * x / ((a + two_m) * (a + two_m + 1.0))
        d = 1.0 / guard(1.0 + coef * d)
        c = guard(1.0 + coef / c)
        step = d * c
        h *= step
        if abs(step - 1.0) < _CF_TOL:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float, *, one_minus_x: float | None = None) -> float:
    """Regularised incomplete beta function I_x(a, b) for ``a, b > 0``, ``0 <= x <= 1``.

    ``one_minus_x`` lets a caller pass ``1 - x`` computed without cancellation.
    """
    if not (a > 0.0 and b > 0.0):
        raise ValueError("betainc needs a > 0 and b > 0")
    y = 1.0 - x if one_minus_x is None else one_minus_x
    if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
        raise ValueError(f"betainc x must lie in [0, 1], got {x!r}")
    if x == 0.0:
        return 0.0
    if y == 0.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, y) / b


def t_sf(t: float, df: float) -> float:
    """Upper tail P(T > t) of Student's t with ``df`` degrees of freedom."""
    t = _finite(t, "t")
    if not df > 0.0:
        raise ValueError(f"df must be positive, got {df!r}")
    t2 = t * t
    # P(|T| > |t|) = I_{df/(df+t^2)}(df/2, 1/2); 1 - x is formed directly for precision.
    if math.isinf(t2):
        two_sided = 0.0
    else:
        two_sided = betainc(0.5 * df, 0.5, df / (df + t2), one_minus_x=t2 / (df + t2))
    half = 0.5 * two_sided
    return half if t >= 0.0 else 1.0 - half


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) of Student's t with ``df`` degrees of freedom."""
    return t_sf(-t, df)


def p_value(x: float, stats: NullStats) -> float | None:
    """One-sided p that a fresh null draw is at least ``x``, or None when degenerate.

    Uses the prediction-interval statistic ``t = (x - mean) / (std * sqrt(1 + 1/n))``
    with ``n - 1`` degrees of freedom, which accounts for the mean and std being
    estimated from only ``n`` draws (assumes the null metric is roughly normal).
    """
    x = _finite(x, "observed value")
    if stats.degenerate:
        return None
    n = stats.n
    t = (x - stats.mean) / (stats.std * math.sqrt(1.0 + 1.0 / n))
    return min(max(t_sf(t, n - 1), 0.0), 1.0)


def empirical_p(x: float, values: Sequence[float]) -> float:
    """Rank p-value ``(1 + #{v >= x}) / (n + 1)``: distribution-free, never below 1/(n+1)."""
    x = _finite(x, "observed value")
    arr = _finite_array(values, "null values")
    return (1.0 + float(np.count_nonzero(arr >= x))) / (arr.size + 1.0)


def norm_cdf(x: float) -> float:
    """P(Z <= x) for a standard normal Z."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def norm_ppf(p: float) -> float:
    """The x with ``norm_cdf(x) = p`` (bisection on :func:`norm_cdf`, to 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p!r}")
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if norm_cdf(mid) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12:
            break
    return 0.5 * (lo + hi)


BootstrapMethod = Literal["bca", "percentile"]


def _bootstrap_draws(
    arr: NDArray[np.float64], n_boot: int, seed: int, stat: Callable[[NDArray[np.float64]], Any]
) -> NDArray[np.float64]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_boot, arr.size))
    if stat is np.mean:  # the common case, vectorised
        return np.asarray(arr[idx].mean(axis=1), dtype=np.float64)
    return np.fromiter((float(stat(arr[row])) for row in idx), dtype=np.float64, count=n_boot)


def _bca_levels(
    arr: NDArray[np.float64],
    draws: NDArray[np.float64],
    stat: Callable[[NDArray[np.float64]], Any],
    alpha: float,
) -> tuple[float, float] | None:
    """The BCa percentiles for ``alpha/2`` and ``1 - alpha/2`` (Efron 1987), or None
    where the correction is undefined (no spread in the draws or the jackknife).

    Bias correction ``z0``: the normal quantile of the share of draws below the estimate
    (ties count half). Acceleration ``a``: the skewness of the jackknife influence values,
    ``Σd³ / (6 (Σd²)^1.5)``. Level ``Φ(z0 + (z0 + z_q) / (1 - a (z0 + z_q)))``.
    """
    theta = float(stat(arr))
    below = float(np.count_nonzero(draws < theta)) + 0.5 * float(np.count_nonzero(draws == theta))
    share = min(max(below / draws.size, 0.5 / draws.size), 1.0 - 0.5 / draws.size)
    jack = np.array([float(stat(np.delete(arr, i))) for i in range(arr.size)])
    d = jack.mean() - jack
    ss = float(np.dot(d, d))
    if np.ptp(draws) == 0.0 or ss == 0.0:
        return None
    z0 = norm_ppf(share)
    a = float(np.sum(d**3)) / (6.0 * ss**1.5)
    levels = []
    for q in (alpha / 2.0, 1.0 - alpha / 2.0):
        zq = z0 + norm_ppf(q)
        denom = 1.0 - a * zq
        # Past the pole the correction has no meaning: the level goes to its extreme.
        level = norm_cdf(z0 + zq / denom) if denom > 0.0 else (0.0 if q < 0.5 else 1.0)
        levels.append(min(max(level, 0.0), 1.0))
    return levels[0], levels[1]


def bootstrap_ci(
    values: ArrayLike,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    stat: Callable[[NDArray[np.float64]], Any] = np.mean,
    method: BootstrapMethod = "bca",
) -> tuple[float, float]:
    """Bootstrap ``1 - alpha`` interval for ``stat`` of ``values``: BCa by default.

    The plain percentile interval is too narrow on few, skewed values: its bound lands
    past the truth more often than ``alpha/2``. BCa (bias-corrected and accelerated)
    moves the percentiles by the draws' median bias and the jackknife skewness; it falls
    back to the percentile interval where those are undefined (no spread). Resampling
    uses ``numpy.random.default_rng(seed)``, so a seed fixes the interval.
    """
    arr = _finite_array(values, "values")
    if arr.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if n_boot < 1:
        raise ValueError("n_boot must be at least 1")
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must lie in (0, 1)")
    if method not in ("bca", "percentile"):
        raise ValueError(f"method must be 'bca' or 'percentile', got {method!r}")
    draws = _bootstrap_draws(arr, n_boot, seed, stat)
    levels = (alpha / 2.0, 1.0 - alpha / 2.0)
    if method == "bca" and arr.size > 1:
        levels = _bca_levels(arr, draws, stat, alpha) or levels
    lo, hi = np.quantile(draws, levels)
    return float(lo), float(hi)


def linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares line through ``(x, y)``: ``(slope, intercept, r2)``.

    R² is 1 for points on a line. When ``y`` is constant (spread within 1e-12 of its
    magnitude) there is no variance to explain and R² is defined as 0.0: a flat
    response is "no dose-response", which a caller must not read as a perfect fit.
    """
    xa = _finite_array(x, "x")
    ya = _finite_array(y, "y")
    if xa.shape != ya.shape:
        raise ValueError(f"x and y differ in length: {xa.size} vs {ya.size}")
    if xa.size < 2:
        raise ValueError("linear_fit needs at least two points")
    dx = xa - xa.mean()
    sxx = float(np.dot(dx, dx))
    if np.ptp(xa) <= 1e-12 * float(np.max(np.abs(xa))) or sxx == 0.0:
        raise ValueError("x is constant: the slope is undefined")
    y_mean = float(ya.mean())
    if np.ptp(ya) <= 1e-12 * float(np.max(np.abs(ya))):
        return 0.0, y_mean, 0.0
    slope = float(np.dot(dx, ya - y_mean)) / sxx
    intercept = y_mean - slope * float(xa.mean())
    resid = ya - (slope * xa + intercept)
    dy = ya - y_mean
    r2 = 1.0 - float(np.dot(resid, resid)) / float(np.dot(dy, dy))
    return slope, intercept, min(max(r2, 0.0), 1.0)


# A z whose small-sample p is already below this adds no information: shown as a bound.
Z_DISPLAY_P = 1e-4
# With 2 draws (1 degree of freedom) the bound above is in the thousands: never show more.
Z_DISPLAY_MAX = 50.0


def t_isf(p: float, df: float) -> float:
    """The t with ``P(T > t) = p`` for Student's t with ``df`` degrees of freedom (bisection)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p!r}")
    lo, hi = -1.0, 1.0
    while t_sf(lo, df) < p:
        lo *= 2.0
    while t_sf(hi, df) > p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf(mid, df) > p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-10 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


def z_bound(n: int, p: float = Z_DISPLAY_P) -> float:
    """The z at which the prediction-interval p-value of ``n`` null draws reaches ``p``.

    Beyond it a larger z says nothing more: K draws cannot tell 300σ from 3000σ.
    """
    if n < 2:
        raise ValueError("a z bound needs at least two null draws")
    return t_isf(p, n - 1) * math.sqrt(1.0 + 1.0 / n)


def log_values(values: Sequence[float]) -> list[float]:
    """Natural logs of non-negative metrics, zeros floored at 1e-12 (a B=0 adapter's 0.0)."""
    return [math.log(max(float(v), 1e-12)) for v in values]


def paired_ratio(
    adapter: Sequence[float], nulls: Sequence[Sequence[float]], *, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """The adapter's effect as a multiple of a null's, paired by prompt, with a bootstrap interval.

    ``adapter[i]`` is the metric on prompt i, ``nulls[k][i]`` the same metric under null k.
    Per prompt the log ratio to the mean null on *that* prompt; the geometric mean over
    prompts is the ratio, and resampling prompts gives its 95% interval: how far the
    claim carries to other prompts of the same kind (BCa: see :func:`bootstrap_ci`).
    Returns ``(ratio, low, high)``.
    """
    a = np.asarray(adapter, dtype=np.float64)
    k = np.asarray(nulls, dtype=np.float64)
    if k.ndim != 2 or k.shape[1] != a.size or a.size == 0:
        raise ValueError(f"nulls must be (K, {a.size}), got {k.shape}")
    logs = np.log(np.maximum(a, 1e-12)) - np.log(np.maximum(k.mean(axis=0), 1e-12))
    lo, hi = bootstrap_ci(logs, n_boot=n_boot, seed=seed) if logs.size > 1 else (logs[0], logs[0])
    return float(np.exp(logs.mean())), float(np.exp(lo)), float(np.exp(hi))


def format_z(z: float | None, n: int | None = None) -> str:
    """z for people: a bound ("> 8.4σ") past what ``n`` null draws support; JSON keeps the raw z."""
    if z is None:
        return "—"
    z = float(z)
    if not math.isfinite(z):
        return f"{z:+}σ"
    if n is not None and n >= 2:
        bound = min(z_bound(n), Z_DISPLAY_MAX)
        if abs(z) > bound:
            return f"{'>' if z > 0 else '<'} {'' if z > 0 else '-'}{bound:.1f}σ"
    # Decimals on a z in the hundreds suggest a precision K null draws cannot give.
    return f"{z:+.0f}σ" if abs(z) >= 100 else f"{z:+.1f}σ"


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion (two-sided 95% by default)."""
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale)


def binomial_upper_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided exact (Clopper-Pearson) upper bound on a rate seen ``k`` times in ``n``.

    0 of 60 bounds the rate below 1 - 0.05^(1/60) = 4.9% at 95%.
    """
    if not 0 <= k <= n or n == 0:
        raise ValueError(f"need 0 <= k <= n and n > 0 (got k={k}, n={n})")
    if k == n:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):  # P(X <= k | p) = 1 - I_p(k+1, n-k) falls as p grows
        mid = (lo + hi) / 2
        if betainc(k + 1, n - k, mid) < confidence:
            lo = mid
        else:
            hi = mid
    return hi
