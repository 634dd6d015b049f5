"""engine.stats against scipy.stats on fixed samples (equal and unequal sizes and variances)."""
import numpy as np
import pytest
import scipy.stats

from engine import stats

SAMPLES = {
    "four_seeds": np.array([47.1, 48.3, 46.8, 47.9]),
    "five_wide": np.array([40.0, 52.5, 44.1, 49.7, 38.2]),
    "eight_narrow": np.array([50.02, 50.10, 49.95, 50.07, 50.01, 49.98, 50.04, 50.00]),
    "three_skewed": np.array([30.0, 31.0, 45.0]),
    "six_seeds": np.array([61.2, 63.0, 62.4, 60.9, 64.1, 62.2]),
}
# (a, b) pairs for the two-sample tests: equal sizes, unequal sizes, very unequal variances.
PAIRS = [("four_seeds", "five_wide"), ("five_wide", "eight_narrow"), ("three_skewed", "four_seeds"),
         ("eight_narrow", "three_skewed")]
PAIRED = [  # same length, as if paired by seed
    (np.array([47.1, 48.3, 46.8, 47.9]), np.array([46.0, 47.5, 46.9, 46.2])),
    (np.array([40.0, 52.5, 44.1, 49.7, 38.2]), np.array([39.1, 50.0, 44.5, 47.2, 37.0])),
]


@pytest.mark.parametrize("name", SAMPLES)
def test_summary_matches_scipy(name):
    x = SAMPLES[name]
    result = stats.summary(x)
    assert result["n"] == x.size
    assert result["mean"] == pytest.approx(np.mean(x))
    assert result["std"] == pytest.approx(np.std(x, ddof=1))
    assert result["sem"] == pytest.approx(scipy.stats.sem(x))
    expected_t = scipy.stats.t.interval(0.95, x.size - 1, loc=np.mean(x), scale=scipy.stats.sem(x))
    assert result["ci95_t"] == pytest.approx(expected_t)

    if x.size < stats.MIN_BOOTSTRAP_N:  # too few seeds for a percentile bootstrap: withheld, not shown too narrow
        assert result["ci95_boot"] is None
        return
    reference = scipy.stats.bootstrap((x,), np.mean, confidence_level=0.95, n_resamples=10_000,
                                      method="percentile", rng=np.random.default_rng(123)).confidence_interval
    # Different resamples, so only close: within 4% of the CI width (the Monte Carlo error of a 2.5% / 97.5%
    # percentile of 10000 resamples is about 2-3% of the width once the bootstrap distribution is not too discrete).
    tolerance = 0.04 * (reference.high - reference.low)
    assert result["ci95_boot"][0] == pytest.approx(reference.low, abs=tolerance)
    assert result["ci95_boot"][1] == pytest.approx(reference.high, abs=tolerance)


def test_bootstrap_is_deterministic():
    x = SAMPLES["five_wide"]
    assert stats.summary(x)["ci95_boot"] == stats.summary(x)["ci95_boot"]


def test_summary_single_value_has_no_spread():
    assert stats.summary([42.0]) == {"n": 1, "mean": 42.0, "std": None, "sem": None, "ci95_t": None,
                                     "ci95_boot": None}


def test_summary_identical_values_collapse_the_intervals():
    result = stats.summary([50.0] * 5)
    assert result["std"] == 0.0
    assert result["ci95_t"] == (50.0, 50.0) and result["ci95_boot"] == (50.0, 50.0)


def test_summary_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="empty"):
        stats.summary([])
    with pytest.raises(ValueError, match="NaN"):
        stats.summary([1.0, float("nan")])


@pytest.mark.parametrize("names", PAIRS)
def test_welch_matches_scipy(names):
    a, b = SAMPLES[names[0]], SAMPLES[names[1]]
    result = stats.welch(a, b)
    reference = scipy.stats.ttest_ind(a, b, equal_var=False)
    assert result["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    assert result["t"] == pytest.approx(reference.statistic)
    assert result["df"] == pytest.approx(reference.df)
    assert result["p"] == pytest.approx(reference.pvalue)
    ci = reference.confidence_interval(0.95)
    assert result["ci95"] == pytest.approx((ci.low, ci.high))


def test_welch_needs_two_per_group_and_handles_zero_spread():
    with pytest.raises(ValueError, match="at least 2"):
        stats.welch([1.0], [1.0, 2.0])
    assert stats.welch([1.0, 1.0], [2.0, 2.0]) == {"diff": -1.0, "t": None, "df": None, "p": None, "ci95": None}


@pytest.mark.parametrize("a, b", PAIRED)
def test_paired_matches_scipy(a, b):
    result = stats.paired(a, b)
    reference = scipy.stats.ttest_rel(a, b)
    assert result["diff"] == pytest.approx(np.mean(a - b))
    assert result["t"] == pytest.approx(reference.statistic)
    assert result["df"] == pytest.approx(reference.df)
    assert result["p"] == pytest.approx(reference.pvalue)
    ci = reference.confidence_interval(0.95)
    assert result["ci95"] == pytest.approx((ci.low, ci.high))
    differences = a - b
    assert stats.cohens_dz(a, b) == pytest.approx(differences.mean() / differences.std(ddof=1))


def test_paired_rejects_unequal_lengths_and_handles_constant_differences():
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired([1.0, 2.0], [1.0, 2.0, 3.0])
    result = stats.paired([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert result["diff"] == 1.0 and result["p"] is None and result["ci95"] is None
    assert stats.cohens_dz([2.0, 3.0, 4.0], [1.0, 2.0, 3.0]) is None


def test_cohens_d_by_hand():
    # a: mean 2, var 1 (n=3); b: mean 5, var 4 (n=3): pooled var (2*1 + 2*4)/4 = 2.5.
    assert stats.cohens_d([1.0, 2.0, 3.0], [3.0, 5.0, 7.0]) == pytest.approx(-3 / np.sqrt(2.5))
    # Unequal sizes: a n=2 var 2, b n=4 var 5/3: pooled (1*2 + 3*5/3)/4 = 7/4.
    assert stats.cohens_d([1.0, 3.0], [1.0, 2.0, 3.0, 4.0]) == pytest.approx((2 - 2.5) / np.sqrt(7 / 4))
    assert stats.cohens_d([1.0, 1.0], [1.0, 1.0]) is None


def test_column_mean_ci95_skips_missing_entries():
    matrix = np.array([[1.0, 2.0, np.nan], [3.0, np.nan, np.nan], [5.0, 4.0, 7.0]])
    count, mean, low, high = stats.column_mean_ci95(matrix)
    assert count.tolist() == [3, 2, 1]
    assert mean.tolist() == [3.0, 3.0, 7.0]
    expected = scipy.stats.t.interval(0.95, 2, loc=3.0, scale=scipy.stats.sem([1.0, 3.0, 5.0]))
    assert (low[0], high[0]) == pytest.approx(expected)
    assert np.isnan(low[2]) and np.isnan(high[2])


def test_clip_interval():
    assert stats.clip_interval((-3.0, 104.5), (0.0, 100.0)) == (0.0, 100.0)
    assert stats.clip_interval((10.0, 20.0), (0.0, 100.0)) == (10.0, 20.0)
    assert stats.clip_interval(None, (0.0, 100.0)) is None and stats.clip_interval((-5.0, 1.0), None) == (-5.0, 1.0)


def _holm_by_hand(p):
    """Holm written out: sort ascending, multiply the i-th smallest (0-based) by m - i, running max, cap at 1."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    adjusted, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted


@pytest.mark.parametrize("p", [[0.01, 0.04, 0.03, 0.005], [0.2, 0.001, 0.9], [0.5], [0.04, 0.04, 0.04]])
def test_holm_by_hand(p):
    assert stats.holm(p) == pytest.approx(_holm_by_hand(p))
    # The smallest p is multiplied by m (Bonferroni) and nothing adjusted is below its raw p.
    assert min(stats.holm(p)) == pytest.approx(min(1.0, len(p) * min(p)))
    assert all(a >= raw for a, raw in zip(stats.holm(p), p))


def test_holm_skips_untested():
    assert stats.holm([0.01, None, 0.02]) == pytest.approx([0.02, None, 0.02]) and stats.holm([None]) == [None]


def _power(n, sd, delta, alpha=0.05):
    """Two-sided two-sample t power, written out: P(|T| > t_crit), T ~ nct(2n - 2, delta / (sd * sqrt(2 / n)))."""
    df = 2 * n - 2
    ncp = delta / (sd * np.sqrt(2 / n))
    t_crit = scipy.stats.t.ppf(1 - alpha / 2, df)
    return scipy.stats.nct.sf(t_crit, df, ncp) + scipy.stats.nct.cdf(-t_crit, df, ncp)


@pytest.mark.parametrize("sd, delta", [(1.0, 1.0), (1.3, 0.5), (0.4, 2.0), (2.0, -1.0), (1.0, 0.2)])
def test_seeds_needed_is_the_smallest_n_with_80_percent_power(sd, delta):
    result = stats.seeds_needed(sd, delta)
    n = result["n"]
    assert result["more_than"] is None and n >= 2
    assert _power(n, sd, abs(delta)) >= 0.8
    assert n == 2 or _power(n - 1, sd, abs(delta)) < 0.8
    # Sanity against the normal approximation n = 2 (z_0.975 + z_0.8)^2 sd^2 / delta^2 (t needs a little more).
    approx = 2 * (scipy.stats.norm.ppf(0.975) + scipy.stats.norm.ppf(0.8)) ** 2 * sd**2 / delta**2
    assert approx - 1 <= n <= approx + 3


def test_seeds_needed_caps_and_undefined():
    assert stats.seeds_needed(5.0, 0.1) == {"n": None, "more_than": 1000}
    assert _power(1000, 5.0, 0.1) < 0.8
    assert stats.seeds_needed(1.0, 0.0) == {"n": None, "more_than": 1000}
    assert stats.seeds_needed(0.0, 1.0) is None and stats.seeds_needed(None, 1.0) is None


def test_pooled_sd_by_hand():
    assert stats.pooled_sd([1.0, 2.0, 3.0], [3.0, 5.0, 7.0]) == pytest.approx(np.sqrt(2.5))
    assert stats.pooled_sd([1.0], [2.0]) is None
