"""Checkpoints as a mapping of stateful parts; the one atomic-write helper."""
import os

import pytest
import torch

from engine import checkpoint
from engine.errors import UserError
from writers.atomic import atomic_path, write_text_atomic


class Counter:
    """A stateful part as a new feature would add one (weight EMA, a teacher reference): state_dict in, out."""

    def __init__(self, value=0):
        self.value = value

    def state_dict(self):
        return {'value': torch.tensor(self.value)}

    def load_state_dict(self, state):
        self.value = int(state['value'])


def test_every_part_round_trips_and_a_new_part_is_one_more_entry(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    progress = checkpoint.Progress()
    progress.epoch, progress.best = 4, {'val_pgd_acc': 51.5, 'epoch': 3}
    parts = {'model': model, 'progress': progress, 'rng': checkpoint.RandomState(), 'ema': Counter(7)}
    path = str(tmp_path / 'ck' / 'last.pt')
    checkpoint.save(path, parts, {'method.name': 'at'})
    expected_draw = torch.rand(3)  # what the saved RNG state draws next

    fresh = {'model': torch.nn.Linear(3, 2), 'progress': checkpoint.Progress(), 'rng': checkpoint.RandomState(),
             'ema': Counter()}
    state = checkpoint.restore(path, fresh)
    assert state['params'] == {'method.name': 'at'}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh['model'].state_dict().values()))
    assert (fresh['progress'].epoch, fresh['progress'].best) == (4, {'val_pgd_acc': 51.5, 'epoch': 3})
    assert fresh['ema'].value == 7
    assert torch.equal(torch.rand(3), expected_draw)

    with pytest.raises(UserError, match='has no teacher to resume from'):
        checkpoint.restore(path, {'model': torch.nn.Linear(3, 2), 'teacher': Counter()})


def test_checkpoints_written_before_parts_still_load(tmp_path):
    """Runs started before checkpoints held parts (top-level epoch / best) resume."""
    import json
    path = tmp_path / 'old.pt'
    torch.save({'model': torch.nn.Linear(1, 1).state_dict(), 'params': json.dumps({}), 'epoch': 3,
                'best': {'val_pgd_acc': 40.0, 'epoch': 2}}, path)
    progress = checkpoint.Progress()
    checkpoint.restore(str(path), {'progress': progress})
    assert (progress.epoch, progress.best['epoch']) == (3, 2)


def test_unsafe_or_foreign_files_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ('echo pwned',))
    torch.save({'model': Evil()}, tmp_path / 'evil.pt')
    with pytest.raises(UserError, match='cannot load checkpoint safely'):
        checkpoint.load(str(tmp_path / 'evil.pt'))
    torch.save({'weights': 1}, tmp_path / 'foreign.pt')
    with pytest.raises(UserError, match="not a checkpoint of this engine"):
        checkpoint.load(str(tmp_path / 'foreign.pt'))
    with pytest.raises(UserError, match='no such checkpoint'):
        checkpoint.load(str(tmp_path / 'none.pt'))


def test_atomic_writes_never_leave_half_a_file_nor_follow_a_planted_link(tmp_path):
    target = tmp_path / 'final.json'
    write_text_atomic(str(target), 'old\n')
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            with open(tmp, 'w') as f:
                f.write('half')
            raise RuntimeError('killed mid-write')
    assert target.read_text() == 'old\n' and os.listdir(tmp_path) == ['final.json']

    victim = tmp_path / 'victim'
    victim.write_text('keep me')
    for pid_name in (f'final.json.tmp{os.getpid()}', f'.final.json.{os.getpid()}.tmp'):  # the names used before
        os.symlink(victim, tmp_path / pid_name)
    write_text_atomic(str(target), 'new\n')
    assert target.read_text() == 'new\n' and victim.read_text() == 'keep me'
    assert not (tmp_path / 'final.json').is_symlink()
    mode = os.stat(target).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # as open() would have made it, not mkstemp's 0600


@pytest.mark.parametrize('error', [RuntimeError('[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0'),
                                   RuntimeError('basic_ios::clear: iostream error'),
                                   OSError(28, 'No space left on device')])
def test_a_full_disk_is_one_message_naming_the_folder_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, error):
    """torch reports a full disk in its own words; the message says what it is, and the old file stays."""
    path = str(tmp_path / 'checkpoints' / 'last.pt')
    checkpoint.save(path, {'counter': Counter(1)}, params={})
    before = open(path, 'rb').read()

    def full(*args, **kwargs):
        raise error
    monkeypatch.setattr(torch, 'save', full)
    monkeypatch.setattr(checkpoint.shutil, 'disk_usage', lambda _: type('U', (), {'free': 0})())
    with pytest.raises(UserError, match=f"{tmp_path / 'checkpoints'}: cannot write last.pt: no space left on device"):
        checkpoint.save(path, {'counter': Counter(2)}, params={})
    assert open(path, 'rb').read() == before and os.listdir(tmp_path / 'checkpoints') == ['last.pt']


def test_data_identity_refuses_other_data():
    labels = torch.tensor([0, 1, 2, 1])
    saved = checkpoint.DataIdentity(labels, labels[:2]).state_dict()
    checkpoint.DataIdentity(labels.clone(), labels[:2].clone()).load_state_dict(saved)  # the same data: fine
    for train, test in ((labels.flip(0), labels[:2]), (labels[:3], labels[:2]), (labels, labels[:1])):
        with pytest.raises(UserError, match='the data differs'):
            checkpoint.DataIdentity(train, test).load_state_dict(saved)
