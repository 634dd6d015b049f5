"""What a user sees when something outside the code goes wrong: one message naming the file, field or folder (and
an exit code that tells the kinds apart), never a traceback or a silent wrong result."""
import errno
import json
import os

import pytest
import torch

import run
from engine import checkpoint, config, errors
from engine.errors import ConfigError, UserError
from engine import eval_model
from engine.train import final
from engine.train.build import model_of, open_data


# --- config ---------------------------------------------------------------------------------------------------

def test_non_utf8_yaml_names_file_and_line(tmp_path):
    f = tmp_path / 'latin1.yaml'
    f.write_bytes('training:\n  epochs: 3  # café\n'.encode('latin-1'))
    with pytest.raises(ConfigError) as e:
        config.load([str(f)])
    assert str(e.value) == f'{f}: line 2: not UTF-8 text (byte 0xe9); save the config file as UTF-8'


def test_yaml_merge_keys_are_no_duplicates(tmp_path):
    f = tmp_path / 'merge.yaml'  # `<<:` may override what it merges; only keys written twice are refused
    f.write_text('training: &t {epochs: 3, seed: 1}\nevaluation:\n  every: 2\ndata: {<<: {dir: a}, dir: b}\n')
    cfg = config.load([str(f)])
    assert (cfg.training.epochs, cfg.evaluation.every, cfg.data.dir) == (3, 2, 'b')


@pytest.mark.parametrize('device', ['auto', 'cpu', 'cuda', 'cuda:0', 'cuda:12'])
def test_device_names_accepted(device):
    assert config.load(cli_args=[f'--training.device={device}']).training.device == device


@pytest.mark.parametrize('device', ['tpu', 'gpu', 'CUDA', 'cuda:', 'cuda:-1', 'cuda:1.5', 'cpu:0'])
def test_device_names_refused(device):
    with pytest.raises(ConfigError, match="'training.device' must be auto, cpu, cuda or cuda:N"):
        config.load(cli_args=[f'--training.device={device}'])


def test_attack_budget_limits():
    cfg = config.load(cli_args=['--attack.step_size=0.5', '--attack.eps=255'])
    assert (cfg.attack.step_size, cfg.attack.eps) == (0.5, 255.0)
    for bad in ('--attack.step_size=0', '--attack.step_size=-1', '--attack.eps=255.5'):
        with pytest.raises(ConfigError, match='command line'):
            config.load(cli_args=[bad])


@pytest.mark.parametrize('name', ['.', '..', '../../victim', 'a/b', '/tmp/x', 'a\0b', f'x{os.sep}y'])
def test_output_name_outside_output_dir_refused(name):
    # --output.name=../../victim --output.overwrite=true once deleted files outside output.dir.
    with pytest.raises(ConfigError, match="'output.name' must be a folder name"):
        config.load(cli_args=[f'--output.name={name}', '--output.overwrite=true'])


@pytest.mark.parametrize('name', ['', 'run-1', 'at-s0', '..hidden', 'a.b'])
def test_output_name_single_component_accepted(name):
    assert config.load(cli_args=[f'--output.name={name}']).output.name == name


def test_late_milestones_warn_once(monkeypatch, capsys):
    monkeypatch.setattr(config, '_warned', set())
    for _ in range(3):  # a sweep loads the same config once per run
        config.load(cli_args=['--training.epochs=5'])
    assert capsys.readouterr().err == ('warning: schedule.milestones 100, 150 lie past the last epoch (5): the '
                                       'learning rate stays 0.1 throughout\n')
    config.load(cli_args=['--training.epochs=120', '--optimizer.lr=0.05'])
    config.load(cli_args=['--training.epochs=120'])
    assert capsys.readouterr().err == ('warning: schedule.milestones 150 lies past the last epoch (120): it never '
                                       'lowers the learning rate\n')
    for args in (['--training.epochs=150'], ['--training.epochs=5', '--schedule.kind=cosine'],
                 ['--training.epochs=5', '--schedule.milestones=2,5']):
        config.load(cli_args=args)
    config.load(cli_args=['--training.epochs=4'], advise=False)
    assert capsys.readouterr().err == ''


# --- run.py: exit codes and one-line OS errors ------------------------------------------------------------------

def _raising(error):
    def command(argv):
        raise error
    return command


@pytest.mark.parametrize('code, text', [
    (errno.ENOSPC, 'no space left on device'), (errno.EDQUOT, 'no space left on device (disk quota exceeded)'),
    (errno.EROFS, 'read-only file system'), (errno.EACCES, 'permission denied'), (errno.EPERM, 'permission denied'),
])
def test_cli_os_errors_are_one_line(monkeypatch, capsys, code, text):
    import engine.compare
    monkeypatch.setattr(engine.compare, 'main', _raising(OSError(code, os.strerror(code), '/some/dir')))
    assert run.cli(['compare', 'x']) == 2
    assert capsys.readouterr().err == f'error: /some/dir: {text}\n'


def test_cli_names_the_file_an_atomic_write_was_for(monkeypatch, capsys):
    import engine.compare
    error = OSError(errno.ENOSPC, 'No space left on device', '/runs/r0/.final.json.k2_x9q.tmp')
    monkeypatch.setattr(engine.compare, 'main', _raising(error))
    assert run.cli(['compare', 'x']) == 2
    assert capsys.readouterr().err == 'error: /runs/r0/final.json: no space left on device\n'
    monkeypatch.setattr(engine.compare, 'main', _raising(OSError(errno.ENOSPC, 'No space left on device')))
    assert run.cli(['compare', 'x']) == 2
    assert capsys.readouterr().err == 'error: no space left on device\n'


def test_cli_exit_codes(monkeypatch, capsys):
    import engine.compare

    class Diverged(UserError):
        exit_code = 3
    cases = [(UserError('bad input'), 2, 'error: bad input\n'), (Diverged('loss is nan'), 3, 'error: loss is nan\n'),
             (KeyboardInterrupt(), 130, 'interrupted\n')]
    if hasattr(errors, 'RunFailed'):
        cases.append((errors.RunFailed('diverged'), 3, 'error: diverged\n'))
    for error, code, err in cases:
        monkeypatch.setattr(engine.compare, 'main', _raising(error))
        assert run.cli(['compare', 'x']) == code
        assert capsys.readouterr().err == err
    monkeypatch.setattr(engine.compare, 'main', _raising(FileNotFoundError(errno.ENOENT, 'gone', 'f')))
    with pytest.raises(FileNotFoundError):  # not a user's to fix: a bug, with its traceback
        run.cli(['compare', 'x'])


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders')
def test_cli_real_read_only_folder(tmp_path, capsys):
    from tests.test_compare import AT, make_run
    make_run(tmp_path / 'runs' / 'r0', 'at', 0, AT[0])
    locked = tmp_path / 'locked'
    locked.mkdir(mode=0o555)
    try:
        assert run.cli(['compare', str(tmp_path / 'runs'), '--out', str(locked / 'out')]) == 2
    finally:
        locked.chmod(0o755)
    assert capsys.readouterr().err == f"error: {locked / 'out'}: permission denied\n"


# --- run.py eval: overrides that do not fit; tables printed before files are written --------------------------

TINY = ['--data.dataset=synthetic', '--data.synthetic_n_train=64', '--data.synthetic_n_test=32',
        '--data.synthetic_classes=3', '--data.synthetic_shape=1,16,16', '--data.val_size=16',
        '--model.arch=small_cnn', '--model.width=4', '--training.epochs=1', '--training.batch_size=16',
        '--schedule.milestones=1', '--evaluation.final_n=16', '--evaluation.final_pgd_steps=1',
        '--evaluation.cw_steps=0', '--evaluation.fgsm=false', '--evaluation.autoattack=false',
        '--evaluation.batch_size=16']


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """(cfg, checkpoint path) of a small untrained model on 16x16 synthetic images."""
    folder = tmp_path_factory.mktemp('tiny')
    cfg = config.load(cli_args=[*TINY, f'--data.dir={folder / "data"}', f'--output.dir={folder}'])
    torch.manual_seed(0)
    model = model_of(cfg, 1, torch.device('cpu'))
    path = str(folder / 'last.pt')
    checkpoint.save(path, {'model': model, 'progress': checkpoint.Progress()}, config.flat(cfg))
    return cfg, path


@pytest.mark.parametrize('overrides, named', [
    (['--model.width=8'], '--model.width=8 (saved: 4)'),
    (['--model.arch=resnet18'], '--model.arch=resnet18 (saved: small_cnn)'),
    (['--data.synthetic_classes=5', '--evaluation.final_n=8'], '--data.synthetic_classes=5 (saved: 3)'),
    (['--data.synthetic_shape=3,16,16'], '--data.synthetic_shape=3,16,16 (saved: 1,16,16)'),
    (['--data.dataset=cifar10'], '--data.dataset=cifar10 (saved: synthetic)'),
])
def test_eval_overrides_that_do_not_fit_name_checkpoint_and_keys(tiny, overrides, named):
    _, path = tiny
    with pytest.raises(UserError) as e:
        eval_model.eval_model(['--checkpoint', path, *overrides], log=lambda *_: None)
    message = str(e.value)
    assert message.startswith(f'{path}: the overrides ') and named in message and 'do not fit' in message, message
    assert 'evaluation.final_n' not in message  # an override that fits is not blamed


def test_eval_ignores_an_old_nested_run_name(tiny, tmp_path):
    cfg, path = tiny  # output.name 'sweep/a' was allowed before it had to be one folder; eval never uses it
    state = checkpoint.load(path)
    old = str(tmp_path / 'old.pt')
    torch.save({**state, 'params': json.dumps({**state['params'], 'output.name': 'sweep/a'})}, old)
    with pytest.raises(UserError, match=r'the overrides --model.width=8 \(saved: 4\) do not fit'):
        eval_model.eval_model(['--checkpoint', old, '--model.width=8'], log=lambda *_: None)


def _refuse_writes(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device', 'somewhere')


def test_eval_and_final_print_the_table_before_writing(tiny, monkeypatch):
    cfg, path = tiny
    monkeypatch.setattr(eval_model.example_files, 'write_examples', _refuse_writes)  # the first file written
    monkeypatch.setattr(final, '_write_rows_files', _refuse_writes)
    logged = []
    with pytest.raises(OSError):
        eval_model.eval_model(['--checkpoint', path], log=logged.append)
    out = os.path.join(os.path.dirname(path), 'last-eval')
    assert logged[-1].startswith(f'{out}/eval.md:\n| checkpoint | epoch | clean | pgd | worst |'), logged
    assert '| last.pt | 0 |' in logged[-1] and 'n = 16 examples' in logged[-1]

    loaders, _ = open_data(cfg, torch.device('cpu'), log=lambda *_: None)
    model = model_of(cfg, 1, torch.device('cpu'))
    logged.clear()
    with pytest.raises(OSError):
        final.final_table(cfg, model, loaders, 'RUN', {'epoch': 0}, torch.device('cpu'), logged.append)
    assert logged[-1].startswith('RUN/final.md:\n| checkpoint | epoch |') and '| final | 1 |' in logged[-1], logged
