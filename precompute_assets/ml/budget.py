"""Budget splits by Thompson sampling: each ad gets the share of draws in which it has the highest sampled CTR.

An ad's CTR is uncertain before launch, so it gets a Beta posterior centred on its predicted CTR: ``prior_strength``
pseudo-impressions of which a share ``ctr`` were clicks, on top of a uniform Beta(1, 1). A weak prior (few
pseudo-impressions) keeps the posteriors wide and spreads the budget to explore; a strong one trusts the model and
concentrates the budget on the ads predicted best. Pure numpy, reproducible under ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_PRIOR_STRENGTH = 100.0
DEFAULT_DRAWS = 10_000
_CELLS_PER_CHUNK = 1_000_000  # draws x ads sampled at once: bounds memory at ~8 MB for any campaign size


def beta_posteriors(ctr: Sequence[float] | np.ndarray, prior_strength: float) -> tuple[np.ndarray, np.ndarray]:
    """``(alpha, beta)`` per ad: Beta(1 + s * ctr, 1 + s * (1 - ctr)) with ``s = prior_strength``."""
    p = np.asarray(ctr, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"ctr must be one value per ad, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("every predicted CTR must be a finite probability in [0, 1]")
    if not (np.isfinite(prior_strength) and prior_strength >= 0):
        raise ValueError(f"prior_strength must be a finite number >= 0, got {prior_strength}")
    return 1.0 + prior_strength * p, 1.0 + prior_strength * (1.0 - p)


def thompson_shares(
    ctr: Sequence[float] | np.ndarray,
    *,
    prior_strength: float = DEFAULT_PRIOR_STRENGTH,
    draws: int = DEFAULT_DRAWS,
    seed: int | Sequence[int] = 0,
) -> np.ndarray:
    """Each ad's share of ``draws`` Thompson draws it wins (highest sampled CTR); the shares sum to 1."""
    alpha, beta = beta_posteriors(ctr, prior_strength)
    n = len(alpha)
    if n == 0:
        raise ValueError("no ads to split the budget across")
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    rng = np.random.default_rng(seed)
    wins = np.zeros(n, dtype=np.int64)
    chunk = max(1, _CELLS_PER_CHUNK // n)
    for start in range(0, draws, chunk):
        rows = min(chunk, draws - start)
        samples = rng.beta(alpha, beta, size=(rows, n))
        wins += np.bincount(samples.argmax(axis=1), minlength=n)
    return wins / draws


# Units of 10 ** -decimals a budget may hold: up to 2**51 of them a float amount still tells every unit apart (its
# spacing stays under half a unit), so the split's amounts are exact to the unit and add up to the budget.
MAX_BUDGET_UNITS = 2**51


def budget_problem(budget: float, *, decimals: int = 2) -> str | None:
    """Why ``budget`` cannot be split into units of ``10 ** -decimals``, or None."""
    if not (np.isfinite(budget) and budget > 0):
        return f"budget must be a positive finite number, got {budget}"
    if budget / 10.0**-decimals > MAX_BUDGET_UNITS:
        return f"budget {budget:g} is over {MAX_BUDGET_UNITS * 10.0**-decimals:g}: its units would not add up exactly"
    return None


def split_budget(shares: np.ndarray, budget: float, *, decimals: int = 2) -> np.ndarray:
    """``budget`` split in proportion to ``shares``, rounded to ``decimals`` places by largest remainder, so the
    amounts add up to the budget (in units of ``10 ** -decimals``) exactly."""
    shares = np.asarray(shares, dtype=float)
    if (problem := budget_problem(budget, decimals=decimals)) is not None:
        raise ValueError(problem)
    if not len(shares) or not np.all(np.isfinite(shares)) or np.any(shares < 0) or not shares.sum() > 0:
        raise ValueError("shares must be finite, non-negative, with a positive sum")
    unit = 10.0**-decimals
    units = int(round(budget / unit))
    exact = shares / shares.sum() * units
    whole = np.floor(exact).astype(np.int64)
    left = units - int(whole.sum())
    if left < 0:  # near 2**53 units the floors' float rounding can overshoot: back off the smallest remainders
        whole[np.argsort(exact - whole, kind="stable")[:-left]] -= 1
        left = units - int(whole.sum())
    # the units left over go to the largest remainders; ties to the larger share, then to the first ad
    order = np.lexsort((np.arange(len(exact)), -shares, -(exact - whole)))
    whole[order[:left]] += 1
    return np.round(whole * unit, decimals)


def thompson_split(
    ctr: Sequence[float] | np.ndarray,
    budget: float,
    *,
    prior_strength: float = DEFAULT_PRIOR_STRENGTH,
    draws: int = DEFAULT_DRAWS,
    seed: int | Sequence[int] = 0,
    decimals: int = 2,
) -> np.ndarray:
    """``budget`` split across ads by Thompson sampling over Beta posteriors seeded from their predicted ``ctr``."""
    shares = thompson_shares(ctr, prior_strength=prior_strength, draws=draws, seed=seed)
    return split_budget(shares, budget, decimals=decimals)
