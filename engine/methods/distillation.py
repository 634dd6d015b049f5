"""Adversarial robustness distillation from a frozen teacher: RSLAD (Zi et al. ICCV 2021) and ARD (Goldblum et al.
AAAI 2020), each as its official code computes it.

The teacher is LossInputs.teacher (and the step's `teacher`): a frozen callable in eval mode returning logits,
run here without a graph. Neither method packs: the teacher is one network of single-seed inputs, while packed
seeds hand the step a [B, K*C, H, W] batch (the run refuses --pack for them; not_packable_because).
"""
import torch
import torch.nn.functional as F

from engine.methods.base import CE_ATTACK, KL_ATTACK, PARAMS, Method
from engine.models import ARCHS
from engine.precision import upcast

PARAMS.update({
    'teacher': (str, '', 'rslad / ard: the frozen teacher: a checkpoint of this engine (runs/<name>/checkpoints/'
                'best.pt), or a plain state dict (.pt, loaded with weights_only) or .safetensors file of '
                'method.teacher_arch (engine/teacher.py)', {}),
    'teacher_arch': (str, '', 'rslad / ard: the architecture of a plain teacher file (empty for this engine\'s '
                     'checkpoints, which name their own)', dict(choices=('',) + ARCHS)),
    'teacher_width': (int, 0, 'rslad / ard: model.width of a plain teacher file (0 = its arch\'s default)',
                      dict(low=0)),
    'rslad_kl': (str, 'official', 'rslad: the KL of both terms. official = zibojia/RSLAD (c40e04f) kl_loss: '
                 'mean over batch x classes of p_T (log(p_T + 1e-5) - log p_S), times classes/10 (x1 on CIFAR-10; x10 '
                 'on CIFAR-100, as its *_cifar100.py scripts and README); batchmean = KL summed over classes, '
                 'averaged over the batch (the paper\'s KL)', dict(choices=('official', 'batchmean'))),
    'ard_temperature': (float, 30.0, 'ard: distillation temperature tau (goldblum/AdversariallyRobustDistillation '
                        'main.py --temp 30, 779ade3)', dict(low=1e-6)),
    'ard_alpha': (float, 1.0, 'ard: weight a of the distillation term; 1 - a weighs CE(f(x), y) (main.py --alpha 1)',
                  dict(low=0.0, high=1.0)),
    'ard_kl': (str, 'official', 'ard: official = nn.KLDivLoss() of main.py L113 (reduction mean: averaged over '
               'batch x classes); batchmean = summed over classes, averaged over the batch',
               dict(choices=('official', 'batchmean'))),
})

NOT_PACKABLE = ('a distilling method runs its teacher on single-seed batches; packed seeds give the step one '
                '[B, K*C, H, W] batch: train distillation runs unpacked')


class _Distilling:
    distills, packable, not_packable_because = True, False, NOT_PACKABLE

    def teacher_probs(self, teacher, x, temperature=1.0):
        """softmax(teacher(x) / temperature), no graph. The step asks for the attack target and the loss for the
        same batch x: the teacher runs once per step (cached by the identity of x and teacher)."""
        cached = getattr(self, '_teacher_cache', None)
        if cached is not None and cached[0] is x and cached[1] is teacher and cached[2] == temperature:
            return cached[3]
        with torch.no_grad():
            probs = F.softmax(upcast(teacher(x)) / temperature, dim=1)
        self._teacher_cache = (x, teacher, temperature, probs)
        return probs


class RSLAD(_Distilling, Method):
    """RSLAD: zibojia/RSLAD at c40e04f, rslad_loss.py rslad_inner_loss (L26-59) and resnet18_rslad_cifar10.py
    (L38-65; the other three scripts the same, the *_cifar100.py ones with the x10). With T = softmax(teacher(x)),
    the teacher in eval mode on the clean batch, and no hard label anywhere:
      attack: maximise sum KL(T || softmax(f(x'))) from x + 0.001 N(0, 1), the student in eval mode (L37-51;
        engine.attacks.pgd's 'kl' loss with p_clean = attack_target = T, the same sum; the scripts run 10 steps
        of 2/255 in 8/255: the attack section);
      loss = 5/6 KL(T || f(x_adv)) + 1/6 KL(T || f(x)), train-mode forwards adversarial then clean (L56-63), KL as
        method.rslad_kl (official: kl_loss of L38-40, torch.mean over batch x classes, x10 for CIFAR-100)."""
    name, attack = 'rslad', KL_ATTACK
    params = ('rslad_kl',)

    def attack_target(self, teacher, x):
        return self.teacher_probs(teacher, x)

    def kl(self, logits, target):
        log_q = F.log_softmax(upcast(logits), dim=1)
        if self.rslad_kl == 'batchmean':
            return F.kl_div(log_q, target, reduction='batchmean')
        return (target * torch.log(target + 1e-5) - target * log_q).mean() * (target.shape[1] / 10)

    def loss(self, model, b):
        target = self.teacher_probs(b.teacher, b.x)
        logits_adv = model(b.x_adv)
        logits_clean = model(b.x)
        return 5 / 6 * self.kl(logits_adv, target) + 1 / 6 * self.kl(logits_clean, target), logits_adv


class ARD(_Distilling, Method):
    """ARD: goldblum/AdversariallyRobustDistillation at 779ade3, main.py. x' = PGD-10 on the student's summed CE
    with the hard label (AttackPGD, L60-79; config L100-104: 8/255, 2/255, 10 steps) from x + U(-eps, eps);
        loss = a tau^2 KL(softmax(teacher(x)/tau) || softmax(f(x')/tau)) + (1 - a) CE(f(x), y)   (L127)
    defaults tau = 30, a = 1 (L23, L26), the KL nn.KLDivLoss() (L113: reduction mean, over batch x classes; the
    paper's KL is method.ard_kl=batchmean). Train-mode forwards: adversarial then clean (L124-126); with a = 1 the
    clean forward still runs (no graph) for its BatchNorm statistics, as there.
    Known differences: the official attack runs the student in TRAIN mode (net.train() at L118 holds during the
    attack: batch statistics, running statistics moved by each PGD step), so its configs set attack.bn_mode=train;
    its start is not clipped to [0, 1] (L70), ours is (CE_ATTACK)."""
    name, attack = 'ard', CE_ATTACK
    params = ('ard_temperature', 'ard_alpha', 'ard_kl')

    def loss(self, model, b):
        tau, a = self.ard_temperature, self.ard_alpha
        logits_adv = model(b.x_adv)
        target = self.teacher_probs(b.teacher, b.x, tau)
        kl = F.kl_div(F.log_softmax(upcast(logits_adv) / tau, dim=1), target, reduction='sum')
        kl = kl / (target.numel() if self.ard_kl == 'official' else target.shape[0])
        loss = a * tau * tau * kl
        if a == 1.0:
            with torch.no_grad():
                model(b.x)
        else:
            loss = loss + (1.0 - a) * F.cross_entropy(upcast(model(b.x)), b.y)
        return loss, logits_adv
