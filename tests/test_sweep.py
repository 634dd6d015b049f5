"""run.py sweep: methods x seeds (x grid) from one config, one folder per run, resuming what is unfinished."""
import json
import os

import numpy as np
import pytest

from engine.errors import ConfigError, UserError
from engine.sweep import main as sweep, parse_seeds

TINY = ['--data.dataset=synthetic', '--data.synthetic_n_train=1088', '--data.synthetic_n_test=256',
        '--data.synthetic_classes=4', '--data.synthetic_shape=3,16,16', '--data.val_size=64',
        '--model.arch=small_cnn', '--model.width=8', '--attack.eps=16', '--attack.step_size=8', '--attack.steps=2',
        '--training.epochs=2', '--training.batch_size=64', '--schedule.milestones=2', '--method.sgls_start_epoch=2',
        '--evaluation.subset=128', '--evaluation.pgd_steps=2', '--evaluation.final_pgd_steps=3',
        '--evaluation.cw_steps=0', '--evaluation.fgsm=false', '--evaluation.autoattack=false']


def test_sweep_runs_resumes_skips_and_compares(tmp_path):
    args = TINY + [f'--data.dir={tmp_path / "data"}', '--methods', 'at,sgls', '--seeds', '0-1',
                   '--out', str(tmp_path / 'sweep')]
    logs = []
    sweep([], args + ['--training.stop_after=1'], log=logs.append)  # as if killed after one epoch
    names = sorted(os.listdir(tmp_path / 'sweep'))
    assert names == ['at-s0', 'at-s1', 'sgls-s0', 'sgls-s1']
    assert not any(os.path.exists(tmp_path / 'sweep' / n / 'final.json') for n in names)
    logs.clear()
    sweep([], args + ['--compare'], log=logs.append)
    assert 'sweep ' in logs[0] and '4 runs, 0 done, 4 to resume' in logs[0]
    assert sum('resuming after epoch 1' in line for line in logs) == 4
    for n in names:
        params = json.load(open(tmp_path / 'sweep' / n / 'params.json'))
        assert (params['method.name'], params['training.seed']) == (n.split('-')[0], int(n[-1]))
        assert len(open(tmp_path / 'sweep' / n / 'metrics.jsonl').readlines()) == 2
    report = open(tmp_path / 'sweep' / 'compare' / 'report.md').read()
    assert '- at: 2 run(s), seeds [0, 1]' in report and '- sgls: 2 run(s), seeds [0, 1]' in report
    final_pgd = {m: [json.load(open(tmp_path / 'sweep' / f'{m}-s{s}' / 'final.json'))['rows']['final']['pgd']
                     for s in (0, 1)] for m in ('at', 'sgls')}
    final_section = report.split('## Final epoch')[1].split('## Gaps')[0]
    for m, values in final_pgd.items():  # the report's row is these runs' mean and sample SD
        assert f'| PGD | {m} | 2 | {np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} |' in final_section, report
    diff = np.mean(final_pgd['sgls']) - np.mean(final_pgd['at'])
    assert f'| sgls | final.pgd | {diff:.2f} |' in report, report
    logs.clear()
    sweep([], args, log=logs.append)
    assert '4 runs, 4 done' in logs[0] and len(logs) == 1


def test_grid_names_runs_by_value(tmp_path):
    out = tmp_path / 'g'
    sweep([], TINY + [f'--data.dir={tmp_path / "data"}', '--training.epochs=1', '--seeds=3', '--methods=at',
                      '--grid', 'attack.eps=8,16', '--out', str(out)], log=lambda *_: None)
    assert sorted(os.listdir(out)) == ['at-eps16-s3', 'at-eps8-s3']
    assert json.load(open(out / 'at-eps8-s3' / 'params.json'))['attack.eps'] == 8.0


@pytest.mark.parametrize('args,error', [
    (['--seeds', '0-x'], "--seeds: expected e.g. 0-4"),
    (['--seeds', '1,1'], 'repeats a seed'),
    (['--methods', 'at,sgsl'], "unknown method 'sgsl'"),
    (['--grid', 'attack.epz=1,2'], "unknown key 'attack.epz'"),
    (['--grid', 'attack.eps'], 'expected section.key=v1,v2'),
])
def test_bad_sweep_arguments(tmp_path, args, error):
    with pytest.raises((UserError, ConfigError), match=error.replace('(', r'\(')):
        sweep([], TINY + args + ['--out', str(tmp_path)], log=lambda *_: None)


def test_parse_seeds():
    assert parse_seeds('0-4') == [0, 1, 2, 3, 4] and parse_seeds('0,3,7') == [0, 3, 7]
