"""Training objectives: each method is a small loss over the shared PGD attack, and says what it needs.

A method declares, next to its loss:
- `attack`: what the training attack maximises and from where (an Objective), or None (no adversarial examples);
- `soft_labels`: whether it keeps the per-image soft-label table (engine.soft_labels);
- `params`: the config keys of the `method` section it reads (declared in PARAMS below, which engine.config
  turns into that section), set as attributes of the same name;
- `phase(epoch)`: what makes one epoch's step compute something else than another's (SGLS before and after
  its start epoch); the step is compiled and captured once per phase;
- `loss(model, batch)` -> (loss, logits on which robust training accuracy is measured). The loss calls the
  model on batch.x and batch.x_adv itself, in its own order: train-mode forwards move BatchNorm statistics.
Adding a method is a class here with its keys in PARAMS; nothing else tests a method's name.

Formulas follow the official SGLS code (devicerxx/SGLS at 3e96990, losses/loss.py) and TRADES (Zhang et al. 2019,
yaodongyu/TRADES trades.py); the SGLS options r and T are the paper's general form, with defaults (r=1, T=1) that
reproduce the code. SGLS on TRADES has no released source; the SGLS repository holds the authors' compiled TRADES
classes (losses/__pycache__/trades.cpython-38.pyc, decompiled: TRADES and TRADES_SAT), which method.trades_order
and method.trades_start reproduce (see TRADES_ORDERS).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from engine.errors import ConfigError
from engine.precision import upcast
from engine.soft_labels import SoftLabels


@dataclass(frozen=True)
class Objective:
    """The training attack of a method: engine.attacks.pgd's loss ('ce', 'kl', 'cw') and start."""
    loss: str
    start: str


CE_ATTACK = Objective('ce', 'uniform')   # PGD-AT (Madry et al.): cross entropy from a uniform point of the ball
KL_ATTACK = Objective('kl', 'normal')    # TRADES: KL to the clean prediction from x + 0.001 N(0, 1)


@dataclass
class LossInputs:
    """What a loss may use: the batch x (as the network takes it), its labels y and beton indices idx, the epoch
    (1-based), the adversarial batch x_adv (None for a method without an attack), the run's soft-label table
    (None unless the method keeps one) and, for distillation, a teacher (a frozen callable model)."""
    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    epoch: int
    x_adv: torch.Tensor | None = None
    soft_labels: SoftLabels | None = None
    teacher: Callable | None = None


# The `method` config section besides `name`: key -> (type, default, help, limits). Each method reads its own.
PARAMS: dict[str, tuple[type, Any, str, dict]] = {
    'beta': (float, 6.0, 'TRADES: weight of the KL term', dict(low=0.0)),
    'sgls_alpha': (float, 0.9, 'SGLS: EMA momentum a of the soft labels', dict(low=0.0, high=1.0)),
    'sgls_lam': (float, 0.2, 'SGLS: weight of the clean prediction in the EMA target', dict(low=0.0, high=1.0)),
    'sgls_start_epoch': (int, 90, 'SGLS: first (1-based) epoch with soft labels; before it plain AT/TRADES (the '
                         'official SGLS scripts: 90 for AT; the authors\' TRADES_SAT class: 70)', dict(low=1)),
    'sgls_r': (float, 1.0, 'SGLS: target = r*t + (1-r)*onehot(y) (official code: r=1)', dict(low=0.0, high=1.0)),
    'sgls_temperature': (float, 1.0, 'SGLS: temperature of the predictions fed to the EMA', dict(low=1e-6)),
    'trades_order': (str, 'trades', 'TRADES / SGLS-TRADES: the train-mode forwards of a step, which move BatchNorm '
                     'statistics (engine/methods.py TRADES_ORDERS): trades = yaodongyu/TRADES, sgls_code = the SGLS '
                     'authors\' TRADES classes', dict(choices=('trades', 'sgls_code'))),
    'trades_start': (str, 'normal', 'TRADES / SGLS-TRADES attack start: normal = x + 0.001 N(0, 1) (TRADES), uniform = '
                     'U(-eps, eps) clipped to [0, 1] (the SGLS authors\' TRADES_SAT class)',
                     dict(choices=('normal', 'uniform'))),
    'label_noise': (str, 'none', 'corrupt training labels by index (any method)',
                    dict(choices=('none', 'sym', 'asym'))),
    'noise_rate': (float, 0.0, 'fraction of training labels corrupted', dict(low=0.0, high=1.0)),
    'noise_seed': (int, 0, 'seed of the label corruption', {}),
}


class Method:
    name: str = ''
    attack: Objective | None = None
    soft_labels: bool = False
    params: tuple[str, ...] = ()

    def __init__(self, **values):
        unknown = set(values) - set(self.params)
        if unknown:
            raise ConfigError(f"method {self.name!r} has no parameter {', '.join(sorted(unknown))} "
                              f"(its parameters: {', '.join(self.params) or 'none'})")
        for key in self.params:
            setattr(self, key, values.get(key, PARAMS[key][1]))

    def phase(self, epoch: int):
        return None

    def loss(self, model, batch: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self.params)})"


def soft_cross_entropy(logits, target):
    """Mean over the batch of -sum_c target_c * log softmax(logits)_c."""
    return torch.sum(-F.log_softmax(upcast(logits), dim=1) * target, dim=1).mean()


def trades_kl(logits_adv, logits_clean):
    """TRADES robust term: KL(p_clean || p_adv), summed over classes, averaged over the batch."""
    return F.kl_div(F.log_softmax(upcast(logits_adv), dim=1), F.softmax(upcast(logits_clean), dim=1),
                    reduction='batchmean')


class CE(Method):
    """Standard training: cross entropy on clean images."""
    name = 'ce'

    def loss(self, model, b):
        logits = model(b.x)
        return F.cross_entropy(upcast(logits), b.y), logits


class AT(Method):
    """PGD-AT (Madry et al. 2018): cross entropy on PGD examples."""
    name, attack = 'at', CE_ATTACK

    def loss(self, model, b):
        logits_adv = model(b.x_adv)
        return F.cross_entropy(upcast(logits_adv), b.y), logits_adv


# The train-mode forwards of a TRADES step, in order (each moves the BatchNorm running statistics; the loss and its
# gradients are the same in every order, since a train-mode forward of the same batch gives the same logits):
TRADES_ORDERS = {
    # yaodongyu/TRADES trades.py (trades_loss): model(x_natural) for the CE term, model(x_adv) and model(x_natural)
    # again for the KL target (softmax, not detached). SGLS on TRADES in this order: the soft labels are updated
    # from the first clean and the adversarial forward.
    'trades': ('clean', 'adv', 'clean'),
    # The SGLS authors' TRADES class (trades.cpython-38.pyc): logits = model(x_natural); the KL term on
    # model(x_adv) against softmax(logits). Their TRADES_SAT (SGLS on TRADES) adds, from the start epoch, one more
    # model(x_adv) for the soft-label update before the KL term's: clean, adv, adv.
    'sgls_code': ('clean', 'adv'),
}


class TRADES(Method):
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta KL(f(x) || f(x_adv)), x_adv from the KL attack."""
    name, params = 'trades', ('beta', 'trades_order', 'trades_start')

    @property
    def attack(self):
        return Objective('kl', self.trades_start)

    def forwards(self, model, b):
        """(clean logits, adversarial logits) from the forwards of trades_order; the KL target is the last clean
        forward's (the same values as the first's, by another BatchNorm statistics update)."""
        logits_clean, logits_adv = model(b.x), model(b.x_adv)
        if TRADES_ORDERS[self.trades_order] == ('clean', 'adv', 'clean'):
            logits_clean = model(b.x)  # the CE term's logits are equal: the loss is computed on these
        return logits_clean, logits_adv

    def loss(self, model, b):
        logits_clean, logits_adv = self.forwards(model, b)
        return F.cross_entropy(upcast(logits_clean), b.y) + self.beta * trades_kl(logits_adv, logits_clean), \
            logits_adv


class _SoftLabelled:
    """SGLS's part of a method: the per-image soft labels, switched on from sgls_start_epoch."""
    soft_labels = True
    params = ('sgls_alpha', 'sgls_lam', 'sgls_start_epoch', 'sgls_r', 'sgls_temperature')

    def phase(self, epoch):
        """True from the start epoch (1-based, as the official code's loop): the soft labels are on."""
        return epoch >= self.sgls_start_epoch

    def target(self, b, logits_clean, logits_adv):
        """EMA-update this batch's soft labels from lam*p(x) + (1-lam)*p(x_adv); return the training target."""
        T = self.sgls_temperature
        p_clean = F.softmax(upcast(logits_clean.detach()) / T, dim=1)
        p_adv = F.softmax(upcast(logits_adv.detach()) / T, dim=1)
        t = b.soft_labels.update(b.idx, self.sgls_lam * p_clean + (1 - self.sgls_lam) * p_adv, self.sgls_alpha)
        if self.sgls_r == 1.0:
            return t
        return self.sgls_r * t + (1 - self.sgls_r) * F.one_hot(b.y, t.shape[1]).to(t.dtype)


class SGLS(_SoftLabelled, AT):
    """SGLS on AT: soft CE on f(x_adv) against the EMA soft labels; plain AT before the start epoch."""
    name = 'sgls'

    def loss(self, model, b):
        if not self.phase(b.epoch):
            return AT.loss(self, model, b)
        logits_adv = model(b.x_adv)
        with torch.no_grad():  # the official code's clean forward: train mode (BN statistics update), no graph needed
            logits_clean = model(b.x)
        return soft_cross_entropy(logits_adv, self.target(b, logits_clean, logits_adv)), logits_adv


class SGLSTrades(_SoftLabelled, TRADES):
    """SGLS on TRADES: the CE term against the soft labels; plain TRADES before the start epoch."""
    name = 'sgls_trades'
    params = TRADES.params + _SoftLabelled.params

    def loss(self, model, b):
        if not self.phase(b.epoch):
            return TRADES.loss(self, model, b)
        logits_clean, logits_adv = self.forwards(model, b)
        if self.trades_order == 'sgls_code':  # TRADES_SAT: a second adversarial forward feeds the soft labels
            with torch.no_grad():
                target = self.target(b, logits_clean, model(b.x_adv))
        else:
            target = self.target(b, logits_clean, logits_adv)
        return soft_cross_entropy(logits_clean, target) + self.beta * trades_kl(logits_adv, logits_clean), \
            logits_adv


METHODS = {m.name: m for m in (CE, AT, TRADES, SGLS, SGLSTrades)}


def make_method(name: str, **values) -> Method:
    """The method called `name` with the given parameters (the others at their defaults)."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name](**values)


def method_from_config(section) -> Method:
    """The method of a config's `method` section, reading only the keys it declares."""
    cls = METHODS[section.name]
    return cls(**{key: getattr(section, key) for key in cls.params})


def corrupt_labels(labels, num_classes, kind, rate, seed):
    """Label noise applied by index from a seed (the paper's noisy-label experiments).

    sym: a `rate` fraction of images get a label drawn uniformly from the other classes.
    asym: a `rate` fraction of images of each class c get a fixed confusable class: for 10 classes the
    CIFAR-10 mapping of Patrini et al. (truck->automobile, bird->airplane, deer->horse, cat<->dog),
    otherwise c -> c+1 mod C.
    """
    if kind == 'none':
        return labels.clone()
    g = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    flip = torch.rand(n, generator=g) < rate
    out = labels.cpu().clone()
    if kind == 'sym':
        shift = torch.randint(1, num_classes, (n,), generator=g)
        out[flip] = (out[flip] + shift[flip]) % num_classes
    else:
        mapping = torch.arange(num_classes).roll(-1)
        if num_classes == 10:
            mapping = torch.arange(10)
            mapping[[9, 2, 4, 3, 5]] = torch.tensor([1, 0, 7, 5, 3])
        out[flip] = mapping[out[flip]]
    return out.to(labels.device)
