"""The baselines an SGLS claim must beat (issue 14), each as its official code computes it.

- at_ls: PGD-AT with label smoothing (the Bag-of-Tricks baseline);
- trades_sat: TRADES with self-adaptive training (Huang et al. 2020), the code SGLS was forked from;
- te: PGD-AT with temporal ensembling (Dong et al. ICLR 2022);
- mart: MART (Wang et al. ICLR 2020).
Sources are the repositories at the commits named in each class; "official" means that code, and where it differs
from its paper the code is followed. Known differences from the code are named in the class docstrings.
"""
import math

import torch
import torch.nn.functional as F

from engine.attacks import eval_mode
from engine.methods.base import CE_ATTACK, KL_ATTACK, PARAMS, Method, Objective, soft_cross_entropy, trades_kl
from engine.precision import upcast
from engine.soft_labels import EnsembleTable

PARAMS.update({
    'label_smoothing': (float, 0.1, 'at_ls: label smoothing eps of the training loss (the attack maximises plain '
                        'CE), as P2333/Bag-of-Tricks-for-AT train_cifar.py L34-50, L509-510 (ebf1e9b)',
                        dict(low=0.0, high=1.0)),
    'label_smoothing_form': (str, 'torch', 'at_ls: torch = F.cross_entropy(label_smoothing=eps), target '
                             '(1-eps) onehot + eps/C; bag_of_tricks = 1-eps on the label, eps/(C-1) on the others '
                             '(P2333/Bag-of-Tricks-for-AT LabelSmoothingLoss)',
                             dict(choices=('torch', 'bag_of_tricks'))),
    'sat_momentum': (float, 0.9, 'trades_sat: EMA momentum of the soft labels (LayneH/self-adaptive-training '
                     'scripts/cifar10/run_trades_sat.sh ALPHA=0.9, 2f902b3)', dict(low=0.0, high=1.0)),
    'sat_start_epoch': (int, 70, 'trades_sat: first (1-based) epoch of self-adaptive training; before it plain '
                        'TRADES (run_trades_sat.sh ES=70; losses/trades.py L84 `if epoch < self.es`)', dict(low=1)),
    'te_alpha': (float, 0.9, 'te: EMA momentum of the ensembled predictions (dongyp13/memorization-AT '
                 'train_te.py --te-alpha 0.9, 5edda6c)', dict(low=0.0, high=1.0)),
    'te_start_epoch': (int, 90, 'te: first (1-based) epoch of temporal ensembling, where its ramp starts; before it '
                       'plain PGD-AT (train_te.py --start-es 90)', dict(low=1)),
    'te_end_epoch': (int, 150, 'te: epoch where the sigmoid ramp of the TE weight reaches 1 (train_te.py --end-es '
                     '150)', dict(low=1)),
    'te_weight': (float, 300.0, 'te: weight of the TE term at the end of its ramp (train_te.py --reg-weight 300); '
                  'the term is the mean over batch x classes of (p(x_adv) - ensemble)^2', dict(low=0.0)),
    'mart_beta': (float, 6.0, 'mart: weight of the misclassification-aware KL term (YisenWang/MART mart.py and '
                  'train_wideresnet.py: 6; its train_resnet.py: 5; 2d83e17)', dict(low=0.0)),
})


class ATLS(Method):
    """AT with label smoothing: CE_eps(f(x_adv), y) on the PGD-AT examples (plain CE attack from a uniform start).
    torch form (default): (1-eps) CE(f(x_adv), y) + eps/C sum_c -log p_c(x_adv), torch's label_smoothing.
    bag_of_tricks form: the smoothed target of P2333/Bag-of-Tricks-for-AT (Pang et al. ICLR 2021) train_cifar.py
    L34-50 at ebf1e9b (1-eps on y, eps/(C-1) elsewhere; its classes=10 is the number of classes here)."""
    name, attack = 'at_ls', CE_ATTACK
    params = ('label_smoothing', 'label_smoothing_form')

    def loss(self, model, b):
        logits_adv = model(b.x_adv)
        z, eps = upcast(logits_adv), self.label_smoothing
        if self.label_smoothing_form == 'torch':
            return F.cross_entropy(z, b.y, label_smoothing=eps), logits_adv
        classes = z.shape[1]
        target = torch.full_like(z, eps / (classes - 1)).scatter_(1, b.y[:, None], 1.0 - eps)
        return soft_cross_entropy(z, target), logits_adv


class TradesSAT(Method):
    """TRADES + self-adaptive training (Huang et al. NeurIPS 2020): LayneH/self-adaptive-training at 2f902b3,
    losses/trades.py TRADES_SAT (L47-97), defaults from scripts/cifar10/run_trades_sat.sh (ALPHA 0.9, ES 70, BETA 6;
    main_adv.py L147: 1-based epochs). Attack: TRADES' KL attack from x + 0.001 N(0, 1), model in eval mode
    (L62-75). Train-mode forwards: clean, then adversarial (L83, L94). Before sat_start_epoch plain TRADES:
    CE(f(x), y) + beta KL(f(x) || f(x_adv)). From it (L86-92), with p = softmax(f(x)) detached (the train-mode clean
    forward's) and t the per-image table (one-hot at first):
        t[idx] = m t[idx] + (1 - m) p;   w_i = max_c t_ic, rescaled to sum to the batch size (w *= B / sum w);
        loss = mean_i w_i sum_c -t_ic log p_ic + beta KL(f(x) || f(x_adv))   (KL summed over classes / B,
    its target softmax(f(x)) not detached, as TRADES)."""
    name, attack, soft_labels = 'trades_sat', KL_ATTACK, True
    params = ('beta', 'sat_momentum', 'sat_start_epoch')

    def phase(self, epoch):
        return epoch >= self.sat_start_epoch

    def loss(self, model, b):
        logits_clean, logits_adv = model(b.x), model(b.x_adv)
        z = upcast(logits_clean)
        if not self.phase(b.epoch):
            natural = F.cross_entropy(z, b.y)
        else:
            t = b.soft_labels.update(b.idx, F.softmax(z.detach(), dim=1), self.sat_momentum)
            weights = t.max(dim=1).values
            weights = weights * (t.shape[0] / weights.sum())
            natural = (torch.sum(-F.log_softmax(z, dim=1) * t, dim=1) * weights).mean()
        return natural + self.beta * trades_kl(logits_adv, logits_clean), logits_adv


def sigmoid_rampup(epoch, start, end):
    """dongyp13/memorization-AT train_te.py L212-221 (5edda6c): 0 before start, 1 after end, else
    exp(-5 (1 - (epoch - start) / (end - start))^2) (from Laine & Aila); end <= start: a step at start."""
    if epoch < start:
        return 0.0
    if epoch > end or end <= start:
        return 1.0
    phase = 1.0 - (epoch - start) / (end - start)
    return math.exp(-5.0 * phase * phase)


class TE(Method):
    """PGD-AT + temporal ensembling (Dong et al., "Exploring Memorization in Adversarial Training", ICLR 2022):
    dongyp13/memorization-AT at 5edda6c, loss.py PGD_TE (L69-125) as train_te.py (L68-74 defaults, L266-272) runs it.
    Before te_start_epoch plain PGD-AT. From it, each step:
      p = softmax(f(x)) from an eval-mode, no-grad clean forward before the training forward (L82-87);
      t[idx] = a t[idx] + (1 - a) p, the table starting at ZERO (L73; engine.soft_labels.EnsembleTable, this
        method's table_class), read normalised: q = t[idx] / sum_c t[idx] (L88-89);
      loss = CE(f(x_adv), y) + w(epoch) mean_{batch x classes} (softmax(f(x_adv)) - q)^2 (L120-122, one
        train-mode forward), w(epoch) = te_weight * sigmoid_rampup(epoch, te_start_epoch, te_end_epoch)
        (L212-221, L268-269: 300 exp(-5 (1 - (epoch - 90) / 60)^2), 2.02 at epoch 90, 300 from 150 on).
    The ramp weight changes every epoch but the step does not: it is one phase from te_start_epoch on, and w is
    read from a device tensor this method owns, filled on the host by begin_epoch(epoch) (the epoch loop calls
    it), so a captured CUDA graph replays the current epoch's weight; a caller of the step that does not call
    begin_epoch (eager only) gets it filled from the batch's epoch by the loss.
    The eval-mode clean logits come from the step (LossInputs.clean_eval, asked for by uses_clean_eval: its
    clean-accuracy forward, before the attack as there; packed seeds get their slices); a caller of the loss that
    provides none gets model(x) run in eval mode by the loss itself.
    Known differences from the official code: its attack maximises CE(f(x_adv), y) + w mean (p(x_adv) - q)^2
    (L96-104) from an unclipped uniform start (L93); here the attack is PGD-AT's (CE from a clipped uniform start),
    as the engine's attacks take no method term."""
    name, attack, soft_labels, table_class = 'te', CE_ATTACK, True, EnsembleTable
    params = ('te_alpha', 'te_start_epoch', 'te_end_epoch', 'te_weight')
    uses_clean_eval = True

    def __init__(self, **values):
        super().__init__(**values)
        self._weight, self._weight_epoch = None, None

    def phase(self, epoch):
        return epoch >= self.te_start_epoch

    def ramp(self, epoch):
        return self.te_weight * sigmoid_rampup(epoch, self.te_start_epoch, self.te_end_epoch)

    def begin_epoch(self, epoch):
        self._weight_epoch = epoch
        if self._weight is not None:
            self._weight.fill_(self.ramp(epoch))

    def ramp_weight(self, epoch, like):
        """The TE weight of `epoch` as a 0-dim tensor of like's device and dtype (see the class docstring)."""
        w = self._weight
        if w is None or w.device != like.device or w.dtype != like.dtype:
            self._weight = w = torch.tensor(self.ramp(epoch), dtype=like.dtype, device=like.device)
            self._weight_epoch = epoch
        elif self._weight_epoch != epoch:
            self.begin_epoch(epoch)
        return w

    def clean_prediction(self, model, b):
        logits = b.clean_eval
        if logits is None:
            if not isinstance(model, torch.nn.Module):
                raise RuntimeError("method 'te' needs the eval-mode clean logits (LossInputs.clean_eval) to train "
                                   'as packed seeds')
            with torch.no_grad(), eval_mode(model):
                logits = model(b.x)
        return F.softmax(upcast(logits.detach()), dim=1)

    def loss(self, model, b):
        if not isinstance(b.soft_labels, EnsembleTable):
            raise RuntimeError(f"method 'te' needs its table built as method.table_class (EnsembleTable, zero at "
                               f'first), got {type(b.soft_labels).__name__}')
        if not self.phase(b.epoch):
            logits_adv = model(b.x_adv)
            return F.cross_entropy(upcast(logits_adv), b.y), logits_adv
        p = self.clean_prediction(model, b)  # before the training forward moves the BN statistics it uses
        rows = b.soft_labels.update(b.idx, p, self.te_alpha)
        q = rows / rows.sum(dim=1, keepdim=True)
        logits_adv = model(b.x_adv)
        z = upcast(logits_adv)
        mse = ((F.softmax(z, dim=1) - q) ** 2).mean()
        return F.cross_entropy(z, b.y) + self.ramp_weight(b.epoch, mse) * mse, logits_adv


class MART(Method):
    """MART (Wang et al. ICLR 2020): YisenWang/MART at 2d83e17, mart.py L7-57. Attack: PGD on CE from x + 0.001
    N(0, 1), model in eval mode (L17-29). Train-mode forwards: clean, adversarial (L38-40). With p' = softmax(f(x_adv)),
    p = softmax(f(x)) (neither detached) and y' = the most probable class of p' other than y (L44-46):
        BCE = CE(f(x_adv), y) - mean_i log(1.0001 - p'_{i y'_i} + 1e-12)   (L48)
        loss = BCE + beta / B sum_i (1.0000001 - p_{i y_i}) sum_c p_ic (log p_ic - log(p'_ic + 1e-12))   (L50-56)
    Ties for the top class are broken by topk here, by argsort there (measure-zero)."""
    name, attack = 'mart', Objective('ce', 'normal')
    params = ('mart_beta',)

    def loss(self, model, b):
        logits_clean, logits_adv = model(b.x), model(b.x_adv)
        p_adv = F.softmax(upcast(logits_adv), dim=1)
        top2 = p_adv.topk(2, dim=1).indices
        wrong = torch.where(top2[:, 0] == b.y, top2[:, 1], top2[:, 0])
        bce = F.cross_entropy(upcast(logits_adv), b.y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), wrong)
        p_nat = F.softmax(upcast(logits_clean), dim=1)
        true_probs = p_nat.gather(1, b.y[:, None]).squeeze(1)
        # = kl_div(log(p_adv + 1e-12), p_nat).sum(1) (mart.py L50-51), with log p_nat from log_softmax so that the
        # gradient through the (not detached) target stays finite where p_nat underflows (see trades_kl)
        kl = (p_nat * (F.log_softmax(upcast(logits_clean), dim=1) - torch.log(p_adv + 1e-12))).sum(dim=1)
        robust = torch.sum(kl * (1.0000001 - true_probs)) / p_nat.shape[0]
        return bce + self.mart_beta * robust, logits_adv
