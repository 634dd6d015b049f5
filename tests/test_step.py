"""The one training step: its GradScaler path, the attack's BatchNorm mode, and PGD's start callback."""
import copy

import pytest
import torch

from engine.attacks import pgd, random_start
from engine.methods import make_method
from engine.models import build_model
from engine.step import train_step
from tests.synthetic import synthetic_batches

ATTACK = dict(eps=16 / 255, step_size=8 / 255, steps=3, bn_mode='eval')


def setup(seed=0):
    x, y, idx, _ = synthetic_batches(seed, steps=2, batch=16, classes=4)
    torch.manual_seed(seed)
    model = build_model('small_cnn', 4, in_channels=3, width=8)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), (x[0], y[0], idx[0])


def test_an_enabled_grad_scaler_is_the_same_step():
    """fp16 goes through GradScaler(enabled=True), every other precision through a disabled one, in one code path.
    Scaling the loss by a power of two and unscaling the gradients is exact in floating point, so in float32 the
    scaled step must equal the plain one bitwise: weights, momentum and statistics."""
    model, optimizer, batch = setup()
    model2 = copy.deepcopy(model)
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10)
    for _ in range(2):
        torch.manual_seed(5)
        plain = train_step(model, optimizer, batch, method=make_method('at'), attack=ATTACK, soft_labels=None,
                           epoch=1)
        torch.manual_seed(5)
        scaled = train_step(model2, optimizer2, batch, method=make_method('at'), attack=ATTACK, soft_labels=None,
                            epoch=1, scaler=scaler)
        assert torch.equal(plain, scaled)
    assert scaler.get_scale() == 2.0 ** 10  # no overflow: no step was skipped
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert plain.shape == (1, 4) and plain[0, 3] > 0  # the grad norm of the unscaled gradients


@pytest.mark.parametrize('bn_mode, attack_forwards', [('eval', 0), ('train', 3)])
def test_the_attack_runs_in_the_asked_batchnorm_mode(bn_mode, attack_forwards):
    """bn_mode='train' attacks with batch statistics and moves the running statistics (Madry et al.'s code): each
    of the 3 PGD steps is one train-mode forward; 'eval' moves them only in the loss's forward."""
    model, optimizer, batch = setup()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    train_step(model, optimizer, batch, method=make_method('at'), attack=dict(ATTACK, bn_mode=bn_mode),
               soft_labels=None, epoch=1)
    assert bn.num_batches_tracked.item() == 1 + attack_forwards
    assert model.training


def test_pgd_takes_its_start_from_the_caller():
    """A start callback replaces the random start (packed seeds draw each seed's from its own stream) and is
    called once, with the clean batch and eps."""
    model, _, (x, y, _) = setup()
    model.eval()
    calls = []

    def start(x_clean, eps):
        calls.append((x_clean, eps))
        torch.manual_seed(3)
        return random_start(x_clean, eps, 'uniform')

    torch.manual_seed(3)
    reference = pgd(model, x, y, start='uniform', **ATTACK)
    torch.manual_seed(99)  # the callback draws its own numbers
    assert torch.equal(pgd(model, x, y, start=start, **ATTACK), reference)
    assert len(calls) == 1 and torch.equal(calls[0][0], x) and calls[0][1] == ATTACK['eps']
    fixed = pgd(model, x, y, start=lambda x_clean, eps: x_clean.clone(), **ATTACK)
    assert torch.equal(fixed, pgd(model, x, y, start='none', **ATTACK))


def test_without_the_clean_accuracy_forward_the_step_trains_the_same():
    """clean_acc=False skips only the no-grad eval-mode measurement: its column is 0 and every other statistic,
    weight and BN statistic is bitwise the same (the measurement moves no state and draws no random number)."""
    model, optimizer, batch = setup()
    model2 = copy.deepcopy(model)
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        torch.manual_seed(5)
        measured = train_step(model, optimizer, batch, method=make_method('at'), attack=ATTACK, soft_labels=None,
                              epoch=1)
        torch.manual_seed(5)
        skipped = train_step(model2, optimizer2, batch, method=make_method('at'), attack=ATTACK, soft_labels=None,
                             epoch=1, clean_acc=False)
        assert measured[0, 2] > 0 and skipped[0, 2] == 0
        assert torch.equal(measured[:, [0, 1, 3]], skipped[:, [0, 1, 3]])
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
