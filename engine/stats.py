"""Many-seed statistics, written out from the textbook formulas (numpy + Student-t quantiles from scipy).

Pure functions on 1-D arrays of per-seed values; no file I/O. Every result is a plain dict of Python floats so it
can go straight into summary.json. Where a quantity is undefined (one seed, zero spread) the value is None, never
NaN: a reader of the JSON or the report then sees "not available" instead of a number that looks like one.
"""
import numpy as np
from scipy.stats import nct
from scipy.stats import t as student_t

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
# A fixed seed makes the bootstrap CI a deterministic function of the data: re-running a report gives the same numbers.
BOOTSTRAP_SEED = 0
# Below this many seeds a percentile bootstrap of the mean is not reported: with n values there are only
# C(2n-1, n) distinct resamples (10 for n = 3, 35 for n = 4), and the percentile interval of so few, drawn from
# the sample's own range, is far too narrow (its coverage of a 95% interval is about 75% at n = 3).
MIN_BOOTSTRAP_N = 5
# Seeds-needed search: alpha and power of the planned two-sample t-test, and the largest n per arm tried.
POWER_ALPHA = 0.05
POWER_TARGET = 0.8
POWER_MAX_N = 1000


def _as_sample(values, name="values"):
    sample = np.asarray(values, dtype=np.float64).ravel()
    if sample.size == 0:
        raise ValueError(f"{name} is empty: a statistic needs at least one value")
    if not np.all(np.isfinite(sample)):
        raise ValueError(f"{name} contains NaN or inf: {sample.tolist()}")
    return sample


def _t_quantile(df):
    """Two-sided critical value of Student's t for CONFIDENCE with df degrees of freedom."""
    return float(student_t.ppf(0.5 + CONFIDENCE / 2, df))


def _two_sided_p(t_value, df):
    return float(2 * student_t.sf(abs(t_value), df))


def _interval(center, half_width):
    return (float(center - half_width), float(center + half_width))


def bootstrap_mean_ci(sample, *, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED):
    """Percentile bootstrap CI of the mean: resample the seeds with replacement, take the 2.5 and 97.5 percentiles."""
    sample = _as_sample(sample)
    rng = np.random.default_rng(seed)
    resampled_means = sample[rng.integers(0, sample.size, size=(resamples, sample.size))].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(resampled_means, [tail, 100 - tail])
    return (float(low), float(high))


def summary(values):
    """n, mean, std (ddof=1), sem, ci95_t (Student t) and ci95_boot (percentile bootstrap, fixed seed, B=10000).

    With n=1 the spread is unknown: std, sem, ci95_t and ci95_boot are None (only n and mean are meaningful).
    ci95_boot is None below MIN_BOOTSTRAP_N values (see there). With n>=2 and identical values the spread is a
    genuine 0 and both CIs collapse to (mean, mean).
    """
    sample = _as_sample(values)
    n = int(sample.size)
    mean = float(sample.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "sem": None, "ci95_t": None, "ci95_boot": None}
    std = float(sample.std(ddof=1))
    sem = std / np.sqrt(n)
    return {
        "n": n,
        "mean": mean,
        "std": std,
        "sem": float(sem),
        "ci95_t": _interval(mean, _t_quantile(n - 1) * sem),
        "ci95_boot": bootstrap_mean_ci(sample) if n >= MIN_BOOTSTRAP_N else None,
    }


def _require_two(sample, name):
    if sample.size < 2:
        raise ValueError(f"{name} has {sample.size} value(s): a t-test needs at least 2 per group")


def welch(a, b):
    """Welch's unequal-variance t-test of mean(a) - mean(b).

    df from the Welch-Satterthwaite equation; p two-sided; ci95 of the difference uses the same df.
    Both groups need n>=2 (ValueError otherwise). If both groups have zero spread the standard error is 0 and the
    test is undefined: t, df, p and ci95 are None, diff is still reported.
    """
    a, b = _as_sample(a, "a"), _as_sample(b, "b")
    _require_two(a, "a")
    _require_two(b, "b")
    diff = float(a.mean() - b.mean())
    # Squared standard error of each group's mean; their sum is the variance of the difference.
    var_mean_a = a.var(ddof=1) / a.size
    var_mean_b = b.var(ddof=1) / b.size
    se = np.sqrt(var_mean_a + var_mean_b)
    if se == 0:
        return _t_test(diff, se, None)
    df = (var_mean_a + var_mean_b) ** 2 / (var_mean_a**2 / (a.size - 1) + var_mean_b**2 / (b.size - 1))
    return _t_test(diff, se, df)


def paired(a, b):
    """Paired t-test on the per-pair differences a[i] - b[i] (i = same seed, hence same data order).

    df = n-1; ci95 of the mean difference. Needs equal lengths and n>=2 (ValueError otherwise). If every pair has
    the same difference the spread is 0 and t, p and ci95 are None; diff and df are still reported.
    """
    a, b = _as_sample(a, "a"), _as_sample(b, "b")
    if a.size != b.size:
        raise ValueError(f"paired test needs equal lengths, got {a.size} and {b.size}")
    differences = a - b
    _require_two(differences, "the paired differences")
    n = differences.size
    diff = float(differences.mean())
    df = n - 1
    se = differences.std(ddof=1) / np.sqrt(n)
    return _t_test(diff, se, df)


def _t_test(diff, se, df):
    """{diff, t, df, p (two-sided), ci95} of a t statistic diff/se; t, p and ci95 are None when se is 0."""
    if se == 0:
        return {"diff": diff, "t": None, "df": None if df is None else float(df), "p": None, "ci95": None}
    t_value = diff / se
    return {"diff": diff, "t": float(t_value), "df": float(df), "p": _two_sided_p(t_value, df),
            "ci95": _interval(diff, _t_quantile(df) * se)}


def cohens_d(a, b):
    """Cohen's d: (mean(a) - mean(b)) / pooled SD, pooled SD = sqrt(((na-1)sa^2 + (nb-1)sb^2) / (na+nb-2)).

    None when the pooled SD is 0 or there are fewer than 3 values in total (no degrees of freedom left).
    """
    a, b = _as_sample(a, "a"), _as_sample(b, "b")
    dof = a.size + b.size - 2
    if dof < 1:
        return None
    ss_a = (a.size - 1) * a.var(ddof=1) if a.size > 1 else 0.0
    ss_b = (b.size - 1) * b.var(ddof=1) if b.size > 1 else 0.0
    pooled_sd = np.sqrt((ss_a + ss_b) / dof)
    if pooled_sd == 0:
        return None
    return float((a.mean() - b.mean()) / pooled_sd)


def cohens_dz(a, b):
    """Paired effect size d_z: mean of the differences a[i] - b[i] over their SD (ddof=1). None if n<2 or SD 0."""
    a, b = _as_sample(a, "a"), _as_sample(b, "b")
    if a.size != b.size:
        raise ValueError(f"paired effect size needs equal lengths, got {a.size} and {b.size}")
    differences = a - b
    if differences.size < 2:
        return None
    sd = differences.std(ddof=1)
    if sd == 0:
        return None
    return float(differences.mean() / sd)


def column_mean_ci95(matrix):
    """Per-column mean and Student-t 95% CI of a (runs x epochs) matrix whose missing entries are NaN.

    Used for training curves, where runs may have different lengths or skip evaluation on some epochs. Returns
    (count, mean, low, high) arrays; mean is NaN where a column has no value, low/high NaN where it has fewer than 2.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    present = np.isfinite(matrix)
    count = present.sum(axis=0)
    total = np.where(present, matrix, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        squared_dev = np.where(present, (matrix - mean) ** 2, 0.0).sum(axis=0)
        sem = np.sqrt(squared_dev / (count - 1)) / np.sqrt(count)
        half_width = student_t.ppf(0.5 + CONFIDENCE / 2, np.maximum(count - 1, 1)) * sem
    half_width = np.where(count >= 2, half_width, np.nan)
    return count, mean, mean - half_width, mean + half_width


def clip_interval(bounds, limits):
    """bounds clipped to limits (low, high): a t interval of an accuracy can pass 0% or 100%, the accuracy cannot.

    None stays None; limits None leaves bounds as they are (a quantity without natural bounds, e.g. an NLL diff)."""
    if bounds is None or limits is None:
        return bounds
    low, high = limits
    return (float(min(max(bounds[0], low), high)), float(min(max(bounds[1], low), high)))


def holm(p_values):
    """Holm's step-down adjustment of a family of m p-values (None entries are not tested and stay None).

    With the tested p-values sorted ascending p_(1) <= ... <= p_(m):
        adjusted p_(i) = max over j <= i of min(1, (m - j + 1) * p_(j)),
    returned in the input order. Rejecting where adjusted p < alpha controls the family-wise error rate at alpha.
    """
    tested = [(p, index) for index, p in enumerate(p_values) if p is not None]
    adjusted = [None] * len(p_values)
    m, running = len(tested), 0.0
    for rank, (p, index) in enumerate(sorted(tested)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[index] = float(running)
    return adjusted


def t_test_power(n, sd, delta, alpha=POWER_ALPHA):
    """Power of the two-sided two-sample t-test with n runs per arm (equal n, pooled SD sd) at true difference delta.

    df = 2n - 2, noncentrality ncp = delta / (sd * sqrt(2 / n)), t_crit = t.ppf(1 - alpha / 2, df):
        power = P(T > t_crit) + P(T < -t_crit),  T ~ noncentral t(df, ncp).
    n may be an array (vectorised over n)."""
    n = np.asarray(n, dtype=np.float64)
    df = 2 * n - 2
    ncp = abs(delta) / (sd * np.sqrt(2 / n))
    t_crit = student_t.ppf(1 - alpha / 2, df)
    return nct.sf(t_crit, df, ncp) + nct.cdf(-t_crit, df, ncp)


def seeds_needed(sd, delta, *, alpha=POWER_ALPHA, power=POWER_TARGET, max_n=POWER_MAX_N):
    """Seeds per arm for the two-sample t-test to detect delta with the given power: the smallest n in 2..max_n with
    t_test_power(n, sd, delta, alpha) >= power (see there for the formula; power grows with n).

    {"n": that n, or None, "more_than": max_n when even max_n seeds are not enough (delta 0 included), else None}.
    None (no estimate) when sd is None or 0 or not finite: the spread is unknown, or no noise is seen at all."""
    if sd is None or not np.isfinite(sd) or sd <= 0 or delta is None or not np.isfinite(delta):
        return None
    candidates = np.arange(2, max_n + 1)
    reached = np.flatnonzero(t_test_power(candidates, sd, delta, alpha) >= power)
    if reached.size == 0:
        return {"n": None, "more_than": int(max_n)}
    return {"n": int(candidates[reached[0]]), "more_than": None}


def pooled_sd(a, b):
    """sqrt(((na-1) sa^2 + (nb-1) sb^2) / (na + nb - 2)), the SD Cohen's d divides by; None without a df left."""
    a, b = _as_sample(a, "a"), _as_sample(b, "b")
    dof = a.size + b.size - 2
    if dof < 1:
        return None
    ss = sum((x.size - 1) * x.var(ddof=1) for x in (a, b) if x.size > 1)
    return float(np.sqrt(ss / dof))
