"""The reliability diagram of a run (reliability.png): accuracy against confidence in 15 equal-width bins, on the
clean test images and on their PGD adversarial images (engine.calibration: Guo et al. 2017), with the ECE in each
panel's title and the share of images per bin below. Drawn on a matplotlib Figure with the Agg canvas (no pyplot)
and written atomically, as writers/plots.py."""
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from engine import calibration
from writers.atomic import atomic_path

PANELS = (('clean', 'clean_confidence', 'clean images'), ('pgd', 'pgd_confidence', 'PGD adversarial images'))


def reliability_figure(columns, title=''):
    """The Figure for per-example columns (writers.examples: clean / clean_confidence, pgd / pgd_confidence);
    a panel for each pair present."""
    panels = [(correct, conf, label) for correct, conf, label in PANELS if correct in columns and conf in columns]
    figure = Figure(figsize=(4.2 * max(len(panels), 1), 4.6))
    for k, (correct_key, confidence_key, label) in enumerate(panels):
        confidence = np.asarray(columns[confidence_key], dtype=np.float64)
        correct = np.asarray(columns[correct_key], dtype=np.float64)
        r = {key: np.asarray(value) for key, value in calibration.reliability(confidence, correct).items()}
        error = 100 * calibration.ece(confidence, correct)
        axes = figure.add_subplot(2, len(panels), k + 1)
        left, width = r['edges'][:-1], np.diff(r['edges'])
        filled = r['count'] > 0
        axes.bar(left[filled], 100 * r['accuracy'][filled], width=width[filled], align='edge', edgecolor='black',
                 linewidth=0.5, color='C0', label='accuracy')
        axes.bar(left[filled], 100 * (r['confidence'][filled] - r['accuracy'][filled]), width=width[filled],
                 bottom=100 * r['accuracy'][filled], align='edge', color='C3', alpha=0.3, hatch='//',
                 label='gap to confidence')
        axes.plot([0, 1], [0, 100], color='gray', linestyle='--', linewidth=1, label='perfect calibration')
        axes.set(xlim=(0, 1), ylim=(0, 100), ylabel='accuracy in bin (%)',
                 title=f'{label}: ECE {error:.2f}% (n = {len(confidence)})')
        axes.legend(loc='upper left', fontsize='small')
        share = figure.add_subplot(2, len(panels), len(panels) + k + 1, sharex=axes)
        share.bar(left, 100 * r['count'] / max(len(confidence), 1), width=width, align='edge', color='gray')
        share.set(xlabel='confidence (largest softmax probability), 15 equal-width bins', ylabel='images (%)')
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def write_reliability(path, columns, title=''):
    """reliability_figure(columns, title) saved as a PNG at path (atomic); nothing when no panel has data."""
    if not any(correct in columns and conf in columns for correct, conf, _ in PANELS):
        return None
    figure = reliability_figure(columns, title)
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, format='png')
    return path
