"""L-inf adversarial attacks shared by training and evaluation.

Pure tensor functions: no host syncs (.item(), .cpu(), bool(tensor)) and Python loops only over the
fixed step count, so a training step that calls them can run asynchronously on a GPU. Random starts
draw from torch's default generator, so saving/restoring its state reproduces them.
"""
import contextlib
import logging
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.errors import ConfigError
from engine.precision import upcast

LOSSES = ('ce', 'kl', 'cw')
STARTS = ('uniform', 'normal', 'none')
BN_MODES = ('eval', 'train')
# Confidence of the CW margin loss, as the common adversarial-training code (cwloss(..., confidence=50)):
# the loss stops growing once another class leads the true one by this margin.
CW_KAPPA = 50.0
# TRADES' random start: x + 0.001 * N(0, 1).
NORMAL_START_STD = 0.001


def _check_choice(what: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"unknown attack {what} {value!r}; choose one of {', '.join(choices)}")


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run the body with the model in eval mode, then restore every submodule's own training flag
    (not just the top one: a model may deliberately keep some layers, e.g. frozen BN, in another mode)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _bn_context(model: nn.Module, bn_mode: str):
    _check_choice('bn_mode', bn_mode, BN_MODES)
    # 'train' leaves the mode as it is: BN uses batch statistics and updates its running stats on
    # adversarial batches, as Madry et al.'s code.
    return eval_mode(model) if bn_mode == 'eval' else contextlib.nullcontext()


def cw_margin_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float = CW_KAPPA) -> torch.Tensor:
    """Summed CW margin: max_{j != y} z_j - z_y, clamped at kappa (higher = more adversarial)."""
    logits = upcast(logits)
    true_class = F.one_hot(y, logits.shape[1]).bool()
    true_logit = logits.gather(1, y[:, None]).squeeze(1)
    best_other = logits.masked_fill(true_class, float('-inf')).amax(dim=1)
    return (best_other - true_logit).clamp(max=kappa).sum()


def _attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: str, p_clean: torch.Tensor | None) -> torch.Tensor:
    # Losses are summed, not averaged: the sign of the gradient is the same, and a sum keeps per-example
    # gradients from underflowing when the backward pass runs in half precision under autocast.
    # Logits [..., C] with labels [...]: a packed model's [B, K, C] is B*K examples.
    logits = upcast(logits).reshape(-1, logits.shape[-1])
    y = y.reshape(-1)
    if loss == 'ce':
        return F.cross_entropy(logits, y, reduction='sum')
    if loss == 'kl':
        return F.kl_div(F.log_softmax(logits, dim=1), p_clean.reshape(logits.shape), reduction='sum')
    return cw_margin_loss(logits, y)


def random_start(x: torch.Tensor, eps: float, start: str) -> torch.Tensor:
    """PGD's starting point: 'uniform' (x + U(-eps, eps) clipped to [0, 1]), 'normal' (x + 0.001 N(0, 1)), 'none'."""
    # Noise is drawn in logical (NCHW) order whatever x's memory format: random generators fill memory in order,
    # so a channels-last x would otherwise give each pixel a different draw than the eager reference path.
    if start == 'uniform':
        # As the official PGD code: a uniform point of the eps-ball, clipped to the image range.
        noise = torch.empty_like(x, memory_format=torch.contiguous_format).uniform_(-eps, eps)
        return (x + noise).clamp(0, 1)
    if start == 'normal':
        # As TRADES: a tiny Gaussian nudge (KL is flat at x itself), not clipped.
        return x + NORMAL_START_STD * torch.randn_like(x, memory_format=torch.contiguous_format)
    return x.clone()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float, steps: int,
        loss: str = 'ce', start: str | Callable = 'uniform', bn_mode: str = 'eval',
        p_clean: torch.Tensor | None = None, loss_scale: float = 1.0) -> torch.Tensor:
    """L-inf PGD. Each step: x_adv = clamp(min(max(x_adv + step_size * sign(grad), x - eps), x + eps), 0, 1).

    loss: 'ce' (cross entropy vs y), 'kl' (TRADES: sum KL(p_clean || softmax(f(x_adv))); p_clean defaults
    to softmax(f(x)) computed without grad in the attack's BN mode), 'cw' (margin, see cw_margin_loss).
    start: 'uniform' (x + U(-eps, eps) clipped to [0, 1]), 'normal' (x + 0.001 N(0, 1)), 'none', or a callable
    start(x, eps) -> starting point (packed seeds draw each seed's start from its own random stream).
    The model's logits may be [B, C] or [..., C] with y of shape [...] (packed seeds: [B, K, C] and [B, K]).
    bn_mode: 'eval' runs the attack in eval mode and restores the previous modes; 'train' leaves them.
    loss_scale multiplies the objective before the gradient (fp16: keeps input gradients from underflowing;
    the step uses only their sign). Gradients are taken w.r.t. the input only (parameters' .grad stay
    untouched). Returns a detached tensor of x's dtype, shape and memory format.
    """
    _check_choice('loss', loss, LOSSES)
    if not callable(start):
        _check_choice('start', start, STARTS)
    x = x.detach()
    with _bn_context(model, bn_mode):
        if loss == 'kl':
            if p_clean is None:
                with torch.no_grad():
                    p_clean = F.softmax(upcast(model(x)), dim=-1)
            p_clean = upcast(p_clean.detach())
        x_adv = start(x, eps) if callable(start) else random_start(x, eps, start)
        lower, upper = x - eps, x + eps
        for _ in range(steps):
            x_adv.requires_grad_(True)
            # enable_grad: the attack must work inside a caller's torch.no_grad() (e.g. evaluation).
            with torch.enable_grad():
                objective = _attack_loss(model(x_adv), y, loss, p_clean) * loss_scale
            (grad,) = torch.autograd.grad(objective, x_adv)
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, lower), upper).clamp(0, 1)
    return x_adv.detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, bn_mode: str = 'eval') -> torch.Tensor:
    """One signed cross-entropy gradient step of size eps from x (no random start), clipped to [0, 1]."""
    return pgd(model, x, y, eps=eps, step_size=eps, steps=1, loss='ce', start='none', bn_mode=bn_mode)


def cw_inf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float, steps: int,
           bn_mode: str = 'eval') -> torch.Tensor:
    """CW-inf: PGD on the CW margin loss (uniform random start)."""
    return pgd(model, x, y, eps=eps, step_size=step_size, steps=steps, loss='cw', bn_mode=bn_mode)


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, version: str = 'standard',
               batch_size: int = 256, seed: int = 0, log_path: str | None = None, verbose: bool = False,
               attacks_to_run: tuple[str, ...] = ()) -> torch.Tensor:
    """AutoAttack (L-inf) via pyautoattack's run_standard_evaluation, in eval mode; returns x_adv.

    version: 'standard', 'plus', 'rand' or 'custom' (then attacks_to_run names pyautoattack attacks, e.g.
    ('apgd-ce',)). AutoAttack reseeds torch's global generator; this runs it on a forked RNG state so
    evaluation does not shift the random stream of training. Its log (pyautoattack writes to the
    'auto-attack' logger) goes to log_path and, if verbose, to stderr. Not a pure tensor function: it
    syncs with the host (pyautoattack does), so call it from evaluation only.
    """
    # Imported here: pyautoattack is only needed for this (slow) final evaluation.
    from pyautoattack import AutoAttack

    _check_choice('AutoAttack version', version, ('standard', 'plus', 'rand', 'custom'))
    if (version == 'custom') != bool(attacks_to_run):
        raise ConfigError("AutoAttack attacks_to_run must be given exactly when version is 'custom'")
    logger = logging.getLogger('auto-attack')
    handlers = ([logging.FileHandler(log_path)] if log_path else []) + ([logging.StreamHandler()] if verbose else [])
    saved_level = logger.level
    for handler in handlers:
        logger.addHandler(handler)
    if handlers:
        logger.setLevel(logging.DEBUG)
    cuda_devices = [x.device] if x.device.type == 'cuda' else []
    try:
        with eval_mode(model), torch.random.fork_rng(devices=cuda_devices):
            adversary = AutoAttack(model, norm='Linf', eps=eps, version=version, seed=seed, device=x.device,
                                   attacks=list(attacks_to_run) if version == 'custom' else None)
            x_adv, _ = adversary.run_standard_evaluation(x.detach(), y.detach(), batch_size=batch_size)
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(saved_level)
    return x_adv.detach()
