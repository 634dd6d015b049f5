"""Per-example (image by image) statistics of two methods evaluated on the same test images.

Pure functions on 0/1 correctness arrays (1 = the image was classified correctly under that attack); no file I/O
(engine.compare reads examples/<row>.csv). Differences are other - base, in accuracy points (percent). With 500 test
images the test-set sampling alone has a binomial SE of about 2.2 points, so these statistics separate what the
seeds contribute to a difference from what the choice of test images does.
"""
import numpy as np
from scipy.stats import binom

from engine.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE


# Cells of one (replicates x distinct image columns) block of the bootstrap.
CHUNK_CELLS = 2_000_000


def _draw_counts(draws, size):
    """(B x k) seed indices -> (B x size) how many times each seed was drawn in each resample."""
    counts = np.zeros((draws.shape[0], size))
    np.add.at(counts, (np.arange(draws.shape[0])[:, None], draws), 1)
    return counts


def _correct(values, name):
    array = np.asarray(values, dtype=np.float64)
    if array.size and not np.all((array == 0) | (array == 1)):
        raise ValueError(f"{name}: expected 0/1 correctness values")
    return array


def mcnemar_exact(other, base):
    """Exact two-sided McNemar test of two classifiers on the same images (other[i], base[i]: 0/1 correct).

    b = #(other correct, base wrong), c = #(base correct, other wrong). Under H0 (equal accuracy) each discordant
    image is b or c with probability 1/2, so b ~ Binomial(b + c, 1/2) and, the null being symmetric,
        p = min(1, 2 * P(X <= min(b, c))),  X ~ Binomial(b + c, 1/2)
    (= scipy.stats.binomtest(b, b + c, 0.5).pvalue); p = 1 when b + c = 0. diff = (b - c) / n in points.
    """
    other, base = _correct(other, "other"), _correct(base, "base")
    if other.shape != base.shape or other.ndim != 1:
        raise ValueError(f"McNemar needs two equal-length 1-D arrays, got {other.shape} and {base.shape}")
    b = int(np.sum((other == 1) & (base == 0)))
    c = int(np.sum((other == 0) & (base == 1)))
    p = 1.0 if b + c == 0 else float(min(1.0, 2 * binom.cdf(min(b, c), b + c, 0.5)))
    return {"b": b, "c": c, "n": int(other.size), "diff": 100.0 * (b - c) / other.size if other.size else None,
            "p": p}


def two_level_bootstrap(other, base, *, paired, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED):
    """Percentile CI of the mean accuracy difference (other - base, points), resampling seeds and test images.

    other: (S_o x n), base: (S_b x n) 0/1 correctness, one row per seed, column i the same test image in every row.
    Each of B resamples draws
      - seeds: with paired=True (S_o = S_b, row s of both arms the same seed) S seed pairs with replacement, the same
        for both arms; else S_o other seeds and S_b base seeds independently;
      - test images: n images with replacement, ONE draw shared by every run of both arms. The test set is crossed
        with the seeds, not nested in them (every run saw the same images), so its sampling error is common to all
        runs and to both arms of a pair: a fresh image draw per run would average that error away over the seeds
        and understate it.
    The replicate is  delta* = 100 / n * sum_i w_i * (mean_{s in S_o*} other[s, i] - mean_{s in S_b*} base[s, i])
    with w_i the number of times image i was drawn. Vectorised: images with the same column of 0/1 values across all
    runs are interchangeable, so the image draw is taken as multinomial counts over those distinct columns
    (w ~ Multinomial(n, count_u / n)), which has exactly the distribution of the summed per-image counts. Draw order
    (fixed seed): the other arm's seed indices (B x S_o), then the base arm's (unpaired only), then the image counts
    in chunks of replicates.

    Returns {"diff": observed, "ci95": (low, high), "se": SD of the replicates, "resamples": B}.
    """
    other, base = _correct(other, "other"), _correct(base, "base")
    if other.ndim != 2 or base.ndim != 2 or other.shape[1] != base.shape[1] or other.shape[1] == 0:
        raise ValueError(f"need (seeds x images) arrays over the same images, got {other.shape} and {base.shape}")
    if paired and other.shape[0] != base.shape[0]:
        raise ValueError(f"paired seeds need as many seeds per arm, got {other.shape[0]} and {base.shape[0]}")
    s_other, s_base, n = other.shape[0], base.shape[0], other.shape[1]
    # Distinct image columns (over all runs of both arms) and how many images share each.
    columns, counts = np.unique(np.vstack([other, base]), axis=1, return_counts=True)
    other_u, base_u = columns[:s_other], columns[s_other:]
    rng = np.random.default_rng(seed)
    seeds_other = rng.integers(0, s_other, size=(resamples, s_other))
    seeds_base = seeds_other if paired else rng.integers(0, s_base, size=(resamples, s_base))
    # How often each seed was drawn (B x S): the seed-resampled mean of an arm on column u is counts @ column / S.
    weights_other = _draw_counts(seeds_other, s_other) / s_other
    weights_base = _draw_counts(seeds_base, s_base) / s_base
    probabilities = counts / n
    replicates = np.empty(resamples)
    # Chunks of replicates keep the (chunk x U) matrices small whatever the number of distinct columns U.
    chunk = max(1, CHUNK_CELLS // columns.shape[1])
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        image_counts = rng.multinomial(n, probabilities, size=stop - start)  # (chunk x U)
        arm_diff = weights_other[start:stop] @ other_u - weights_base[start:stop] @ base_u
        replicates[start:stop] = 100.0 * np.sum(image_counts * arm_diff, axis=1) / n
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return {"diff": float(100.0 * (other.mean() - base.mean())), "ci95": (float(low), float(high)),
            "se": float(replicates.std(ddof=1)), "resamples": int(resamples)}


def variance_decomposition(other, base, *, paired):
    """How much of the uncertainty of the mean difference comes from the seeds and how much from the test sample.

    Per-seed accuracies A_s = 100 * mean_i x[s, i] (points). Seed part of the variance of the mean difference:
      paired:   var_s(A_other,s - A_base,s) / S            (ddof 1; per seed: var_s(...) itself)
      unpaired: var_s(A_other,s) / S_o + var_s(A_base,s) / S_b
    Test-sample part: the images are one sample shared by every run, so with D_i = mean_s other[s, i] -
    mean_s base[s, i] (the per-image difference averaged over seeds)
      100^2 * var_i(D_i) / n                               (ddof 1)
    and, per seed (paired), the binomial variance of one seed's difference on n images,
      100^2 * mean_s var_i(other[s, i] - base[s, i]) / n.
    seed_fraction = seed part / (seed part + test-sample part). Seed parts are None with fewer than 2 seeds.
    """
    other, base = _correct(other, "other"), _correct(base, "base")
    n = other.shape[1]
    acc_other, acc_base = 100.0 * other.mean(axis=1), 100.0 * base.mean(axis=1)
    image_var = float(1e4 * np.var(other.mean(axis=0) - base.mean(axis=0), ddof=1) / n) if n > 1 else None
    result = {"seed_var_per_seed": None, "image_var_per_seed": None, "seed_fraction_per_seed": None,
              "seed_var_of_mean": None, "image_var_of_mean": image_var, "seed_fraction": None}
    if paired:
        per_seed = acc_other - acc_base
        if per_seed.size >= 2:
            result["seed_var_per_seed"] = float(np.var(per_seed, ddof=1))
            result["seed_var_of_mean"] = result["seed_var_per_seed"] / per_seed.size
        if n > 1:
            result["image_var_per_seed"] = float(1e4 * np.mean(np.var(other - base, axis=1, ddof=1)) / n)
    elif acc_other.size >= 2 and acc_base.size >= 2:
        result["seed_var_of_mean"] = float(np.var(acc_other, ddof=1) / acc_other.size
                                           + np.var(acc_base, ddof=1) / acc_base.size)
    if paired and result["seed_var_per_seed"] is not None and result["image_var_per_seed"] is not None:
        total = result["seed_var_per_seed"] + result["image_var_per_seed"]
        result["seed_fraction_per_seed"] = result["seed_var_per_seed"] / total if total > 0 else None
    if result["seed_var_of_mean"] is not None and image_var is not None:
        total = result["seed_var_of_mean"] + image_var
        result["seed_fraction"] = result["seed_var_of_mean"] / total if total > 0 else None
    return result


def compare_examples(other, base, *, paired_seeds, resamples=BOOTSTRAP_RESAMPLES):
    """Per-example statistics of one attack column: other / base {seed: 0/1 array over the shared images}.

    McNemar per seed pair when both arms ran the same seeds; the two-level bootstrap (seed pairs when paired_seeds,
    the data order being the same for equal seeds, else each arm's seeds independently) and the variance split.
    """
    seeds_match = sorted(other) == sorted(base)
    result = {"n_images": int(len(next(iter(other.values())))),
              "mcnemar": {str(s): mcnemar_exact(other[s], base[s]) for s in sorted(base)} if seeds_match else None,
              "mcnemar_note": None if seeds_match else "the two groups ran different seeds: no McNemar per seed pair"}
    paired = paired_seeds and seeds_match
    order_other = sorted(other) if paired else list(other)
    other_matrix = np.array([other[s] for s in order_other])
    base_matrix = np.array([base[s] for s in (order_other if paired else list(base))])
    result["bootstrap"] = two_level_bootstrap(other_matrix, base_matrix, paired=paired, resamples=resamples)
    result["paired_seeds"] = paired
    result["variance"] = variance_decomposition(other_matrix, base_matrix, paired=paired)
    return result
