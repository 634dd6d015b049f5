"""The files of one run folder: params.json, metrics.jsonl / metrics.csv / tensorboard/, final.json and
final.md, and a checkpoint's -eval.json / -eval.md. Writes are atomic (writers.atomic) where a reader could
otherwise see half a file; metrics.jsonl is appended a line at a time and flushed."""
import csv
import io
import json
import os

from writers.atomic import json_safe, write_json_atomic, write_text_atomic
from writers.tables import format_table


class MetricsLog:
    """A run's per-epoch metrics, one record per finished epoch, in three forms:
    - metrics.jsonl: one JSON object per line, appended and flushed (the record of truth; compare reads it);
    - metrics.csv: the same records as a table, rewritten atomically each epoch (columns in order of first
      appearance; a metric not measured in an epoch is empty);
    - tensorboard/: TensorBoard scalars (one tag per numeric metric, step = epoch), when `tensorboard` is true and
      the tensorboard package is installed."""

    def __init__(self, run_dir, tensorboard=True):
        self.path = os.path.join(run_dir, 'metrics.jsonl')
        self.csv_path = os.path.join(run_dir, 'metrics.csv')
        self.tensorboard_dir = os.path.join(run_dir, 'tensorboard') if tensorboard else None
        self._board = None

    def read(self):
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, epoch):
        """Start or resume: keep only the epochs the checkpoint has (a kill can land between the two writes)."""
        kept = [r for r in self.read() if r['epoch'] <= epoch]
        write_text_atomic(self.path, ''.join(json.dumps(r) + '\n' for r in kept))
        self._write_csv(kept)
        if self.tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the package is optional
                self.tensorboard_dir = None
            else:  # purge_step: a resumed run's events replace those written after its checkpoint
                self._board = SummaryWriter(self.tensorboard_dir, purge_step=epoch + 1)

    def append(self, record):
        record = json_safe(record)
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
            f.flush()
            os.fsync(f.fileno())
        self._write_csv(self.read())
        if self._board is not None:
            for key, value in record.items():
                if key != 'epoch' and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._board.add_scalar(key, value, global_step=record['epoch'])
            self._board.flush()

    def close(self):
        """Stop the TensorBoard writer's thread and close its file (a sweep runs many runs in one process)."""
        if self._board is not None:
            self._board.close()
            self._board = None

    def _write_csv(self, records):
        columns = list(dict.fromkeys(key for r in records for key in r))
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator='\n')
        writer.writerow(columns)
        writer.writerows([['' if r.get(c) is None else r[c] for c in columns] for r in records])
        write_text_atomic(self.csv_path, buffer.getvalue())


def write_params(run_dir, params):
    write_json_atomic(os.path.join(run_dir, 'params.json'), params)


def write_final(run_dir, rows, settings, **about):
    """final.json (rows, settings and `about`: method, seed) and final.md; returns the table's text."""
    table = format_table(rows, settings)
    write_json_atomic(os.path.join(run_dir, 'final.json'), {'rows': rows, 'settings': settings, **about})
    write_text_atomic(os.path.join(run_dir, 'final.md'), table + '\n')
    return table


def write_eval(stem, checkpoint, row, settings):
    """<stem>-eval.json and <stem>-eval.md beside an evaluated checkpoint; returns the table's text."""
    table = format_table({os.path.basename(checkpoint): row}, settings)
    write_json_atomic(stem + '-eval.json', {'checkpoint': checkpoint, 'row': row, 'settings': settings})
    write_text_atomic(stem + '-eval.md', table + '\n')
    return table
