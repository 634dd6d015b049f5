"""Calibration of a classifier's confidences: expected calibration error (ECE), negative log-likelihood (NLL) and the
data of a reliability diagram, as Guo et al. 2017 ("On Calibration of Modern Neural Networks", sec. 2) define them.

confidence = the largest softmax probability, correct = the argmax is the label. The bins are `bins` equal-width
intervals of [0, 1] with edges e_i = i / bins (float64); bin b (0-based) holds the confidences in (e_b, e_{b+1}], the
convention of the reference implementation, gpleiss/temperature_scaling (temperature_scaling.py, _ECELoss, commit
126a509: `confidences.gt(bin_lower) * confidences.le(bin_upper)` over `linspace(0, 1, n_bins + 1)`): a confidence on
an inner edge falls in the lower bin, and 1.0 in the last one. One difference: the reference drops a confidence of
exactly 0; here it is in the first bin, so the bins' counts always sum to n (a max softmax probability is at least
1 / classes, so real confidences never hit it).

ece / nll / reliability run on the host over the evaluation's per-example columns (small 1-D tensors), in float64.
example_stats is the per-batch part: pure tensor ops on the device, no host sync.
"""
import torch
import torch.nn.functional as F

from engine.precision import upcast

BINS = 15


def example_stats(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per example, from logits [B, C] and labels [B] (computed in at least float32): 'confidence' (max softmax
    probability), 'nll' (-log p_label) and 'margin' (label logit minus the largest other logit: > 0 exactly when the
    prediction is right, up to ties)."""
    logits = upcast(logits)
    log_p = F.log_softmax(logits, dim=1)
    true_logit = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], float('-inf')).amax(dim=1)
    return {'confidence': log_p.amax(dim=1).exp(), 'nll': -log_p.gather(1, labels[:, None]).squeeze(1),
            'margin': true_logit - other}


def bin_index(confidence: torch.Tensor, bins: int = BINS) -> torch.Tensor:
    """The bin (0 .. bins - 1) of each confidence: b with e_b < c <= e_{b+1}; 0 goes to bin 0 (see the module doc)."""
    confidence = torch.as_tensor(confidence, dtype=torch.float64).reshape(-1)
    if bins < 1:
        raise ValueError(f'bins must be >= 1; got {bins}')
    if confidence.numel() and not bool(((confidence >= 0) & (confidence <= 1)).all()):
        raise ValueError('confidences must lie in [0, 1]')
    # searchsorted (left) returns the i with e_{i-1} < c <= e_i, so c lands in bin i - 1.
    return (torch.searchsorted(edges(bins), confidence) - 1).clamp(min=0)


def edges(bins: int = BINS) -> torch.Tensor:
    """The bins + 1 edges i / bins, float64 (correctly rounded, unlike an accumulated linspace step)."""
    return torch.arange(bins + 1, dtype=torch.float64) / bins


def reliability(confidence: torch.Tensor, correct: torch.Tensor, bins: int = BINS) -> dict:
    """A reliability diagram's data: 'edges' (bins + 1), and per bin 'count' (int64), 'confidence' (mean confidence)
    and 'accuracy' (fraction correct, 0-1), both NaN in an empty bin. float64 tensors on the CPU."""
    confidence = torch.as_tensor(confidence, dtype=torch.float64).reshape(-1).cpu()
    correct = torch.as_tensor(correct).reshape(-1).cpu().to(torch.float64)
    if confidence.shape != correct.shape:
        raise ValueError(f'confidence and correct differ in length: {confidence.numel()} and {correct.numel()}')
    index = bin_index(confidence, bins)
    count = torch.bincount(index, minlength=bins)
    nonempty = count.to(torch.float64).where(count > 0, torch.nan)
    return {'edges': edges(bins), 'count': count,
            'confidence': torch.bincount(index, weights=confidence, minlength=bins) / nonempty,
            'accuracy': torch.bincount(index, weights=correct, minlength=bins) / nonempty}


def ece(confidence: torch.Tensor, correct: torch.Tensor, bins: int = BINS) -> float:
    """Expected calibration error as a fraction (0-1): sum over bins of |B_b| / n * |acc(B_b) - conf(B_b)|, empty
    bins contributing nothing. NaN for no examples. (engine.evaluate reports 100 times this, in percent.)"""
    r = reliability(confidence, correct, bins)
    n = int(r['count'].sum())
    if n == 0:
        return float('nan')
    filled = r['count'] > 0
    gaps = (r['accuracy'][filled] - r['confidence'][filled]).abs()
    return float((r['count'][filled].to(torch.float64) * gaps).sum() / n)


def nll(log_prob_true: torch.Tensor) -> float:
    """Mean negative log-likelihood in nats from each example's log-probability of its label (NaN for none)."""
    log_prob_true = torch.as_tensor(log_prob_true, dtype=torch.float64).reshape(-1)
    return float(-log_prob_true.mean()) if log_prob_true.numel() else float('nan')


def nll_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood in nats of logits [N, C] for labels [N] (the mean cross entropy)."""
    log_p = F.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)
    return nll(log_p.gather(1, torch.as_tensor(labels).reshape(-1, 1).to(log_p.device)).squeeze(1))
