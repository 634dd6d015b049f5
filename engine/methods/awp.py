"""Adversarial weight perturbation (AWP, Wu et al. 2020) on AT and on TRADES: methods `at_awp` and `trades_awp`.

As the official code (github csdongxian/AWP at a7acf5d, AT_AWP/utils_awp.py and trades_AWP/utils_awp.py,
AdvWeightPerturb / TradesAWP; the loops AT_AWP/train_cifar10.py lines 340-363, trades_AWP/train_trades_cifar.py
lines 179-206), each step after the input attack:
1. a proxy copy of the model in train mode takes one SGD step that *ascends* the method's loss on (x, x_adv);
2. for every weight of two or more dimensions (conv and linear weights; 'weight' in its state-dict name, dim > 1)
   the perturbation is d = ||w|| / (||w_proxy - w|| + 1e-20) * (w_proxy - w), i.e. the loss gradient rescaled
   to the layer's weight norm (the proxy's learning rate cancels);
3. the model is perturbed, w += gamma d, the method's own loss is computed there, backpropagated and the
   optimizer steps; 4. then w -= gamma d.
Here the proxy is a functional call of the model with its parameters detached and its buffers cloned
(torch.func.functional_call), which is what the official reload-then-step proxy computes without a second
module: the proxy's train-mode forwards move cloned BatchNorm statistics, never the model's. Defaults as the
official scripts: AT gamma 0.01 from the first epoch (--awp-gamma 0.01, --awp-warmup 0 of 0-based epochs);
TRADES gamma 0.005 from epoch 10 (--awp-gamma 0.005, --awp-warmup 10 of 1-based epochs). Known difference: the
official TRADES-AWP loss runs model(x_adv) before its two clean forwards; here TRADES' own order is kept
(method.trades_order), which moves BatchNorm statistics in another order and computes the same loss.

Packing is refused: the perturbation is scaled per layer by its norm, which for packed seeds would have to be
taken per seed slice, and the packed losses see lockstep callables, not modules.
"""
import torch
import torch.nn.functional as F
from torch.func import functional_call

from engine.methods.adversarial import AT, TRADES
from engine.methods.base import PARAMS, trades_kl
from engine.precision import upcast

EPS = 1e-20  # utils_awp.py EPS

PARAMS.update({
    'awp_gamma': (float, 0.0, 'at_awp / trades_awp: weight perturbation size gamma (0 = the official default: 0.01 '
                  'for AT, 0.005 for TRADES; csdongxian/AWP a7acf5d train_cifar10.py / train_trades_cifar.py '
                  '--awp-gamma)', dict(low=0.0)),
    'awp_start_epoch': (int, 0, 'at_awp / trades_awp: first (1-based) epoch with weight perturbation (0 = the official '
                        'default: 1 for AT, 10 for TRADES; --awp-warmup)', dict(low=0)),
})


def _module(model):
    return getattr(model, '_orig_mod', model)  # a torch.compile'd model: its module


class _WeightPerturbation:
    """AWP's part of a method: `awp_objective(forward, b)` is what the proxy ascends; the perturbation is applied
    inside loss() and removed by after_step() (engine.step calls it after the optimizer step). method.awp_gamma
    and method.awp_start_epoch of 0 mean the variant's official default (`defaults`)."""
    packable = False
    not_packable_because = ('AWP scales its weight perturbation by each layer\'s norm, which packed seeds would '
                            'have to take per seed; train AWP runs unpacked')
    defaults: dict

    @property
    def gamma(self):
        return self.awp_gamma or self.defaults['awp_gamma']

    @property
    def start_epoch(self):
        return self.awp_start_epoch or self.defaults['awp_start_epoch']

    def phase(self, epoch):
        return (super().phase(epoch), epoch >= self.start_epoch)

    def perturbation(self, model, b):
        """{parameter: d} for the model's perturbed weights (see the module docstring)."""
        net = _module(model)
        params = dict(net.named_parameters())
        targets = [name for name, p in params.items() if p.dim() > 1 and 'weight' in name]
        proxy = {name: p.detach().requires_grad_(name in targets) for name, p in params.items()}
        proxy.update({name: b_.clone() for name, b_ in net.named_buffers()})  # the proxy's statistics move
        with torch.enable_grad():
            objective = self.awp_objective(lambda x: functional_call(net, proxy, (x,)), b)
            grads = torch.autograd.grad(objective, [proxy[name] for name in targets])
        perturbation = {}
        for name, grad in zip(targets, grads):
            weight = params[name].detach()
            perturbation[params[name]] = torch.linalg.vector_norm(weight) / (
                torch.linalg.vector_norm(grad) + EPS) * grad
        return perturbation

    def loss(self, model, b):
        self._applied = None
        if b.epoch >= self.start_epoch:
            self._applied = self.perturbation(model, b)
            with torch.no_grad():
                for param, d in self._applied.items():
                    param.add_(d, alpha=self.gamma)
        return super().loss(model, b)

    def after_step(self, model):
        if getattr(self, '_applied', None):
            with torch.no_grad():
                for param, d in self._applied.items():
                    param.sub_(d, alpha=self.gamma)
        self._applied = None


class ATAWP(_WeightPerturbation, AT):
    """AT-AWP: PGD-AT at adversarially perturbed weights; the proxy ascends CE(f(x_adv), y)."""
    name = 'at_awp'
    params = AT.params + ('awp_gamma', 'awp_start_epoch')
    defaults = {'awp_gamma': 0.01, 'awp_start_epoch': 1}

    def awp_objective(self, forward, b):
        return F.cross_entropy(upcast(forward(b.x_adv)), b.y)


class TradesAWP(_WeightPerturbation, TRADES):
    """TRADES-AWP: TRADES at adversarially perturbed weights; the proxy ascends CE(f(x), y) + beta KL(f(x) ||
    f(x_adv)) (the KL target not detached, as trades_AWP/utils_awp.py)."""
    name = 'trades_awp'
    params = TRADES.params + ('awp_gamma', 'awp_start_epoch')
    defaults = {'awp_gamma': 0.005, 'awp_start_epoch': 10}

    def awp_objective(self, forward, b):
        logits_clean = forward(b.x)  # train-mode BN uses batch statistics: the official second clean forward
        return F.cross_entropy(upcast(logits_clean), b.y) + self.beta * trades_kl(forward(b.x_adv), logits_clean)
