"""Thompson-sampling budget splits: they add up, repeat under a seed, favour higher CTRs, and follow the prior."""

from __future__ import annotations

import numpy as np
import pytest

from precompute_assets.ml.budget import beta_posteriors, split_budget, thompson_shares, thompson_split

CTR = np.array([0.010, 0.020, 0.030, 0.050, 0.012, 0.025])


def test_the_split_adds_up_to_the_budget_in_cents():
    for budget in (1000.0, 999.99, 0.05, 123456.78):
        amounts = thompson_split(CTR, budget, seed=1)
        assert len(amounts) == len(CTR) and np.all(amounts >= 0)
        assert round(float(amounts.sum()), 2) == pytest.approx(budget)
        assert np.allclose(amounts * 100, np.round(amounts * 100))  # whole cents


def test_the_same_seed_gives_the_same_split_and_another_seed_a_different_one():
    first = thompson_split(CTR, 1000.0, seed=7)
    assert np.array_equal(first, thompson_split(CTR, 1000.0, seed=7))
    assert np.array_equal(thompson_split(CTR, 1000.0, seed=[3, 42]), thompson_split(CTR, 1000.0, seed=[3, 42]))
    assert not np.array_equal(first, thompson_split(CTR, 1000.0, seed=8))


def test_a_higher_ctr_gets_more_in_expectation():
    # averaged over seeds, the budget follows the ranking of the predicted CTRs
    mean = np.mean([thompson_shares(CTR, prior_strength=200, draws=2000, seed=s) for s in range(20)], axis=0)
    assert list(np.argsort(mean)) == list(np.argsort(CTR))
    assert mean.argmax() == CTR.argmax()


def test_a_stronger_prior_concentrates_the_budget():
    def concentration(strength: float) -> float:  # Herfindahl index: 1/n for an even split, 1 for all-in-one
        shares = thompson_shares(CTR, prior_strength=strength, draws=20_000, seed=0)
        return float((shares**2).sum())

    weak, medium, strong = concentration(1), concentration(300), concentration(30_000)
    assert weak < medium < strong
    assert weak == pytest.approx(1 / len(CTR), rel=0.05)  # Beta(~1, ~1) everywhere: close to an even split
    assert strong > 0.9  # the model is trusted: nearly everything to the best ad


def test_no_prior_means_an_even_split():
    shares = thompson_shares(CTR, prior_strength=0, draws=60_000, seed=0)
    assert np.allclose(shares, 1 / len(CTR), atol=0.01)


def test_large_campaigns_are_sampled_in_chunks_with_the_same_result_for_the_same_seed():
    ctr = np.random.default_rng(0).uniform(0.001, 0.05, 5000)
    shares = thompson_shares(ctr, draws=500, seed=3)  # 2.5M cells: sampled in 3 chunks
    assert shares.sum() == pytest.approx(1.0) and np.array_equal(shares, thompson_shares(ctr, draws=500, seed=3))


def test_posteriors_are_centred_on_the_prediction():
    alpha, beta = beta_posteriors([0.02, 0.5], prior_strength=1000)
    assert np.allclose(alpha / (alpha + beta), [0.02, 0.5], atol=0.001)
    assert np.allclose(alpha + beta, 1002)


def test_split_budget_gives_leftover_cents_to_the_largest_remainders():
    assert list(split_budget(np.array([1, 1, 1]), 1.0)) == [0.34, 0.33, 0.33]
    assert list(split_budget(np.array([0.2, 0.0, 0.8]), 10.0)) == [2.0, 0.0, 8.0]


@pytest.mark.parametrize(
    ("ctr", "kwargs", "message"),
    [
        ([], {}, "no ads"),
        ([0.1, 1.5], {}, "finite probability"),
        ([0.1, float("nan")], {}, "finite probability"),
        ([0.1], {"prior_strength": -1}, "prior_strength"),
        ([0.1], {"draws": 0}, "draws"),
    ],
)
def test_bad_inputs_are_refused(ctr, kwargs, message):
    with pytest.raises(ValueError, match=message):
        thompson_shares(ctr, **kwargs)


def test_a_bad_budget_is_refused():
    with pytest.raises(ValueError, match="budget"):
        thompson_split(CTR, 0.0)
    # Over 2**63 cents the units overflowed int64 casts: negative amounts that did not add up, with only a warning.
    with pytest.raises(ValueError, match="units would not add up exactly"):
        thompson_split(CTR, 1e17)
    with pytest.raises(ValueError, match="units would not add up exactly"):
        thompson_split(CTR, 5e13)  # near 2**53 cents, float amounts cannot hold every cent
    rng = np.random.default_rng(0)
    for budget in rng.uniform(2.0**50 / 100, 2.0**51 / 100, 3000).round(2):  # the floors' rounding overshot here
        amounts = split_budget(rng.random(int(rng.integers(2, 6))), budget)
        cents = [round(amount * 100) for amount in amounts]  # a float sum of such amounts is not exact
        assert sum(cents) == round(budget * 100) and min(cents) >= 0, budget
    with pytest.raises(ValueError, match="shares must be finite"):
        split_budget([np.inf, 1], 1.0)
