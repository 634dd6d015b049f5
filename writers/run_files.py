"""The files of one run folder: params.json, metrics.jsonl / metrics.csv / tensorboard/, final.json and
final.md, failed.json, provenance.json, log.txt, and run.py eval's eval.json / eval.md. Writes are atomic
(writers.atomic) where a reader could otherwise see half a file; metrics.jsonl and log.txt are appended a line at
a time and flushed."""
import csv
import io
import json
import math
import os
import time

from engine.errors import UserError
from writers.atomic import write_json_atomic, write_text_atomic
from writers.tables import format_table

# What the engine writes into a run folder: the only entries --output.overwrite=true removes.
RUN_FILES = ('params.json', 'metrics.jsonl', 'metrics.csv', 'tensorboard', 'checkpoints', 'final.json', 'final.md',
             'failed.json', 'provenance.json', 'log.txt', 'examples', 'reliability.png', 'robustbench.json',
             'robustbench.safetensors', 'autoattack.log', 'eval')


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

    def read(self, log=None):
        """The records. A torn last line (a kill or a full disk during the append) is dropped, with a message when
        `log` is given; a damaged line before the last is an error naming the file and line."""
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding='utf-8', errors='replace') as f:
            lines = [line for line in f if line.strip()]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise UserError(f'{self.path}: line {number} is not JSON (a damaged file; delete the run or '
                                    'repair that line)') from None
                if log is not None:
                    log(f'{self.path}: dropped a torn last line ({line.strip()[:40]!r}...), left by a kill or a '
                        'failed write')
        return records

    def truncate_after(self, epoch, log=None):
        """Start or resume: keep only the epochs the checkpoint has (a kill can land between the two writes)."""
        kept = [r for r in self.read(log) if r['epoch'] <= epoch]
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
        """Append one epoch. Non-finite values are refused: null in these files means "not measured", and a
        diverged run is stopped (engine.train.run_state) before it gets here."""
        bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise ValueError(f'{self.path}: non-finite {", ".join(bad)} in epoch {record.get("epoch")}')
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


def write_eval(out_dir, about, label, row, settings):
    """eval.json (`about`: what was evaluated, the row and the settings) and eval.md in out_dir (run.py eval);
    returns the table's text."""
    table = format_table({label: row}, settings)
    write_json_atomic(os.path.join(out_dir, 'eval.json'), {**about, 'label': label, 'row': row, 'settings': settings})
    write_text_atomic(os.path.join(out_dir, 'eval.md'), table + '\n')
    return table


def write_failed(run_dir, epoch, reason, value):
    """failed.json: the run stopped at `epoch` because `reason` (value: the offending number, as text)."""
    write_json_atomic(os.path.join(run_dir, 'failed.json'), {
        'epoch': epoch, 'reason': reason, 'value': str(value), 'time': time.strftime('%Y-%m-%dT%H:%M:%S%z')})


def read_failed(run_dir):
    """failed.json's content, or None when the run has not failed."""
    path = os.path.join(run_dir, 'failed.json')
    if not os.path.exists(path):
        return None
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def append_provenance(run_dir, record):
    """provenance.json: a list with one record per process that worked on the run (start, resume)."""
    path = os.path.join(run_dir, 'provenance.json')
    records = []
    if os.path.exists(path):
        try:
            with open(path, encoding='utf-8') as f:
                records = json.load(f)
        except (OSError, ValueError):
            records = []
    write_json_atomic(path, [*(records if isinstance(records, list) else []), record])


class ConsoleLog:
    """log(message): print it and append it to <run>/log.txt (flushed per line), so the folder keeps what the
    console showed. The file is opened without following a symlink."""

    def __init__(self, run_dir, log=print):
        self.log = log
        fd = os.open(os.path.join(run_dir, 'log.txt'), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        self.file = os.fdopen(fd, 'a', encoding='utf-8')

    def __call__(self, message):
        self.log(message)
        if not self.file.closed:
            self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
            self.file.flush()

    def close(self):
        self.file.close()
