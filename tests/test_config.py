"""The strict config layer: none of fastargs' traps reach a user."""
import json
import os
import subprocess
import sys

import pytest

from engine import config
from engine.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'run.py'), *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=120)


def test_defaults_reproduce_official_code():
    cfg = config.load()
    assert (cfg.attack.eps, cfg.attack.step_size, cfg.attack.steps) == (8.0, 2.0, 10)
    assert (cfg.method.sgls_alpha, cfg.method.sgls_lam, cfg.method.sgls_start_epoch) == (0.9, 0.2, 90)
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.1, 0.9, 5e-4)
    assert (cfg.training.epochs, cfg.training.batch_size, cfg.schedule.milestones) == (200, 128, (100, 150))


@pytest.mark.parametrize('text,expected', [('False', False), ('false', False), ('0', False), ('no', False),
                                           ('True', True), ('1', True), ('on', True)])
def test_bool_from_command_line_means_what_it_says(text, expected):
    assert config.load(cli_args=['--training.resume', text]).training.resume is expected
    assert config.load(cli_args=[f'--training.resume={text}']).training.resume is expected


def test_priority_defaults_file_cli(tmp_path):
    f = tmp_path / 'a.yaml'
    f.write_text('training:\n  epochs: 7\n  seed: 3\nmethod:\n  name: sgls\n')
    cfg = config.load([str(f)], ['--training.seed=5'])
    assert (cfg.training.epochs, cfg.training.seed, cfg.method.name) == (7, 5, 'sgls')


def test_environment_variables_are_ignored(monkeypatch):
    monkeypatch.setenv('training.epochs', '3')
    assert config.load().training.epochs == 200


@pytest.mark.parametrize('yaml_text,needle', [
    ('training:\n  epoch: 3\n', "unknown key 'training.epoch' (did you mean training.epochs"),
    ('trainin:\n  epochs: 3\n', "unknown section 'trainin' (did you mean training"),
    ('training:\n  epochs: 1.5\n', "'training.epochs' must be an int"),
    ('training:\n  epochs: 0\n', "'training.epochs' must be an int in [1, ]"),
    ('optimizer:\n  momentum: 2\n', "'optimizer.momentum' must be a float in [0.0, 1.0]"),
    ('method:\n  name: sgld\n', "'method.name' must be one of ce, at, trades, sgls, sgls_trades"),
    ('training:\n  resume: maybe\n', "'training.resume' must be true/false"),
    ('training: 3\n', "section 'training' must be a mapping"),
    ('- a\n- b\n', 'expected a mapping of sections'),
    ('training: [\n', 'not valid YAML'),
    ('schedule:\n  milestones: 150,100\n', "'schedule.milestones' must be a list of ints (comma separated or a "
                                            "YAML list), increasing, got '150,100'"),
    ('schedule:\n  milestones: [100, x]\n', "'schedule.milestones' must be a list of ints"),
    ('data:\n  synthetic_shape: 3,32\n', "'data.synthetic_shape' must be a list of 3 ints"),
    # PyYAML keeps the last of two equal keys: a second `training:` block silently dropped epochs 3 back to 200.
    ('training:\n  epochs: 3\nmodel:\n  width: 4\ntraining:\n  seed: 1\n', "line 5: key 'training' is given twice "
                                                                          '(first at line 1)'),
    ('training:\n  epochs: 3\n  seed: 1\n  epochs: 5\n', "line 4: key 'epochs' is given twice (first at line 2)"),
    ('training:\n  device: tpu\n', "'training.device' must be auto, cpu, cuda or cuda:N (N an int), got 'tpu'"),
    ('training:\n  device: cuda:x\n', "'training.device' must be auto, cpu, cuda or cuda:N"),
    ('attack:\n  step_size: 0\n', "'attack.step_size' must be a float in (0.0, ]"),  # 0: PGD never moves
    ('attack:\n  eps: 256\n', "'attack.eps' must be a float in [0.0, 255.0]"),
    ('output:\n  name: ../../victim\n', "'output.name' must be a folder name"),
])
def test_bad_yaml_names_file_and_key(tmp_path, yaml_text, needle):
    f = tmp_path / 'bad.yaml'
    f.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        config.load([str(f)])
    assert needle in str(e.value) and str(f) in str(e.value)


@pytest.mark.parametrize('args,needle', [
    (['--training.epochz=3'], "command line: unknown key 'training.epochz'"),
    (['--attack.eps=big'], "command line: 'attack.eps' must be a float"),
    (['--training.resume'], "'--training.resume' needs a value"),
    (['epochs=3'], 'expected --section.key=value'),
])
def test_bad_command_line(args, needle):
    with pytest.raises(ConfigError) as e:
        config.load(cli_args=args)
    assert needle in str(e.value)


def test_run_py_exits_nonzero_with_message(tmp_path):
    f = tmp_path / 'bad.yaml'
    f.write_text('optimizer:\n  lr: fast\n')
    for args in (['train', '-C', str(f)], ['train', '--training.epochz=1'], ['train', '-C', str(tmp_path / 'no.yaml')],
                 ['frobnicate'], ['eval', '--checkpoint', str(tmp_path / 'none.pt')]):
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.startswith('error: ') and 'Traceback' not in r.stderr, r.stderr
    assert "'optimizer.lr' must be a float" in run_cli('train', '-C', str(f)).stderr


def test_help_lists_every_key():
    r = run_cli('train', '--help')
    assert r.returncode == 0
    for key in config.KEYS:
        assert f'--{key}' in r.stdout


def test_flat_roundtrip_through_params_json():
    cfg = config.load(cli_args=['--method.name=trades', '--attack.eps=4'])
    params = json.loads(json.dumps(config.flat(cfg)))
    assert config.flat(config.load(base=params)) == params


def test_every_shipped_config_is_what_its_name_says():
    """configs/<dataset>/<arch>_<method>.yaml trains that method, arch and dataset (one YAML per row of the
    SGLS README table); the demo config is the Fashion-MNIST AT run demo.sh sweeps."""
    import glob
    files = sorted(glob.glob(os.path.join(ROOT, 'configs', '*', '*.yaml')))
    assert len(files) == 16
    for f in files:
        dataset, stem = os.path.basename(os.path.dirname(f)), os.path.splitext(os.path.basename(f))[0]
        arch, method = next((a, stem[len(a) + 1:]) for a in ('resnet18', 'wrn34_10') if stem.startswith(a + '_'))
        cfg = config.load([f])
        assert (cfg.data.dataset, cfg.model.arch, cfg.method.name) == (dataset, arch, method), f
        assert cfg.output.name == f'{dataset}-{arch}-{method}', f
        # the official recipe: 200 epochs, PGD-10 at 8/255 with step 2/255, lr 0.1 decayed at 100 and 150
        assert (cfg.training.epochs, cfg.attack.eps, cfg.attack.step_size, cfg.attack.steps) == (200, 8, 2, 10), f
        assert (cfg.optimizer.lr, cfg.schedule.milestones) == (0.1, (100, 150)), f
        if method.startswith('sgls'):
            assert (cfg.method.sgls_alpha, cfg.method.sgls_lam) == (0.9, 0.2), f
    demo = config.load([os.path.join(ROOT, 'configs', 'fashion_mnist_demo.yaml')])
    assert (demo.data.dataset, demo.method.name) == ('fashion-mnist', 'at')


def test_lists_are_parsed_once_into_typed_values(tmp_path):
    f = tmp_path / 'lists.yaml'
    f.write_text('schedule:\n  milestones: [30, 60]\ndata:\n  synthetic_shape: 1,8,8\nmodel:\n  mean: [0.5]\n')
    cfg = config.load([str(f)])
    assert (cfg.schedule.milestones, cfg.data.synthetic_shape, cfg.model.mean, cfg.model.std) == \
        ((30, 60), (1, 8, 8), (0.5,), ())
    assert config.load(cli_args=['--schedule.milestones=30,60']).schedule.milestones == (30, 60)
    params = config.flat(cfg)
    assert params['schedule.milestones'] == [30, 60] and json.loads(json.dumps(params)) == params


def test_choices_come_from_the_registries():
    from engine.data.datasets import DATASETS
    from engine.methods import METHODS, PARAMS
    from engine.models import ARCHS
    assert config.KEYS['data.dataset'].checker.choices == tuple(DATASETS)
    assert config.KEYS['model.arch'].checker.choices == ARCHS
    assert config.KEYS['method.name'].checker.choices == tuple(METHODS)
    assert {k for k in config.KEYS if k.startswith('method.')} == {'method.name'} | {f'method.{k}' for k in PARAMS}
    for cls in METHODS.values():  # every parameter a method reads is a config key
        assert set(cls.params) <= set(PARAMS), cls


def test_run_py_convert(tmp_path):
    ok = run_cli('convert', '--data.dataset=synthetic', f'--data.dir={tmp_path}', '--data.synthetic_n_train=64',
                 '--data.synthetic_n_test=32')
    assert ok.returncode == 0, ok.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in ok.stdout.splitlines()[-2:])
    missing = run_cli('convert', '--data.dataset=cifar10', f'--data.dir={tmp_path / "c"}',
                      f'--data.source={tmp_path / "nowhere.tar.gz"}')
    assert missing.returncode == 2 and 'nowhere.tar.gz' in missing.stderr, missing.stderr
    assert not os.path.exists(tmp_path / 'c') or not os.listdir(tmp_path / 'c')


def test_evaluation_presets_and_drop_last(tmp_path):
    cfg = config.load()
    assert cfg.evaluation.presets == () and cfg.data.drop_last is True
    assert config.load(cli_args=['--evaluation.presets=pgd20_rslad, pgd20_sgls']).evaluation.presets == \
        ('pgd20_rslad', 'pgd20_sgls')   # the given order: the table's column order
    f = tmp_path / 'p.yaml'
    f.write_text('evaluation:\n  presets: [pgd20_trades]\ndata:\n  drop_last: false\n')
    cfg = config.load([str(f)])
    assert (cfg.evaluation.presets, cfg.data.drop_last) == (('pgd20_trades',), False)
    assert config.flat(cfg)['evaluation.presets'] == ['pgd20_trades']
    for bad in ('pgd20_madry', 'pgd20_sgls,pgd20_sgls'):
        with pytest.raises(ConfigError, match="'evaluation.presets' must be a list of distinct names"):
            config.load(cli_args=[f'--evaluation.presets={bad}'])


def test_attack_units_are_stated_per_norm():
    """attack.eps and step_size are in 1/255 for linf and in pixel units for l2: the help says which, and the default
    (linf 8) is 8/255 while an l2 radius is taken as given (engine.train.build.attack_budget)."""
    from engine.train.build import attack_budget
    text = config.help_text()
    assert '1/255 for linf' in text and 'pixel units' in text and '--attack.confirm_eps' in text
    assert attack_budget(config.load())['eps'] == 8 / 255
    l2 = attack_budget(config.load(cli_args=['--attack.norm=l2', '--attack.eps=0.5', '--attack.step_size=0.1']))
    assert (l2['norm'], l2['eps'], l2['step_size']) == ('l2', 0.5, 0.1)
