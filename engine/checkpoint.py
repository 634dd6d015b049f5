"""Checkpoints: a mapping of stateful parts, written atomically, loaded safely (weights_only=True).

A checkpoint is {'params': the resolved config as JSON, name: part.state_dict() for each part}. The parts of a
run (engine.train.run_state) are its model, optimizer, soft-label table, RNG state and progress (last finished
epoch, best-so-far record): enough that a killed run resumes exactly. A new part (weight EMA, a teacher
reference) is one more entry of that mapping, anything with state_dict() / load_state_dict(). The data order
needs no state: it is a pure function of (seed, epoch).
"""
import json
import os

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
    """How far a run got: the last finished epoch and the best-so-far record (its selector value and epoch)."""

    def __init__(self):
        self.epoch, self.best = 0, {'val_pgd_acc': -1.0, 'epoch': 0}

    def state_dict(self):
        return {'epoch': self.epoch, 'best': dict(self.best)}

    def load_state_dict(self, state):
        self.epoch, self.best = int(state['epoch']), dict(state['best'])


def save(path, parts, params):
    """Write {'params': ..., name: part.state_dict()} to path atomically (never half a checkpoint at path)."""
    state = {'params': json.dumps(params), **{name: part.state_dict() for name, part in parts.items()}}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


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


def restore(path, parts, device='cpu'):
    """Load each part from the checkpoint at path (every part must be there); returns the loaded dict."""
    state = load(path, device)
    missing = [name for name in parts if name not in state]
    if missing:
        raise UserError(f"{path}: has no {', '.join(missing)} to resume from")
    for name, part in parts.items():
        part.load_state_dict(state[name])
    return state
