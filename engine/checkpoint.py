"""Checkpoints: atomic writes (temp file + rename) and safe loading (weights_only=True).

A checkpoint holds everything a killed run needs to resume exactly: model, optimizer, soft-label table, RNG
states, the finished epoch, the best-so-far record and the resolved config (as JSON, so eval needs nothing else).
The data order needs no state: it is a pure function of (seed, epoch).
"""
import json
import os

import torch

from engine.errors import UserError


def rng_state():
    state = {'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def save(path, *, model, params, epoch, optimizer=None, soft_labels=None, best=None, with_rng=True):
    state = {'model': model.state_dict(), 'params': json.dumps(params), 'epoch': epoch}
    if optimizer is not None:
        state['optimizer'] = optimizer.state_dict()
    if soft_labels is not None:
        state['soft_labels'] = soft_labels.state_dict()
    if best is not None:
        state['best'] = dict(best)
    if with_rng:
        state['rng'] = rng_state()
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path, device='cpu'):
    if not os.path.isfile(path):
        raise UserError(f'{path}: no such checkpoint')
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding objects weights_only refuses
        raise UserError(f'{path}: cannot load checkpoint safely ({type(e).__name__}: {e})') from None
    for key in ('model', 'params', 'epoch'):
        if key not in state:
            raise UserError(f"{path}: not a checkpoint of this engine (no '{key}')")
    state['params'] = json.loads(state['params'])
    return state
