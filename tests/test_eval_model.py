"""run.py eval of any model (issue 15 items 1, 3, 4, 6): an engine checkpoint, a plain state dict, a .safetensors
file and a model factory give the same table; the same checkpoint evaluated twice gives the same numbers; a best
checkpoint chosen at the last epoch is evaluated once; per-example files, the reliability diagram and the
RobustBench export carry the values of final.json; bad inputs are refused with exit code 2, nothing written."""
import json
import os
import sys

import pytest
import torch

import run
from engine import checkpoint
from engine.train.loop import train
from tests.test_training import tiny

DATA = ['--data.dataset=synthetic', '--data.synthetic_n_train=2112', '--data.synthetic_n_test=512',
        '--data.synthetic_classes=4', '--data.synthetic_shape=3,16,16', '--data.val_size=64']
ACCURACIES = ('clean', 'fgsm', 'pgd', 'cw', 'worst', 'ece_clean', 'nll_clean', 'ece_pgd', 'nll_pgd')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A 2-epoch run (best chosen on validation) and its data folder."""
    data_dir, out = tmp_path_factory.mktemp('data'), tmp_path_factory.mktemp('runs')
    run_dir = train(tiny(data_dir, out, '--training.epochs=2', '--schedule.milestones=2'), log=lambda *_: None)
    return run_dir, str(data_dir)


def final_json(run_dir):
    with open(os.path.join(run_dir, 'final.json')) as f:
        return json.load(f)


def eval_json(folder):
    with open(os.path.join(folder, 'eval.json')) as f:
        return json.load(f)


def read_examples(path):
    """{column: values} of a per-example CSV, read here with the csv module alone (independent of the engine's
    reader): ints for index, label and the 0/1 columns, floats for the value columns."""
    import csv
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    floats = ('clean_margin', 'clean_confidence', 'clean_nll', 'pgd_confidence', 'pgd_nll')
    return {name: [(float if name in floats else int)(r[name]) for r in rows] for name in rows[0]}


def numbers(row):
    return {key: row[key] for key in ACCURACIES + ('n',)}


def common(data_dir):
    # The final table's settings of tiny(): the same attacks, on the same data.
    return [f'--data.dir={data_dir}', '--attack.eps=16', '--attack.step_size=8', '--evaluation.final_pgd_steps=5', '--evaluation.cw_steps=5',
            '--evaluation.autoattack=false', '--training.progress=off']


def test_engine_checkpoint_state_dict_safetensors_and_factory_agree(trained, tmp_path, capsys):
    run_dir, data_dir = trained
    last = os.path.join(run_dir, 'checkpoints', 'last.pt')   # the final model
    assert run.cli(['eval', '--checkpoint', last, '--out', str(tmp_path / 'ckpt'), f'--data.dir={data_dir}']) == 0
    reference = eval_json(tmp_path / 'ckpt')['row']
    # Evaluated with the run's own evaluation seed: the same numbers as the run's final row, not just close.
    assert numbers(reference) == numbers(final_json(run_dir)['rows']['final'])
    weights = checkpoint.load(last)['model']
    torch.save(weights, tmp_path / 'plain.pt')
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / 'plain.safetensors'))
    arch = ['--model.arch=small_cnn', '--model.width=8', *DATA, *common(data_dir)]
    for name in ('plain.pt', 'plain.safetensors'):
        assert run.cli(['eval', '--checkpoint', str(tmp_path / name), '--out', str(tmp_path / name[:-3]), *arch]) == 0
        assert numbers(eval_json(tmp_path / name[:-3])['row']) == numbers(reference), name
    (tmp_path / 'my_factory.py').write_text(
        'import torch\nfrom engine.models import build_model\n\n'
        f'def build():\n    model = build_model("small_cnn", 4, in_channels=3, width=8)\n'
        f'    model.load_state_dict(torch.load({str(tmp_path / "plain.pt")!r}, weights_only=True))\n    return model\n')
    sys.path.insert(0, str(tmp_path))
    try:
        assert run.cli(['eval', '--model.factory=my_factory:build', '--out', str(tmp_path / 'factory'), *DATA,
                        *common(data_dir)]) == 0
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop('my_factory', None)
    assert numbers(eval_json(tmp_path / 'factory')['row']) == numbers(reference)
    for folder in ('ckpt', 'plain', 'factory'):
        assert {'eval.json', 'eval.md', 'examples.csv', 'reliability.png', 'robustbench.json'} <= \
            set(os.listdir(tmp_path / folder)), folder
    capsys.readouterr()


def test_default_out_is_outside_checkpoints_and_kept(trained, tmp_path):
    run_dir, data_dir = trained
    best = os.path.join(run_dir, 'checkpoints', 'best.pt')
    before = sorted(os.listdir(os.path.join(run_dir, 'checkpoints')))
    assert run.cli(['eval', '--checkpoint', best, f'--data.dir={data_dir}']) == 0
    folder = os.path.join(run_dir, 'eval', 'best')
    first = eval_json(folder)['row']
    assert sorted(os.listdir(os.path.join(run_dir, 'checkpoints'))) == before   # nothing written there
    # A second evaluation into the same folder is refused, with overwrite it gives the same numbers.
    assert run.cli(['eval', '--checkpoint', best, f'--data.dir={data_dir}']) == 2
    assert run.cli(['eval', '--checkpoint', best, f'--data.dir={data_dir}', '--output.overwrite=true']) == 0
    assert eval_json(folder)['row'] == first
    # Another evaluation seed draws other starts; the clean accuracy cannot change.
    assert run.cli(['eval', '--checkpoint', best, f'--data.dir={data_dir}', '--evaluation.seed=7',
                    '--out', str(tmp_path / 'seed7')]) == 0
    other = eval_json(tmp_path / 'seed7')['row']
    assert other['clean'] == first['clean'] and eval_json(tmp_path / 'seed7')['settings']['seed'] == 7


def test_run_files_per_example_reliability_and_robustbench(trained):
    run_dir, _ = trained
    final = final_json(run_dir)
    for row_name, row in final['rows'].items():
        columns = read_examples(os.path.join(run_dir, 'examples', f'{row_name}.csv'))
        n = len(columns['index'])
        assert n == row['n'] and sorted(columns['index']) == list(range(n))
        for attack in ('clean', 'fgsm', 'pgd', 'cw', 'worst'):
            assert 100.0 * sum(columns[attack]) / n == pytest.approx(row[attack], abs=1e-9), (row_name, attack)
        assert all((m > 0) == bool(c) for m, c in zip(columns['clean_margin'], columns['clean']) if m != 0)
        assert sum(columns['clean_nll']) / n == pytest.approx(row['nll_clean'], rel=1e-5)
    assert os.path.getsize(os.path.join(run_dir, 'reliability.png')) > 1000
    with open(os.path.join(run_dir, 'robustbench.json')) as f:
        info = json.load(f)
    exported = 'best' if 'best' in final['rows'] else 'final'
    fields = {'link', 'name', 'authors', 'additional_data', 'number_forward_passes', 'dataset', 'venue',
              'architecture', 'eps', 'clean_acc', 'reported', 'autoattack_acc', 'threat_model', 'evaluation'}
    assert fields <= set(info)
    assert info['clean_acc'] == f"{final['rows'][exported]['clean']:.2f}" and info['autoattack_acc'] is None
    assert (info['eps'], info['threat_model'], info['additional_data'], info['number_forward_passes']) == \
        ('16/255', 'Linf', False, 1)
    assert info['evaluation'] == final['settings'] and info['checkpoint'] == exported
    from safetensors.torch import load_file
    saved = load_file(os.path.join(run_dir, 'robustbench.safetensors'))
    source = checkpoint.load(os.path.join(run_dir, 'checkpoints', 'best.pt' if exported == 'best' else 'last.pt'))
    assert saved.keys() == source['model'].keys()
    assert all(torch.equal(saved[k], source['model'][k]) for k in saved)


def test_best_at_the_last_epoch_is_evaluated_once(tmp_path):
    run_dir = train(tiny(tmp_path / 'data', tmp_path, '--training.epochs=1', '--schedule.milestones=1'),
                    log=lambda *_: None)
    rows = final_json(run_dir)['rows']
    assert rows['best']['epoch'] == rows['final']['epoch'] == 1 and rows['final']['same_as'] == 'best'
    assert {k: v for k, v in rows['final'].items() if k != 'same_as'} == rows['best']
    best = (tmp_path / 'run' / 'examples' / 'best.csv').read_text()
    assert best == (tmp_path / 'run' / 'examples' / 'final.csv').read_text()
    assert 'final = best (the same model, evaluated once)' in (tmp_path / 'run' / 'final.md').read_text()


class RunsCode:
    """Unpickling this runs code: weights_only=True must refuse the file."""

    def __reduce__(self):
        return (os.system, ('echo pwned > /dev/null',))


def test_bad_inputs_are_refused_naming_the_file(trained, tmp_path, capsys):
    run_dir, data_dir = trained
    arch = ['--model.arch=small_cnn', '--model.width=8', *DATA, *common(data_dir)]
    weights = checkpoint.load(os.path.join(run_dir, 'checkpoints', 'last.pt'))['model']
    torch.save(weights, tmp_path / 'plain.pt')
    torch.save({'payload': RunsCode()}, tmp_path / 'code.pt')
    (tmp_path / 'broken_factory.py').write_text('import not_a_module_anywhere\n')
    (tmp_path / 'none_factory.py').write_text('def build():\n    return 42\n')
    cases = [
        (['--checkpoint', str(tmp_path / 'plain.pt'), '--model.arch=small_cnn', '--model.width=16', *DATA,
          *common(data_dir)], ['plain.pt', 'do not fit small_cnn']),
        (['--checkpoint', str(tmp_path / 'plain.pt'), *DATA, *common(data_dir)], ['plain.pt', '--model.arch']),
        (['--checkpoint', str(tmp_path / 'code.pt'), *arch], ['code.pt', 'cannot load the model safely']),
        (['--model.factory=broken_factory:build', *DATA, *common(data_dir)],
         ['broken_factory', 'cannot import', 'not_a_module_anywhere']),
        (['--model.factory=none_factory:build', *DATA, *common(data_dir)],
         ['none_factory.py', 'returned a int, not a torch.nn.Module']),
        (['--model.factory=none_factory', *DATA, *common(data_dir)], ['package.module:function']),
    ]
    sys.path.insert(0, str(tmp_path))
    try:
        for k, (args, expected) in enumerate(cases):
            out = tmp_path / f'out{k}'
            assert run.cli(['eval', *args, '--out', str(out)]) == 2, args
            message = capsys.readouterr().err
            assert all(text in message for text in expected), (expected, message)
            assert not out.exists(), args   # nothing written
    finally:
        sys.path.remove(str(tmp_path))
        for name in ('broken_factory', 'none_factory'):
            sys.modules.pop(name, None)
