"""Checkpoints: a mapping of stateful parts, written atomically, loaded safely (weights_only=True).

A checkpoint is {'params': the resolved config as JSON, name: part.state_dict() for each part}. The parts of a
run (engine.train.run_state) are its model, optimizer, soft-label table, RNG state and progress (last finished
epoch, best-so-far record): enough that a killed run resumes exactly. A new part (weight EMA, a teacher
reference) is one more entry of that mapping, anything with state_dict() / load_state_dict(). The data order
needs no state: it is a pure function of (seed, epoch).
"""
import errno
import hashlib
import json
import os
import shutil

import torch

from engine.errors import UserError
from writers.atomic import atomic_path


class RandomState:
    """torch's global generators (CPU and, once initialised, CUDA): attack noise and evaluation starts."""

    def state_dict(self):
        state = {'torch': torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state['cuda'] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state):
        torch.set_rng_state(state['torch'])
        if 'cuda' in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state['cuda'])


class Progress:
    """How far a run got: the last finished epoch and the best-so-far records (selector value and epoch) of the
    model and of its weight EMA (training.weight_ema; a checkpoint from before it has none)."""

    def __init__(self):
        self.epoch, self.best, self.best_ema = 0, {'val_pgd_acc': -1.0, 'epoch': 0}, {'val_pgd_acc': -1.0, 'epoch': 0}

    def state_dict(self):
        return {'epoch': self.epoch, 'best': dict(self.best), 'best_ema': dict(self.best_ema)}

    def load_state_dict(self, state):
        self.epoch, self.best = int(state['epoch']), dict(state['best'])
        self.best_ema = dict(state.get('best_ema', {'val_pgd_acc': -1.0, 'epoch': 0}))


class DataIdentity:
    """What a run trains and tests on: image counts and a fingerprint (SHA-256 of the labels, in index order) of
    each beton. Loading a checkpoint's identity into a run on other data raises: a resume never continues on a
    different beton silently."""

    def __init__(self, train_labels, test_labels):
        self.identity = {f'{split}_{key}': value for split, labels in (('train', train_labels), ('test', test_labels))
                         for key, value in (('images', len(labels)), ('fingerprint', fingerprint(labels)))}

    def state_dict(self):
        return dict(self.identity)

    def load_state_dict(self, state):
        differ = [f'{key} {state.get(key)!r} -> {value!r}' for key, value in self.identity.items()
                  if state.get(key) != value]
        if differ:
            raise UserError('the data differs from the data the run was trained on (' + ', '.join(differ)
                            + '); data.dir or the betons changed')


def fingerprint(labels):
    """SHA-256 (16 hex digits) of int64 labels by index: changes with the image count, the order or any label."""
    array = torch.as_tensor(labels).to('cpu', torch.int64).contiguous().numpy()
    return hashlib.sha256(array.tobytes()).hexdigest()[:16]


def _write_failure(path, error):
    """A UserError naming the folder for a failed write (torch reports a full disk as RuntimeError)."""
    folder = os.path.dirname(path) or '.'
    try:
        full = shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        full = False
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT) or full:
        reason = 'no space left on device'
    elif not os.access(folder, os.W_OK) or isinstance(error, OSError) and error.errno == errno.EROFS:
        reason = 'not writable (read-only or permission denied)'
    else:
        reason = f'{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""}'
    return UserError(f'{folder}: cannot write {os.path.basename(path)}: {reason}; the previous file is untouched')


def save(path, parts, params):
    """Write {'params': ..., name: part.state_dict()} to path atomically (never half a checkpoint at path)."""
    state = {'params': json.dumps(params), **{name: part.state_dict() for name, part in parts.items()}}
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as e:
        raise _write_failure(path, e) from e


def load(path, device='cpu'):
    """The checkpoint at path as a dict (params parsed); UserError naming the file when it is not one of ours."""
    if not os.path.isfile(path):
        raise UserError(f'{path}: no such checkpoint')
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding objects weights_only refuses
        raise UserError(f'{path}: cannot load checkpoint safely ({type(e).__name__}: {e})') from None
    if not isinstance(state, dict):
        raise UserError(f'{path}: not a checkpoint of this engine')
    if 'progress' not in state and 'epoch' in state:  # written before checkpoints held parts (2026-12-01)
        state['progress'] = {'epoch': state.pop('epoch'), 'best': state.pop('best', {'val_pgd_acc': -1.0,
                                                                                      'epoch': 0})}
    for key in ('model', 'params', 'progress'):
        if key not in state:
            raise UserError(f"{path}: not a checkpoint of this engine (no '{key}')")
    state['params'] = json.loads(state['params'])
    return state


def restore(path, parts, device='cpu', optional=(), state=None):
    """Load each part from the checkpoint at path (every part must be there but those in `optional`, which
    older checkpoints lack); returns the loaded dict. `state`: the checkpoint, when already loaded."""
    state = load(path, device) if state is None else state
    missing = [name for name in parts if name not in state and name not in optional]
    if missing:
        raise UserError(f"{path}: has no {', '.join(missing)} to resume from")
    for name, part in parts.items():
        if name in state:
            try:
                part.load_state_dict(state[name])
            except UserError as e:
                raise UserError(f'{path}: {e}') from None
    return state


def epoch_of(path):
    """The last finished epoch recorded in the checkpoint at path, 0 when there is none. Memory-mapped: the
    tensors are not read, so asking a packed group's K checkpoints for their epoch costs no K full loads."""
    if not os.path.exists(path):
        return 0
    try:
        state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        return int(state['progress']['epoch'] if 'progress' in state else state['epoch'])
    except Exception:  # damaged or not ours: load() raises the UserError that names the file
        return load(path)['progress']['epoch']


def settle_group(run_dirs, log=print, epochs=True):
    """Make the runs of a packed group agree on their last epoch after a kill. A group writes each run's epoch-e
    checkpoint as checkpoints/pending.pt (phase 1), then renames every pending.pt onto last.pt (phase 2). So if
    every run has epoch e in pending.pt or last.pt, phase 1 finished: finish phase 2; otherwise it did not: drop
    the pending checkpoints (every last.pt still holds epoch e - 1). Returns each run's last epoch (epochs=False:
    None, without reading the checkpoints)."""
    pending = {d: os.path.join(d, 'checkpoints', 'pending.pt') for d in run_dirs}
    last = {d: os.path.join(d, 'checkpoints', 'last.pt') for d in run_dirs}
    have = [d for d in run_dirs if os.path.exists(pending[d])]
    if have:
        epochs = {d: epoch_of(pending[d]) for d in have}
        e = max(epochs.values())
        if all(epochs.get(d) == e or epoch_of(last[d]) == e for d in run_dirs):
            for d in have:
                os.replace(pending[d], last[d])
            log(f'packed group {", ".join(run_dirs)}: completed the checkpoint of epoch {e} interrupted by a kill')
        else:
            for d in have:
                os.remove(pending[d])
            log(f'packed group {", ".join(run_dirs)}: a kill interrupted the checkpoint of epoch {e}; the group '
                f'resumes from the epoch before, as one')
    return [epoch_of(last[d]) for d in run_dirs] if epochs else None
