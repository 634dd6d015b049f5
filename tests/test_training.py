"""End to end: short runs on synthetic data and on real Fashion-MNIST; exact resume; run-folder rules."""
import json
import os

import pytest
import torch

from engine import checkpoint, config
from engine.errors import UserError
from engine.eval_model import eval_model
from engine.train.loop import train

TIMING = ('epoch_time_s', 'images_per_s')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('data')


def tiny(data_dir, out_dir, *extra, name='run'):
    """4 classes of 16x16 synthetic images, a narrow CNN, PGD-3 at eps 16/255: about a second per epoch here."""
    return config.load(cli_args=[
        '--data.dataset=synthetic', f'--data.dir={data_dir}', '--data.synthetic_n_train=2112',
        '--data.synthetic_n_test=512', '--data.synthetic_classes=4', '--data.synthetic_shape=3,16,16',
        '--data.val_size=64', '--model.arch=small_cnn', '--model.width=8', '--attack.eps=16', '--attack.steps=3',
        '--attack.step_size=8', '--training.epochs=4', '--training.batch_size=64', '--optimizer.lr=0.05',
        '--schedule.milestones=4', '--evaluation.subset=128', '--evaluation.pgd_steps=3',
        '--evaluation.final_pgd_steps=5', '--evaluation.cw_steps=5', '--evaluation.autoattack=false',
        f'--output.dir={out_dir}', f'--output.name={name}', *extra])


def read_run(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        metrics = [json.loads(line) for line in f]
    with open(os.path.join(run_dir, 'final.json')) as f:
        final = json.load(f)
    return metrics, final


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_resumed_run_equals_uninterrupted(data_dir, tmp_path):
    extra = ['--method.name=sgls', '--method.sgls_start_epoch=2']
    full = train(tiny(data_dir, tmp_path, *extra, name='full'), log=lambda *_: None)
    part = tiny(data_dir, tmp_path, *extra, '--training.stop_after=2', name='part')
    assert train(part, log=lambda *_: None)
    assert not os.path.exists(os.path.join(tmp_path, 'part', 'final.json'))
    assert len(open(os.path.join(tmp_path, 'part', 'metrics.jsonl')).readlines()) == 2
    train(tiny(data_dir, tmp_path, *extra, '--training.resume=true', name='part'), log=lambda *_: None)
    a = checkpoint.load(os.path.join(full, 'checkpoints', 'last.pt'))
    b = checkpoint.load(os.path.join(tmp_path, 'part', 'checkpoints', 'last.pt'))
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert torch.equal(a['soft_labels']['table'], b['soft_labels']['table'])
    (ma, fa), (mb, fb) = read_run(full), read_run(os.path.join(tmp_path, 'part'))
    assert without_timing(ma) == without_timing(mb)
    assert fa['rows'] == fb['rows']


def test_adversarial_training_beats_chance_and_sgls_softens(data_dir, tmp_path):
    logs = []
    run = train(tiny(data_dir, tmp_path, '--method.name=sgls', '--method.sgls_start_epoch=3', '--training.epochs=5'),
                log=logs.append)
    metrics, final = read_run(run)
    assert [m['epoch'] for m in metrics] == [1, 2, 3, 4, 5]
    assert any('final.md' in line for line in logs)
    final_row = final['rows']['final']
    assert final_row['clean'] > 60 and final_row['pgd'] > 40, final_row  # 4 classes: chance is 25%
    assert final_row['clean'] >= final_row['fgsm'] and final_row['clean'] >= final_row['pgd']
    assert final_row['worst'] <= min(final_row['pgd'], final_row['cw'], final_row['fgsm'])
    assert final['rows']['best']['epoch'] in range(1, 6)
    # Exactly one-hot (max prob 1) before start_epoch; softened from then on.
    assert [m['soft_label_max_mean'] for m in metrics[:2]] == [1.0, 1.0]
    assert all(m['soft_label_max_mean'] < 1.0 for m in metrics[2:])
    for key in ('lr', 'train_loss', 'train_clean_acc', 'train_robust_acc', 'grad_norm', 'test_clean_acc',
                'test_pgd_acc', 'val_clean_acc', 'val_pgd_acc', 'robust_gap', 'epoch_time_s', 'images_per_s'):
        assert metrics[-1][key] is not None, key
    assert json.load(open(os.path.join(run, 'params.json')))['method.name'] == 'sgls'
    # eval of the saved final checkpoint reproduces the final row exactly (the same evaluation seed).
    row = eval_model(['--checkpoint', os.path.join(run, 'checkpoints', 'last.pt'), '--evaluation.autoattack=false'],
                     log=lambda *_: None)
    assert {k: v for k, v in row.items() if k != 'epoch'} == {k: v for k, v in final_row.items()
                                                              if k not in ('epoch', 'same_as')}


@pytest.mark.parametrize('method', ['ce', 'trades', 'sgls_trades'])
def test_every_method_trains(data_dir, tmp_path, method):
    run = train(tiny(data_dir, tmp_path, f'--method.name={method}', '--method.sgls_start_epoch=2',
                     '--training.epochs=3', '--evaluation.fgsm=false', '--evaluation.cw_steps=0'),
                log=lambda *_: None)
    metrics, final = read_run(run)
    assert final['rows']['final']['clean'] > 50  # chance: 25%
    assert all(m['train_loss'] > 0 for m in metrics)
    assert (metrics[0]['train_robust_acc'] is None) == (method == 'ce')


def test_run_folder_is_never_mixed(data_dir, tmp_path):
    cfg = tiny(data_dir, tmp_path, '--training.epochs=1', '--evaluation.cw_steps=0')
    train(cfg, log=lambda *_: None)
    with pytest.raises(UserError, match='already there'):
        train(cfg, log=lambda *_: None)
    with pytest.raises(UserError, match="different config: attack.eps 16.0 -> 4.0"):
        train(tiny(data_dir, tmp_path, '--training.epochs=1', '--attack.eps=4', '--training.resume=true'),
              log=lambda *_: None)
    # params.json of an older version: lists as comma strings, and without a key added since; the same run
    params_path = os.path.join(tmp_path, 'run', 'params.json')
    params = json.load(open(params_path))
    assert params['schedule.milestones'] == [4]
    params['schedule.milestones'], params['data.synthetic_shape'] = '4', '3,16,16'
    del params['method.noise_seed']
    json.dump(params, open(params_path, 'w'))
    resumed = tiny(data_dir, tmp_path, '--training.epochs=2', '--training.resume=true', '--evaluation.cw_steps=0')
    train(resumed, log=lambda *_: None)
    assert [r['epoch'] for r in read_run(os.path.join(tmp_path, 'run'))[0]] == [1, 2]
    with pytest.raises(UserError, match=r"different config: schedule.milestones \(4,\) -> \(3,\)"):
        train(tiny(data_dir, tmp_path, '--training.epochs=3', '--training.resume=true', '--schedule.milestones=3'),
              log=lambda *_: None)
    train(tiny(data_dir, tmp_path, '--training.epochs=1', '--output.overwrite=true'), log=lambda *_: None)


FMNIST = '/usr/share/datasets/fashion-mnist'


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason='apt install dataset-fashion-mnist')
def test_real_fashion_mnist_subset(tmp_path_factory, tmp_path):
    """Three short epochs of SGLS (from epoch 2) on 3,000 real Fashion-MNIST images at eps 0.1."""
    cfg = config.load(cli_args=[
        '--data.dataset=fashion-mnist', f'--data.dir={tmp_path_factory.mktemp("fm")}', '--data.train_limit=3000',
        '--data.val_size=500', '--model.arch=small_cnn', '--model.width=16', '--attack.eps=25.5',
        '--attack.step_size=6.4', '--attack.steps=5', '--method.name=sgls', '--method.sgls_start_epoch=2',
        '--training.epochs=3', '--training.batch_size=100', '--optimizer.lr=0.05', '--schedule.kind=cosine',
        '--evaluation.subset=500', '--evaluation.pgd_steps=5', '--evaluation.final_n=500',
        '--evaluation.final_pgd_steps=10', '--evaluation.cw_steps=0', '--evaluation.autoattack=false',
        f'--output.dir={tmp_path}'])
    metrics, final = read_run(train(cfg, log=lambda *_: None))
    row = final['rows']['final']
    assert row['n'] == 500
    assert row['clean'] > 50 and row['pgd'] > 25, final['rows']  # 10 classes: chance is 10%
    assert metrics[0]['soft_label_max_mean'] == 1.0
    assert metrics[1]['soft_label_max_mean'] < 0.98 and metrics[2]['soft_label_max_mean'] < 0.98, metrics
