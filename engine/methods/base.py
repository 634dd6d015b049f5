"""What every method shares: the attack Objective, the loss inputs, the config keys, the Method base class."""
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
    (None unless the method keeps one) and, for distillation, a teacher (a frozen callable model). clean_eval:
    the eval-mode, no-grad logits of x, where the step provides them (see TE in engine/methods/baselines.py)."""
    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    epoch: int
    x_adv: torch.Tensor | None = None
    soft_labels: SoftLabels | None = None
    teacher: Callable | None = None
    clean_eval: torch.Tensor | None = None


# The `method` config section besides `name`: key -> (type, default, help, limits). Each method reads its own keys,
# declared in its module next to its loss (engine.methods imports every module before engine.config reads this).
PARAMS: dict[str, tuple[type, Any, str, dict]] = {}

LABEL_NOISE_PARAMS = {  # any method
    'label_noise': (str, 'none', 'corrupt training labels by index (any method)',
                    dict(choices=('none', 'sym', 'asym'))),
    'noise_rate': (float, 0.0, 'fraction of training labels corrupted', dict(low=0.0, high=1.0)),
    'noise_seed': (int, 0, 'seed of the label corruption', {}),
}


class Method:
    name: str = ''
    attack: Objective | None = None
    soft_labels: bool = False
    table_class: type = SoftLabels  # the soft-label table the run builds for it, when soft_labels
    params: tuple[str, ...] = ()
    distills: bool = False  # learns from a frozen teacher (LossInputs.teacher; the step's `teacher`)
    packable: bool = True   # may train as packed seeds (engine.packing); if not, not_packable_because says why
    not_packable_because: str = ''
    uses_clean_eval: bool = False  # its loss reads the step's eval-mode clean logits (LossInputs.clean_eval)

    def __init__(self, **values):
        unknown = set(values) - set(self.params)
        if unknown:
            raise ConfigError(f"method {self.name!r} has no parameter {', '.join(sorted(unknown))} "
                              f"(its parameters: {', '.join(self.params) or 'none'})")
        for key in self.params:
            setattr(self, key, values.get(key, PARAMS[key][1]))

    def phase(self, epoch: int):
        return None

    def begin_epoch(self, epoch: int) -> None:
        """Called by the epoch loop before the epoch's first step: a method whose loss reads an epoch-dependent
        value inside the captured step fills its device tensor here (a Python float would be frozen at capture)."""

    def after_step(self, model) -> None:
        """Called by the step after the optimizer step (AWP removes its weight perturbation here)."""

    def attack_target(self, teacher, x: torch.Tensor) -> torch.Tensor | None:
        """The KL attack's target distribution on the clean batch x (engine.attacks.pgd's p_clean), or None: the
        attacked model's own clean prediction (TRADES). Distillation attacks towards the teacher's."""
        return None

    def loss(self, model, batch: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self.params)})"


def soft_cross_entropy(logits, target):
    """Mean over the batch of -sum_c target_c * log softmax(logits)_c."""
    return torch.sum(-F.log_softmax(upcast(logits), dim=1) * target, dim=1).mean()


def trades_kl(logits_adv, logits_clean):
    """TRADES robust term: KL(p_clean || p_adv), summed over classes, averaged over the batch. The target p_clean
    is not detached (as TRADES) and is passed as log_softmax (log_target): the same value as kl_div(log p_adv,
    softmax(z_clean)), but its gradient through the target stays finite where a float32 softmax underflows to 0
    (kl_div's target gradient holds log(target): -inf there, and NaN weights after the step; seen on a tiny
    SGLS-TRADES run, 2026-12-02)."""
    return F.kl_div(F.log_softmax(upcast(logits_adv), dim=1), F.log_softmax(upcast(logits_clean), dim=1),
                    reduction='batchmean', log_target=True)


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
