"""engine.calibration against the formulas written out here (numpy, float64, a plain loop over the bins):
ECE with 15 equal-width bins (b/15, (b+1)/15], 0 in the first; reliability data; NLL; per-example statistics."""
import math

import numpy as np
import pytest
import torch

from engine import calibration as calib

BINS = 15


def reference_bins(conf, correct, bins=BINS):
    """Per bin (count, mean confidence, accuracy) by the definition: bin b holds b/bins < c <= (b+1)/bins, and
    bin 0 also c = 0 (gpleiss/temperature_scaling's convention, with 0 kept)."""
    conf, correct = np.asarray(conf, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    out = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        in_bin = (conf > lo) & (conf <= hi)
        if b == 0:
            in_bin |= conf == 0
        count = int(in_bin.sum())
        out.append((count, conf[in_bin].mean() if count else math.nan, correct[in_bin].mean() if count else math.nan))
    return out


def reference_ece(conf, correct, bins=BINS):
    n = len(conf)
    return sum(count / n * abs(acc - c) for count, c, acc in reference_bins(conf, correct, bins) if count)


def confidences_with_edges(seed=0):
    rng = np.random.default_rng(seed)
    edges = [k / BINS for k in range(BINS + 1)]   # every edge, 0 and 1 included, twice
    conf = np.concatenate([rng.uniform(0, 1, 300), edges, edges, [1.0, 1.0, 0.0, np.nextafter(1 / BINS, 1)]])
    correct = rng.uniform(size=conf.shape) < conf   # roughly calibrated, so the gaps are small and signed both ways
    return conf, correct


def test_ece_and_reliability_equal_the_definition():
    conf, correct = confidences_with_edges()
    got = calib.reliability(torch.from_numpy(conf), torch.from_numpy(correct), BINS)
    want = reference_bins(conf, correct)
    assert got['count'].tolist() == [count for count, _, _ in want]
    assert int(got['count'].sum()) == len(conf)   # nothing dropped, 0 and 1 included
    for key, column in (('confidence', 1), ('accuracy', 2)):
        expected = torch.tensor([row[column] for row in want], dtype=torch.float64)
        assert torch.allclose(got[key], expected, rtol=1e-12, atol=0, equal_nan=True), key
    assert calib.ece(torch.from_numpy(conf), torch.from_numpy(correct)) == pytest.approx(
        reference_ece(conf, correct), rel=1e-12, abs=1e-15)
    for bins in (1, 10):
        assert calib.ece(torch.from_numpy(conf), torch.from_numpy(correct), bins) == pytest.approx(
            reference_ece(conf, correct, bins), rel=1e-12, abs=1e-15)


def test_edge_values_fall_in_the_lower_bin():
    edges = torch.tensor([k / BINS for k in range(BINS + 1)], dtype=torch.float64)
    # k/15 closes bin k-1; 0 opens bin 0; 1.0 is in the last bin
    assert calib.bin_index(edges).tolist() == [0] + list(range(BINS))
    assert calib.bin_index(torch.tensor([np.nextafter(1 / BINS, 1)])).tolist() == [1]
    assert calib.edges().tolist() == edges.tolist()


def test_ece_of_calibrated_bins_is_zero_and_of_empty_input_nan():
    conf = torch.full((10,), 0.5, dtype=torch.float64)   # all in one bin, half of them right
    correct = torch.arange(10) % 2 == 0
    assert calib.ece(conf, correct) == 0.0
    assert calib.ece(torch.ones(4), torch.zeros(4, dtype=torch.bool)) == 1.0   # sure and always wrong
    assert math.isnan(calib.ece(torch.zeros(0), torch.zeros(0, dtype=torch.bool)))
    with pytest.raises(ValueError):
        calib.ece(torch.tensor([1.5]), torch.tensor([True]))


def test_nll_and_example_stats_equal_the_formulas():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(50, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (50,), generator=g)
    z, y = logits.numpy(), labels.numpy()
    log_p = z - (np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) + z.max(1, keepdims=True))
    log_p_true = log_p[np.arange(50), y]
    assert calib.nll(torch.from_numpy(log_p_true)) == pytest.approx(-log_p_true.mean(), rel=1e-12)
    assert calib.nll_from_logits(logits, labels) == pytest.approx(-log_p_true.mean(), rel=1e-12)
    stats = calib.example_stats(logits, labels)
    others = np.where(np.arange(7)[None, :] == y[:, None], -np.inf, z).max(1)
    assert np.allclose(stats['margin'].numpy(), z[np.arange(50), y] - others, rtol=1e-12, atol=1e-12)
    assert np.allclose(stats['confidence'].numpy(), np.exp(log_p).max(1), rtol=1e-12, atol=0)
    assert np.allclose(stats['nll'].numpy(), -log_p_true, rtol=1e-12, atol=0)
    assert torch.equal(stats['margin'] > 0, logits.argmax(1) == labels)
    half = calib.example_stats(logits.to(torch.bfloat16), labels)   # half-precision logits are widened
    assert half['confidence'].dtype == torch.float32
