"""Fitted growth exponents: the p of time ∝ size^p, from a least-squares line in log-log space."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Least-squares slope of log y against log x (None with fewer than two usable points)."""
    fit = loglog_fit(xs, ys)
    return None if fit is None else fit[0]


def loglog_fit(xs: Sequence[float], ys: Sequence[float]) -> Optional[tuple[float, float, float]]:
    """(slope, intercept, r²) of log y = slope·log x + intercept over the positive points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    syy = sum((p[1] - my) ** 2 for p in pts)
    slope = sxy / sxx
    r2 = 1.0 if syy == 0 else (sxy * sxy) / (sxx * syy)
    return slope, my - slope * mx, r2


def growth(xs: Sequence[float], ys: Sequence[float], expected: float, variable: str,
           large_from: Optional[float] = None, tolerance: float = 0.25) -> dict[str, Any]:
    """The fitted exponent of ys against xs, over all points and over the large sizes.

    Small sizes are often bound by overheads or by reading the input rather than by the leading
    term, so the exponent over ``x ≥ large_from`` (default: the upper half of the sizes) is the
    one compared with ``expected``; ``follows_expected`` says whether it is within ``tolerance``.
    """
    pairs = sorted((x, y) for x, y in zip(xs, ys) if x > 0 and y > 0)
    if large_from is None and pairs:
        large_from = pairs[(len(pairs) - 1) // 2][0]
    large = [(x, y) for x, y in pairs if large_from is not None and x >= large_from]
    whole = loglog_fit([p[0] for p in pairs], [p[1] for p in pairs])
    upper = loglog_fit([p[0] for p in large], [p[1] for p in large])
    exponent = upper[0] if upper else (whole[0] if whole else None)
    return {
        "variable": variable,
        "expected_exponent": expected,
        "exponent_all": None if whole is None else whole[0],
        "r2_all": None if whole is None else whole[2],
        "exponent_large": None if upper is None else upper[0],
        "r2_large": None if upper is None else upper[2],
        "large_from": large_from,
        "points": len(pairs),
        "follows_expected": None if exponent is None else abs(exponent - expected) <= tolerance,
    }


def describe(g: dict[str, Any]) -> str:
    """One line, e.g. ``time ∝ N^1.02 (N ≥ 8000; 0.93 over all; expected 1)``."""
    def fmt(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    verdict = {True: "follows", False: "does NOT follow", None: "?"}[g["follows_expected"]]
    start = "?" if g["large_from"] is None else f"{g['large_from']:g}"
    return (f"time ∝ {g['variable']}^{fmt(g['exponent_large'])} ({g['variable']} ≥ {start}; "
            f"{fmt(g['exponent_all'])} over all) — {verdict} the expected "
            f"{g['variable']}^{g['expected_exponent']:g}")
