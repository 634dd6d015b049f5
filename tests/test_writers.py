"""writers.run_files.MetricsLog: metrics.jsonl, metrics.csv and TensorBoard scalars agree, also across a resume."""
import csv
import json
import math
import threading

import pytest

from writers.run_files import MetricsLog

RECORDS = [{'epoch': 1, 'lr': 0.1, 'train_loss': 2.0, 'train_robust_acc': None},
           {'epoch': 2, 'lr': 0.1, 'train_loss': 1.5, 'train_robust_acc': None, 'test_pgd_acc': 40.0},
           {'epoch': 3, 'lr': 0.01, 'train_loss': None, 'train_robust_acc': None, 'test_pgd_acc': 45.5}]


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.reader(f))


def test_jsonl_and_csv_hold_the_same_records_and_truncate_together(tmp_path):
    log = MetricsLog(str(tmp_path), tensorboard=False)
    log.truncate_after(0)
    for r in RECORDS:
        log.append(r)
    assert [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')] == RECORDS
    with pytest.raises(ValueError, match='non-finite train_loss'):  # null means "not measured", never NaN
        log.append({'epoch': 4, 'train_loss': math.nan})
    rows = read_csv(tmp_path / 'metrics.csv')
    assert rows[0] == ['epoch', 'lr', 'train_loss', 'train_robust_acc', 'test_pgd_acc']  # first-seen order
    assert rows[1:] == [['1', '0.1', '2.0', '', ''], ['2', '0.1', '1.5', '', '40.0'], ['3', '0.01', '', '', '45.5']]
    MetricsLog(str(tmp_path), tensorboard=False).truncate_after(1)  # a resume from the epoch-1 checkpoint
    assert len(open(tmp_path / 'metrics.jsonl').readlines()) == 1
    assert read_csv(tmp_path / 'metrics.csv') == [['epoch', 'lr', 'train_loss', 'train_robust_acc'],
                                                  ['1', '0.1', '2.0', '']]
    assert not (tmp_path / 'tensorboard').exists()


def test_tensorboard_scalars_per_epoch_replaced_on_resume(tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    threads = threading.active_count()
    log = MetricsLog(str(tmp_path))
    log.truncate_after(0)
    for r in RECORDS:
        log.append(r)
    log.close()
    assert threading.active_count() == threads, 'a closed log must not leave its writer thread running'
    resumed = MetricsLog(str(tmp_path))
    resumed.truncate_after(1)  # killed after epoch 1's checkpoint: epochs 2 and 3 are trained again
    resumed.append({'epoch': 2, 'lr': 0.1, 'train_loss': 1.25})
    resumed.close()
    events = EventAccumulator(str(tmp_path / 'tensorboard'))
    events.Reload()
    assert sorted(events.Tags()['scalars']) == ['lr', 'test_pgd_acc', 'train_loss']  # numbers only
    assert [(e.step, e.value) for e in events.Scalars('train_loss')] == [(1, 2.0), (2, 1.25)]
    assert [(e.step, e.value) for e in events.Scalars('test_pgd_acc')] == []
