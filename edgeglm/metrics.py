"""Prognostics metrics: RMSE and the PHM08 scoring function (numpy only).

The PHM08 challenge score (Saxena et al., "Damage Propagation Modeling for
Aircraft Engine Run-to-Failure Simulation", PHM08) penalises late predictions
more than early ones. With ``d = predicted RUL - true RUL``::

    s = Σ_i  exp(-d_i / 13) - 1   if d_i < 0   (early: predicted failure too soon)
             exp( d_i / 10) - 1   if d_i ≥ 0   (late: the dangerous side)

Lower is better for both metrics.
"""

from __future__ import annotations

import numpy as np

__all__ = ["phm08_score", "rmse"]


def _pair(predicted: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(predicted, dtype=np.float64).reshape(-1)
    t = np.asarray(target, dtype=np.float64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"predicted has {p.size} values but target has {t.size}; pass one prediction per target")
    return p, t


def rmse(predicted: np.ndarray, target: np.ndarray) -> float:
    """Root mean squared error, sqrt(mean((p - t)^2)). Shapes: any, same number of elements."""
    p, t = _pair(predicted, target)
    return float(np.sqrt(np.mean((p - t) ** 2)))


def phm08_score(predicted: np.ndarray, target: np.ndarray) -> float:
    """PHM08 asymmetric score (sum over units); see the module docstring for the formula."""
    p, t = _pair(predicted, target)
    d = p - t
    return float(np.sum(np.where(d < 0, np.exp(-d / 13.0) - 1.0, np.exp(d / 10.0) - 1.0)))
