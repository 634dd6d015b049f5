"""Per-example results of one evaluated checkpoint: examples/<row>.csv (run folders) or examples.csv (run.py eval).

One line per test image, keyed by its index in the test beton, so two methods evaluated on the same images can be
compared image by image (engine.grouping.read_examples reads it back). Columns, in this order:
- index, label;
- clean_margin: the true class's logit minus the largest other logit on the clean image (> 0: correct);
- clean_confidence, clean_nll: the largest softmax probability and -log p(label) on the clean image;
- pgd_confidence, pgd_nll: the same on the PGD adversarial image (when PGD ran);
- one 0/1 column per evaluated attack: clean, fgsm, pgd, cw, autoattack, then one per evaluation preset, then worst
  (correct under every attack at the run's eps). An empty cell: that attack did not run on that image (AutoAttack
  on the first evaluation.autoattack_n images only).
Floats are written with 7 significant digits (float32's precision)."""
import csv
import io
import math

from writers.atomic import write_text_atomic

VALUE_COLUMNS = ('index', 'label', 'clean_margin', 'clean_confidence', 'clean_nll', 'pgd_confidence', 'pgd_nll')
ATTACK_COLUMNS = ('clean', 'fgsm', 'pgd', 'cw', 'autoattack')


def column_order(columns, presets=()):
    """The file's columns for these per-example columns: VALUE_COLUMNS, ATTACK_COLUMNS, presets, worst, then any
    other (in their own order), each only when present."""
    known = VALUE_COLUMNS + ATTACK_COLUMNS + tuple(presets) + ('worst',)
    return [c for c in known if c in columns] + [c for c in columns if c not in known]


def _cell(value):
    if value is None:
        return ''
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return '' if math.isnan(value) else f'{value:.7g}'
    return str(value)


def write_examples(path, columns, presets=()):
    """Write the per-example columns (name -> 1-D tensor or list, all of one length) to path atomically."""
    names = column_order(columns, presets)
    values = [columns[name].tolist() if hasattr(columns[name], 'tolist') else list(columns[name]) for name in names]
    lengths = {len(v) for v in values}
    if len(lengths) > 1:
        raise ValueError(f'{path}: per-example columns of different lengths: '
                         + ', '.join(f'{n} {len(v)}' for n, v in zip(names, values)))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(names)
    writer.writerows([_cell(v) for v in row] for row in zip(*values))
    write_text_atomic(path, buffer.getvalue())

