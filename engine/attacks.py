"""Adversarial attacks shared by training and evaluation, in the L-inf or the L2 threat model (norm 'linf' | 'l2';
eps and steps in pixel units of [0, 1] images for both; the L2 pieces are in engine/attacks_l2.py).

Pure tensor functions: no host syncs (.item(), .cpu(), bool(tensor)) and Python loops only over the
fixed step count, so a training step that calls them can run asynchronously on a GPU. Random starts
draw from torch's default generator, so saving/restoring its state reproduces them.
"""
import contextlib
import dataclasses
import inspect
import logging
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.attacks_l2 import l2_start, pgd_l2_update
from engine.errors import ConfigError
from engine.precision import upcast

LOSSES = ('ce', 'kl', 'cw')
NORMS = ('linf', 'l2')
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


@contextlib.contextmanager
def input_gradient_only(model: nn.Module):
    """The body's backward computes the input gradient only: the model's parameters do not require grad in it.
    PGD needs d objective / d x_adv alone. Eager autograd prunes the weight gradients by itself, but a compiled
    backward (AOT autograd) computes every one it was traced for: 20 convolution weight gradients and every
    BatchNorm weight/bias reduction per PGD step for ResNet-18 (issue 12). Restored however the body ends."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


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


def random_start(x: torch.Tensor, eps: float, start: str, *, clamp: bool = True,
                 generator: torch.Generator | None = None, norm: str = 'linf', groups: int = 1) -> torch.Tensor:
    """PGD's starting point: 'uniform' (a random point of the norm's eps-ball: x + U(-eps, eps) for linf, see
    engine.attacks_l2.l2_start for l2; clipped to [0, 1] unless clamp is False), 'normal' (x + 0.001 N(0, 1), for
    either norm: TRADES' nudge off the flat KL, not a point of the ball), 'none'. generator None draws from torch's
    default generator on x's device (training); a generator draws on its own device, in logical order and x's dtype,
    and the noise is then moved to x's device (as the official evaluation scripts:
    torch.FloatTensor(*shape).uniform_(-eps, eps).cuda()). groups: packed seeds in x's channels (l2 only: one norm
    per example and seed)."""
    _check_choice('norm', norm, NORMS)
    if norm == 'l2' and start == 'uniform':
        return l2_start(x, eps, groups=groups, clamp=clamp, generator=generator)
    if generator is not None and start != 'none':
        noise = torch.empty(x.shape, dtype=x.dtype, device=generator.device)
        if start == 'uniform':
            noise = noise.uniform_(-eps, eps, generator=generator)
        else:
            noise = NORMAL_START_STD * noise.normal_(generator=generator)
        x_start = x + noise.to(x.device)
        return x_start.clamp(0, 1) if start == 'uniform' and clamp else x_start
    # Noise is drawn in logical (NCHW) order whatever x's memory format: random generators fill memory in order,
    # so a channels-last x would otherwise give each pixel a different draw than the eager reference path.
    if start == 'uniform':
        # As the official PGD code: a uniform point of the eps-ball, clipped to the image range (unless clamp is
        # False: SGLS' and TRADES' evaluation scripts take the first gradient at the unclipped point).
        noise = torch.empty_like(x, memory_format=torch.contiguous_format).uniform_(-eps, eps)
        return (x + noise).clamp(0, 1) if clamp else x + noise
    if start == 'normal':
        # As TRADES: a tiny Gaussian nudge (KL is flat at x itself), not clipped.
        return x + NORMAL_START_STD * torch.randn_like(x, memory_format=torch.contiguous_format)
    return x.clone()


def attack_objective(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss: str,
                     p_clean: torch.Tensor | None, loss_scale: float) -> torch.Tensor:
    """What one PGD step ascends: the attack loss of the model's logits at x_adv, times loss_scale."""
    return _attack_loss(model(x_adv), y, loss, p_clean) * loss_scale


def pgd_update(x_adv: torch.Tensor, grad: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
               step_size: float) -> torch.Tensor:
    """One PGD step from x_adv: along sign(grad), projected onto [lower, upper] (the eps-ball), clipped to [0, 1]."""
    return torch.min(torch.max(x_adv + step_size * grad.sign(), lower), upper).clamp(0, 1)


UPDATES = {'linf': pgd_update, 'l2': pgd_l2_update}  # each norm's step and projection (the fast engine compiles it)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float, steps: int,
        loss: str = 'ce', start: str | Callable = 'uniform', bn_mode: str = 'eval',
        p_clean: torch.Tensor | None = None, loss_scale: float = 1.0, clamp_start: bool = True,
        generator: torch.Generator | None = None, objective: Callable = attack_objective,
        update: Callable | None = None, norm: str = 'linf') -> torch.Tensor:
    """PGD in the L-inf (norm 'linf') or L2 ('l2') eps-ball around x, eps and step_size in pixel units. Each step:
    linf: x_adv = clamp(min(max(x_adv + step_size * sign(grad), x - eps), x + eps), 0, 1);
    l2: x_adv + step_size * grad / ||grad||_2, projected onto the L2 ball, clipped to [0, 1]
    (engine.attacks_l2.pgd_l2_update; norms per example, and per seed for packed seeds).

    loss: 'ce' (cross entropy vs y), 'kl' (TRADES: sum KL(p_clean || softmax(f(x_adv))); p_clean defaults
    to softmax(f(x)) computed without grad in the attack's BN mode), 'cw' (margin, see cw_margin_loss).
    start: 'uniform' (a random point of the eps-ball clipped to [0, 1], see random_start), 'normal'
    (x + 0.001 N(0, 1)), 'none', or a callable start(x, eps) -> starting point (packed seeds draw each seed's start
    from its own random stream); under l2 it is called start(x, eps, norm='l2') and must accept that keyword.
    clamp_start False keeps a uniform start unclipped (the official evaluation scripts); generator: where a named
    start draws its noise (see random_start; None = torch's default generator). Both are ignored by a callable.
    The model's logits may be [B, C] or [..., C] with y of shape [...] (packed seeds: [B, K, C] and [B, K]).
    bn_mode: 'eval' runs the attack in eval mode and restores the previous modes; 'train' leaves them.
    loss_scale multiplies the objective before the gradient (fp16: keeps input gradients from underflowing;
    the step uses only their sign). Gradients are taken w.r.t. the input only (parameters' .grad stay
    untouched). objective and update: attack_objective and the norm's UPDATES entry (None: that one), or compiled
    versions of them (the fast engine's training.fused_attack: the model and the loss as one graph, the update as one
    kernel); linf's update takes (x_adv, grad, lower, upper, step_size), l2's (x_adv, grad, x, eps, step_size,
    groups). Returns a detached tensor of x's dtype, shape and memory format.
    """
    _check_choice('loss', loss, LOSSES)
    _check_choice('norm', norm, NORMS)
    if callable(start):
        if norm != 'linf' and 'norm' not in inspect.signature(start).parameters:
            # A start that draws L-inf noise only (e.g. one written before L2 existed) would silently start from a
            # point of the wrong ball.
            raise ConfigError(f"attack.norm={norm}: this attack's random start ({start.__qualname__}) draws "
                              'L-inf starts only')
    else:
        _check_choice('start', start, STARTS)
    update = UPDATES[norm] if update is None else update
    # Packed seeds: labels [B, K] for x [B, K*C, H, W]; the L2 norms are taken per example and seed.
    groups = math.prod(y.shape[1:])
    x = x.detach()
    with _bn_context(model, bn_mode), input_gradient_only(model):
        if loss == 'kl':
            if p_clean is None:
                with torch.no_grad():
                    p_clean = F.softmax(upcast(model(x)), dim=-1)
            p_clean = upcast(p_clean.detach())
        if callable(start):
            x_adv = start(x, eps) if norm == 'linf' else start(x, eps, norm=norm)
        else:
            x_adv = random_start(x, eps, start, clamp=clamp_start, generator=generator, norm=norm, groups=groups)
        if norm == 'linf':
            lower, upper = x - eps, x + eps
        for _ in range(steps):
            x_adv.requires_grad_(True)
            # enable_grad: the attack must work inside a caller's torch.no_grad() (e.g. evaluation).
            with torch.enable_grad():
                value = objective(model, x_adv, y, loss, p_clean, loss_scale)
            (grad,) = torch.autograd.grad(value, x_adv)
            if norm == 'linf':
                x_adv = update(x_adv.detach(), grad, lower, upper, step_size)
            else:
                x_adv = update(x_adv.detach(), grad, x, eps, step_size, groups)
    return x_adv.detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, bn_mode: str = 'eval',
         norm: str = 'linf') -> torch.Tensor:
    """One cross-entropy gradient step of size eps from x (no random start), clipped to [0, 1]: signed for linf
    (FGSM), normalized to L2 length eps for l2 (the fast gradient method)."""
    return pgd(model, x, y, eps=eps, step_size=eps, steps=1, loss='ce', start='none', bn_mode=bn_mode, norm=norm)


def cw_inf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float, steps: int,
           bn_mode: str = 'eval') -> torch.Tensor:
    """CW-inf: PGD on the CW margin loss (uniform random start)."""
    return pgd(model, x, y, eps=eps, step_size=step_size, steps=steps, loss='cw', bn_mode=bn_mode)


def cw(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float, steps: int,
       bn_mode: str = 'eval', norm: str = 'linf', generator: torch.Generator | None = None) -> torch.Tensor:
    """CW margin PGD in the given norm's ball (uniform random start in that ball; generator: see random_start)."""
    return pgd(model, x, y, eps=eps, step_size=step_size, steps=steps, loss='cw', bn_mode=bn_mode, norm=norm,
               generator=generator)


@dataclasses.dataclass(frozen=True)
class PgdPreset:
    """A PGD evaluation as one paper's code runs it: the final table's column `name` (evaluation.presets).
    eps and step_size are in pixel units ([0, 1] images) and fixed: they do not follow the run's attack.eps."""
    name: str
    eps: float
    step_size: float
    steps: int
    start: str          # 'uniform' (in the eps-ball), 'normal' (0.001 N(0, 1)) or 'none'
    clamp_start: bool   # whether the random start is clipped to [0, 1] before the first gradient
    loss: str           # 'ce' or 'cw'
    bn_mode: str        # BN mode while attacking ('eval': the model in eval mode, as all sources below)
    source: str         # repository, file and lines the settings are read from

    def __post_init__(self):
        for what, value, choices in (('start', self.start, STARTS), ('loss', self.loss, ('ce', 'cw')),
                                     ('bn_mode', self.bn_mode, BN_MODES)):
            _check_choice(what, value, choices)

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
        return pgd(model, x, y, eps=self.eps, step_size=self.step_size, steps=self.steps, loss=self.loss,
                   start=self.start, clamp_start=self.clamp_start, bn_mode=self.bn_mode, generator=generator)

    def settings(self) -> dict:
        return dataclasses.asdict(self)


# The evaluation PGD of each paper's official code, read from the code (not from the papers' text). All three run
# the model in eval mode, maximise cross entropy (a mean; its gradient has the sign of our sum) and take steps
# x + step * sign(grad), projected onto the eps-ball and clipped to [0, 1].
PRESETS = {p.name: p for p in (
    # devicerxx/SGLS pgd_attack.py (commit 30f9605): lines 21-28 `--epsilon default=0.031`, `--num-steps
    # default=20`, `--step-size default=0.003`, `--random default=True`; lines 44-46 `X_pgd = X_pgd.data +
    # torch.FloatTensor(*X_pgd.shape).uniform_(-epsilon, epsilon)` (not clipped); lines 48-59 the loop (CE, sign
    # step, `eta = clamp(X_pgd - X, -epsilon, epsilon)`, `clamp(X_pgd, 0, 1.0)`); line 67 `model.eval()`.
    PgdPreset('pgd20_sgls', eps=0.031, step_size=0.003, steps=20, start='uniform', clamp_start=False, loss='ce',
              bn_mode='eval', source='devicerxx/SGLS pgd_attack.py L21-59'),
    # yaodongyu/TRADES pgd_attack_cifar10.py (commit 5a827d9, "add random initialization in FGSM-k attack"; the
    # README calls it FGSM-20): lines 20-28 the same defaults, lines 63-65 the same unclipped uniform start, lines
    # 67-78 the same loop, line 119 `model.eval()`. (Its first two versions, 1d84765 and fb3fc9f, had no random start.)
    PgdPreset('pgd20_trades', eps=0.031, step_size=0.003, steps=20, start='uniform', clamp_start=False, loss='ce',
              bn_mode='eval', source='yaodongyu/TRADES pgd_attack_cifar10.py L20-78'),
    # zibojia/RSLAD resnet18_rslad_cifar10.py line 72 (and its other three training scripts) after `student.eval()`:
    # `attack_pgd(student, ..., attack_iters=20, step_size=0.003, epsilon=8.0/255.0)`; rslad_loss.py lines 8-24:
    # start x + uniform_(-epsilon, epsilon) clipped to [0, 1] (lines 10-11), CE, a sign step, then clipped to
    # [0, 1] before the eps-ball projection (the same point as ours, up to rounding).
    PgdPreset('pgd20_rslad', eps=8 / 255, step_size=0.003, steps=20, start='uniform', clamp_start=True, loss='ce',
              bn_mode='eval', source='zibojia/RSLAD resnet18_rslad_cifar10.py L72, rslad_loss.py L8-24'),
)}


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, version: str = 'standard',
               batch_size: int = 256, seed: int = 0, log_path: str | None = None, verbose: bool = False,
               attacks_to_run: tuple[str, ...] = (), norm: str = 'linf') -> torch.Tensor:
    """AutoAttack via pyautoattack's run_standard_evaluation, in eval mode, in the norm's eps-ball (pyautoattack's
    'Linf' or 'L2'; eps in pixel units); returns x_adv.

    version: 'standard', 'plus', 'rand' or 'custom' (then attacks_to_run names pyautoattack attacks, e.g.
    ('apgd-ce',)). AutoAttack reseeds torch's global generator; this runs it on a forked RNG state so
    evaluation does not shift the random stream of training. Its log (pyautoattack writes to the
    'auto-attack' logger) goes to log_path and, if verbose, to stderr. Not a pure tensor function: it
    syncs with the host (pyautoattack does), so call it from evaluation only.
    """
    # Imported here: pyautoattack is only needed for this (slow) final evaluation.
    from pyautoattack import AutoAttack

    _check_choice('AutoAttack version', version, ('standard', 'plus', 'rand', 'custom'))
    _check_choice('norm', norm, NORMS)
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
            adversary = AutoAttack(model, norm={'linf': 'Linf', 'l2': 'L2'}[norm], eps=eps, version=version, seed=seed,
                                   device=x.device, attacks=list(attacks_to_run) if version == 'custom' else None)
            x_adv, _ = adversary.run_standard_evaluation(x.detach(), y.detach(), batch_size=batch_size)
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(saved_level)
    return x_adv.detach()
