"""Standard training, PGD-AT, TRADES, and SGLS on AT and on TRADES.

Formulas follow the official SGLS code (devicerxx/SGLS at 3e96990, losses/loss.py) and TRADES (Zhang et al. 2019,
yaodongyu/TRADES trades.py); the SGLS options r and T are the paper's general form, with defaults (r=1, T=1) that
reproduce the code. SGLS on TRADES has no released source; the SGLS repository holds the authors' compiled TRADES
classes (losses/__pycache__/trades.cpython-38.pyc, decompiled: TRADES and TRADES_SAT), which method.trades_order
and method.trades_start reproduce (see TRADES_ORDERS).
"""
import torch
import torch.nn.functional as F

from engine.methods.base import CE_ATTACK, PARAMS, Method, Objective, soft_cross_entropy, trades_kl
from engine.precision import upcast

PARAMS.update({
    'beta': (float, 6.0, 'TRADES: weight of the KL term', dict(low=0.0)),
    'sgls_alpha': (float, 0.9, 'SGLS: EMA momentum a of the soft labels', dict(low=0.0, high=1.0)),
    'sgls_lam': (float, 0.2, 'SGLS: weight of the clean prediction in the EMA target', dict(low=0.0, high=1.0)),
    'sgls_start_epoch': (int, 90, 'SGLS: first (1-based) epoch with soft labels; before it plain AT/TRADES (the '
                         'official SGLS scripts: 90 for AT; the authors\' TRADES_SAT class: 70)', dict(low=1)),
    'sgls_r': (float, 1.0, 'SGLS: target = r*t + (1-r)*onehot(y) (official code: r=1)', dict(low=0.0, high=1.0)),
    'sgls_temperature': (float, 1.0, 'SGLS: temperature of the predictions fed to the EMA', dict(low=1e-6)),
    'trades_order': (str, 'trades', 'TRADES / SGLS-TRADES: the train-mode forwards of a step, which move BatchNorm '
                     'statistics (engine/methods/adversarial.py TRADES_ORDERS): trades = yaodongyu/TRADES, sgls_code = '
                     'the SGLS authors\' TRADES classes', dict(choices=('trades', 'sgls_code'))),
    'trades_start': (str, 'normal', 'TRADES / SGLS-TRADES attack start: normal = x + 0.001 N(0, 1) (TRADES), uniform = '
                     'U(-eps, eps) clipped to [0, 1] (the SGLS authors\' TRADES_SAT class)',
                     dict(choices=('normal', 'uniform'))),
})


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
