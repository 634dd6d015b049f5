"""Training objectives, each a small loss over the shared PGD attack (engine.attacks.pgd).

Every loss function takes the batch and the adversarial examples and returns (loss, logits on which robust
training accuracy is measured). Formulas follow the official SGLS code (devicerxx/SGLS, losses/loss.py) and
TRADES (Zhang et al. 2019); the SGLS options r and T are the paper's general form, with defaults (r=1, T=1) that
reproduce the code.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.precision import upcast


@dataclass(frozen=True)
class Method:
    name: str = 'at'
    beta: float = 6.0
    alpha: float = 0.9
    lam: float = 0.2
    start_epoch: int = 90
    r: float = 1.0
    temperature: float = 1.0

    @classmethod
    def from_cfg(cls, m):
        return cls(m.name, m.beta, m.sgls_alpha, m.sgls_lam, m.sgls_start_epoch, m.sgls_r, m.sgls_temperature)

    @property
    def attack_loss(self):
        """TRADES-style methods maximise the KL to the clean prediction from a small Gaussian start."""
        return ('kl', 'normal') if 'trades' in self.name else ('ce', 'uniform')

    def soft_labels_active(self, epoch):
        """SGLS uses plain AT / TRADES before start_epoch (1-based epochs, as the official code's loop)."""
        return self.name.startswith('sgls') and epoch >= self.start_epoch


def soft_cross_entropy(logits, target):
    """Mean over the batch of -sum_c target_c * log softmax(logits)_c."""
    return torch.sum(-F.log_softmax(upcast(logits), dim=1) * target, dim=1).mean()


def trades_kl(logits_adv, logits_clean):
    """TRADES robust term: KL(p_clean || p_adv), summed over classes, averaged over the batch."""
    return F.kl_div(F.log_softmax(upcast(logits_adv), dim=1), F.softmax(upcast(logits_clean), dim=1),
                    reduction='batchmean')


def sgls_target(method, soft_labels, idx, y, logits_clean, logits_adv):
    """EMA-update the soft labels of this batch from lam*p(x) + (1-lam)*p(x_adv); return the training target."""
    T = method.temperature
    p_clean = F.softmax(upcast(logits_clean.detach()) / T, dim=1)
    p_adv = F.softmax(upcast(logits_adv.detach()) / T, dim=1)
    t = soft_labels.update(idx, method.lam * p_clean + (1 - method.lam) * p_adv, method.alpha)
    if method.r == 1.0:
        return t
    return method.r * t + (1 - method.r) * F.one_hot(y, t.shape[1]).to(t.dtype)


def loss_ce(method, model, x, x_adv, y, idx, soft_labels, epoch):
    logits = model(x)
    return F.cross_entropy(upcast(logits), y), logits


def loss_at(method, model, x, x_adv, y, idx, soft_labels, epoch):
    logits_adv = model(x_adv)
    return F.cross_entropy(upcast(logits_adv), y), logits_adv


def loss_sgls(method, model, x, x_adv, y, idx, soft_labels, epoch):
    logits_adv = model(x_adv)
    if not method.soft_labels_active(epoch):
        return F.cross_entropy(upcast(logits_adv), y), logits_adv
    with torch.no_grad():  # the official code's clean forward: train mode (BN statistics update), no graph needed
        logits_clean = model(x)
    target = sgls_target(method, soft_labels, idx, y, logits_clean, logits_adv)
    return soft_cross_entropy(logits_adv, target), logits_adv


def loss_trades(method, model, x, x_adv, y, idx, soft_labels, epoch):
    logits_clean, logits_adv = model(x), model(x_adv)
    return F.cross_entropy(upcast(logits_clean), y) + method.beta * trades_kl(logits_adv, logits_clean), logits_adv


def loss_sgls_trades(method, model, x, x_adv, y, idx, soft_labels, epoch):
    if not method.soft_labels_active(epoch):
        return loss_trades(method, model, x, x_adv, y, idx, soft_labels, epoch)
    logits_clean, logits_adv = model(x), model(x_adv)
    target = sgls_target(method, soft_labels, idx, y, logits_clean, logits_adv)
    loss = soft_cross_entropy(logits_clean, target) + method.beta * trades_kl(logits_adv, logits_clean)
    return loss, logits_adv


LOSSES = {'ce': loss_ce, 'at': loss_at, 'trades': loss_trades, 'sgls': loss_sgls, 'sgls_trades': loss_sgls_trades}


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
