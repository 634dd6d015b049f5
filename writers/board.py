"""TensorBoard records of a finished run, beside the per-epoch scalars of writers.run_files.MetricsLog in
<run>/tensorboard/: the run's resolved params as hparams (so runs compare in the HParams tab) and its final table
as scalars 'final_table/<row>/<column>'.

Written into the run's own tensorboard/ folder, not a subfolder (SummaryWriter.add_hparams makes a timestamped
one), so one run is one HParams session holding both its params and all its scalars; the tab shows a session's
last value of each scalar as a metric.

Of the three hparams summaries only the session's start and end are written, not the experiment summary:
TensorBoard (2.21, checked with a two-run logdir) takes the first experiment summary it finds, of whichever run,
as the tab's columns, so one run's summary would hide the params and final-table rows that only other runs have
(an ema_final row, a preset column). Without one, it builds the columns from every session's params and scalars,
with the values each string param takes as filter choices.
"""
import json
import math
import os

# The final-table events go to a file of their own, named with this suffix, which a rewrite of the final table
# replaces (one final table per run, whatever happened before); MetricsLog's files are never touched.
FINAL_SUFFIX = '.final_table'
TAG_PREFIX = 'final_table'


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def hparam_values(params):
    """params.json's flat values as TensorBoard hparams hold them: numbers and strings as they are; booleans as
    'true' / 'false' (torch's hparams() tests int before bool and would store them as 1.0 / 0.0, and as text the
    HParams tab can filter on them); lists and anything else as their JSON text, e.g. '[100, 150]'."""
    values = {}
    for key, value in params.items():
        if isinstance(value, bool):
            values[key] = 'true' if value else 'false'
        elif _is_number(value) or isinstance(value, str):
            values[key] = value
        else:
            values[key] = json.dumps(value)
    return values


def final_scalars(rows, last_epoch):
    """{tag: (value, step)} of every numeric column of every row of final.json 'rows' (null, NaN and text are
    left out), tag 'final_table/<row>/<column>', step the row's epoch (its checkpoint's), else `last_epoch`. The
    epoch column is the step, not a scalar of its own."""
    scalars = {}
    for row, columns in rows.items():
        if not isinstance(columns, dict):
            continue
        epoch = columns.get('epoch')
        step = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else last_epoch
        for column, value in columns.items():
            if column != 'epoch' and _is_number(value):
                scalars[f'{TAG_PREFIX}/{row}/{column}'] = (float(value), step)
    return scalars


def write_final_board(run_dir, params, rows):
    """Write the run's hparams (params: params.json's dict) and its final table (rows: final.json's 'rows') as
    scalars, which the HParams tab shows as the session's metrics, into <run_dir>/tensorboard/. Returns the event
    file's path, or None when nothing was written: output.tensorboard is false, or the tensorboard package is not
    installed (it is optional, as for MetricsLog)."""
    if params.get('output.tensorboard', True) is False:
        return None
    try:
        from torch.utils.tensorboard.summary import hparams, scalar
        from torch.utils.tensorboard.writer import FileWriter
    except ImportError:
        return None
    epochs = params.get('training.epochs')
    scalars = final_scalars(rows, epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else 0)
    _, start, end = hparams(hparam_values(params), {})  # the experiment summary left out: see the docstring
    folder = os.path.join(run_dir, 'tensorboard')
    os.makedirs(folder, exist_ok=True)
    for path in _final_event_files(folder):  # an earlier final table of this run: replaced, not shown beside it
        os.remove(path)
    writer = FileWriter(folder, filename_suffix=FINAL_SUFFIX)
    try:
        for summary in (start, end):  # the end marks the session STATUS_SUCCESS: the run finished
            writer.add_summary(summary)
        for tag, (value, step) in scalars.items():
            writer.add_summary(scalar(tag, value), global_step=step)
    finally:
        writer.close()
    return _final_event_files(folder)[0]


def _final_event_files(folder):
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if name.startswith('events.out.tfevents.') and name.endswith(FINAL_SUFFIX)]
