"""engine.paired_stats against scipy and against the formulas / plain loops written out here."""
import numpy as np
import pytest
import scipy.stats

from engine import paired_stats


def _correlated(rng, seeds, n, p_base, p_other):
    """(seeds x n) 0/1 correctness of two arms whose per-image difficulty is shared (as real models' is)."""
    difficulty = rng.normal(size=n)
    base = (difficulty[None, :] + 0.6 * rng.normal(size=(seeds, n)) < scipy.stats.norm.ppf(p_base)).astype(float)
    other = (difficulty[None, :] + 0.6 * rng.normal(size=(seeds, n)) < scipy.stats.norm.ppf(p_other)).astype(float)
    return other, base


@pytest.mark.parametrize("seed, n, p_other", [(0, 500, 0.55), (1, 200, 0.5), (2, 60, 0.7), (3, 1000, 0.51)])
def test_mcnemar_matches_scipy_binomtest(seed, n, p_other):
    other, base = _correlated(np.random.default_rng(seed), 1, n, 0.5, p_other)
    result = paired_stats.mcnemar_exact(other[0], base[0])
    b = int(np.sum((other[0] == 1) & (base[0] == 0)))
    c = int(np.sum((other[0] == 0) & (base[0] == 1)))
    assert (result["b"], result["c"], result["n"]) == (b, c, n)
    assert result["p"] == pytest.approx(scipy.stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)
    assert result["diff"] == pytest.approx(100 * (other[0].mean() - base[0].mean()))


def test_mcnemar_without_discordant_images_and_bad_input():
    same = np.array([1.0, 0.0, 1.0])
    assert paired_stats.mcnemar_exact(same, same)["p"] == 1.0
    with pytest.raises(ValueError, match="0/1"):
        paired_stats.mcnemar_exact([0.5, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="equal-length"):
        paired_stats.mcnemar_exact([1.0], [1.0, 0.0])


@pytest.mark.parametrize("seed, n", [(0, 400), (1, 1500)])
def test_one_seed_bootstrap_is_scipys_percentile_ci_of_the_paired_difference(seed, n):
    other, base = _correlated(np.random.default_rng(seed), 1, n, 0.5, 0.56)
    result = paired_stats.two_level_bootstrap(other, base, paired=True, resamples=10_000)
    differences = 100 * (other[0] - base[0])
    reference = scipy.stats.bootstrap((differences,), np.mean, n_resamples=10_000, method="percentile",
                                      rng=np.random.default_rng(99)).confidence_interval
    width = reference.high - reference.low
    assert result["diff"] == pytest.approx(differences.mean())
    # Different draws: equal within the Monte Carlo error of the percentiles (a few % of the width).
    assert result["ci95"][0] == pytest.approx(reference.low, abs=0.05 * width)
    assert result["ci95"][1] == pytest.approx(reference.high, abs=0.05 * width)
    assert result["se"] == pytest.approx(differences.std(ddof=1) / np.sqrt(n), rel=0.05)


def _loop_bootstrap(other, base, paired, resamples, rng):
    """The two-level bootstrap as a plain loop: draw seeds (pairs, or per arm), then n image indices shared by
    every run, and take the mean difference over the drawn seeds and images."""
    s_other, s_base, n = other.shape[0], base.shape[0], other.shape[1]
    values = np.empty(resamples)
    for b in range(resamples):
        seeds_other = rng.integers(0, s_other, s_other)
        seeds_base = seeds_other if paired else rng.integers(0, s_base, s_base)
        images = rng.integers(0, n, n)
        values[b] = 100 * (other[seeds_other][:, images].mean() - base[seeds_base][:, images].mean())
    return values


@pytest.mark.parametrize("paired, seeds_base", [(True, 4), (False, 3)])
def test_two_level_bootstrap_agrees_with_a_plain_loop(paired, seeds_base):
    rng = np.random.default_rng(5)
    other, base = _correlated(rng, 4, 300, 0.5, 0.55)
    base = base[:seeds_base]
    # Seed-level spread on top of the image noise: shift each seed's accuracy a little (flip some answers).
    for s in range(other.shape[0]):
        other[s, rng.choice(300, size=8 * s, replace=False)] = 1.0
    result = paired_stats.two_level_bootstrap(other, base, paired=paired, resamples=4000)
    loop = _loop_bootstrap(other, base, paired, 4000, np.random.default_rng(11))
    low, high = np.percentile(loop, [2.5, 97.5])
    assert result["diff"] == pytest.approx(100 * (other.mean() - base.mean()))
    # Independent draws of the same distribution: SDs within 8% and percentiles within 10% of the loop's width.
    assert result["se"] == pytest.approx(loop.std(ddof=1), rel=0.08)
    assert result["ci95"][0] == pytest.approx(low, abs=0.1 * (high - low))
    assert result["ci95"][1] == pytest.approx(high, abs=0.1 * (high - low))


def test_two_level_bootstrap_is_deterministic_and_checks_shapes():
    other, base = _correlated(np.random.default_rng(2), 3, 100, 0.5, 0.6)
    first = paired_stats.two_level_bootstrap(other, base, paired=True, resamples=500)
    assert first == paired_stats.two_level_bootstrap(other, base, paired=True, resamples=500)
    with pytest.raises(ValueError, match="as many seeds"):
        paired_stats.two_level_bootstrap(other, base[:2], paired=True)
    with pytest.raises(ValueError, match="same images"):
        paired_stats.two_level_bootstrap(other, base[:, :50], paired=False)


def test_variance_decomposition_by_formula():
    other, base = _correlated(np.random.default_rng(8), 5, 400, 0.45, 0.5)
    n = other.shape[1]
    paired = paired_stats.variance_decomposition(other, base, paired=True)
    per_seed = 100 * (other.mean(axis=1) - base.mean(axis=1))
    assert paired["seed_var_per_seed"] == pytest.approx(np.var(per_seed, ddof=1))
    assert paired["seed_var_of_mean"] == pytest.approx(np.var(per_seed, ddof=1) / 5)
    image_per_seed = np.mean([np.var(100 * (other[s] - base[s]), ddof=1) / n for s in range(5)])
    assert paired["image_var_per_seed"] == pytest.approx(image_per_seed)
    image_of_mean = np.var(100 * (other.mean(axis=0) - base.mean(axis=0)), ddof=1) / n
    assert paired["image_var_of_mean"] == pytest.approx(image_of_mean)
    assert paired["seed_fraction"] == pytest.approx(paired["seed_var_of_mean"] / (paired["seed_var_of_mean"]
                                                                                 + image_of_mean))
    unpaired = paired_stats.variance_decomposition(other, base[:3], paired=False)
    expected = (np.var(100 * other.mean(axis=1), ddof=1) / 5 + np.var(100 * base[:3].mean(axis=1), ddof=1) / 3)
    assert unpaired["seed_var_of_mean"] == pytest.approx(expected)
    assert unpaired["seed_var_per_seed"] is None


def test_compare_examples_pairs_by_seed_or_notes_why_not():
    other, base = _correlated(np.random.default_rng(4), 3, 200, 0.5, 0.55)
    result = paired_stats.compare_examples({s: other[s] for s in (2, 0, 1)}, {s: base[s] for s in (0, 1, 2)},
                                           paired_seeds=True, resamples=300)
    assert list(result["mcnemar"]) == ["0", "1", "2"] and result["paired_seeds"] is True
    assert result["mcnemar"]["2"] == paired_stats.mcnemar_exact(other[2], base[2])
    unmatched = paired_stats.compare_examples({5: other[0]}, {0: base[0], 1: base[1]}, paired_seeds=True,
                                              resamples=300)
    assert unmatched["mcnemar"] is None and "different seeds" in unmatched["mcnemar_note"]
    assert unmatched["paired_seeds"] is False
