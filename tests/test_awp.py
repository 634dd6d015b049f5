"""AWP (engine.methods.awp) against the official algorithm written out below (csdongxian/AWP a7acf5d,
AT_AWP/utils_awp.py AdvWeightPerturb and trades_AWP/utils_awp.py TradesAWP, with their training loops): a proxy
module reloaded from the model, one SGD step of lr 0.01 on minus the loss, the per-layer rescaled difference,
perturb, the method's loss and an SGD step at the perturbed weights, restore. In float64 the weights after each
step (BatchNorm statistics included: the proxy's forwards move only the proxy's) and the step's loss equal the
official ones."""
import copy

import torch
import torch.nn.functional as F

from engine.attacks import pgd
from engine.methods import make_method
from engine.models import build_model
from engine.step import train_step
from tests.synthetic import synthetic_batches

ATTACK = dict(eps=16 / 255, step_size=8 / 255, steps=2, bn_mode='eval')
EPS = 1e-20


def official_diff_in_weights(model, proxy):
    diff = {}
    for (old_k, old_w), (_, new_w) in zip(model.state_dict().items(), proxy.state_dict().items()):
        if len(old_w.size()) <= 1:
            continue
        if 'weight' in old_k:
            diff_w = new_w - old_w
            diff[old_k] = old_w.norm() / (diff_w.norm() + EPS) * diff_w
    return diff


def official_add_into_weights(model, diff, coeff):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in diff:
                param.add_(coeff * diff[name])


def official_awp_step(model, optimizer, x, x_adv, y, name, gamma, beta=6.0):
    """One official step from x_adv: calc_awp, perturb, the loss, backward, step, restore; returns the loss."""
    proxy = copy.deepcopy(model)
    proxy.load_state_dict(model.state_dict())
    proxy.train()
    if name == 'at_awp':
        proxy_loss = -F.cross_entropy(proxy(x_adv), y)
    else:
        proxy_loss = -1.0 * (F.cross_entropy(proxy(x), y) + beta * F.kl_div(
            F.log_softmax(proxy(x_adv), dim=1), F.softmax(proxy(x), dim=1), reduction='batchmean'))
    proxy_optim = torch.optim.SGD(proxy.parameters(), lr=0.01)
    proxy_optim.zero_grad()
    proxy_loss.backward()
    proxy_optim.step()
    diff = official_diff_in_weights(model, proxy)
    official_add_into_weights(model, diff, gamma)
    model.train()
    if name == 'at_awp':
        loss = F.cross_entropy(model(x_adv), y)
    else:  # engine TRADES order 'trades': clean, adv, clean (the loss does not depend on it)
        logits = model(x)
        loss = F.cross_entropy(logits, y) + beta * F.kl_div(
            F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1), reduction='batchmean')
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    official_add_into_weights(model, diff, -gamma)
    return loss.detach()


def test_awp_steps_equal_the_official_algorithm():
    x, y, idx, _ = synthetic_batches(0, steps=3, batch=16, classes=4)
    for name, gamma in (('at_awp', 0.01), ('trades_awp', 0.005)):
        torch.manual_seed(0)
        model = build_model('small_cnn', 4, in_channels=3, width=8).double()
        reference = copy.deepcopy(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        method = make_method(name)
        epoch = method.start_epoch
        for i in range(3):
            xi = x[i].double()
            torch.manual_seed(10 + i)
            stats = train_step(model, optimizer, (xi, y[i], idx[i]), method=method, attack=ATTACK,
                               soft_labels=None, epoch=epoch, clean_acc=False)
            torch.manual_seed(10 + i)  # the same input attack, from the same weights
            x_adv = pgd(reference, xi, y[i], loss=method.attack.loss, start=method.attack.start, **ATTACK)
            loss = official_awp_step(reference, ref_optimizer, xi, x_adv, y[i], name, gamma)
            torch.testing.assert_close(stats[0, 0] / len(y[i]), loss, rtol=1e-10, atol=1e-12, msg=name)
            for (key, w), ref_w in zip(model.state_dict().items(), reference.state_dict().values()):
                torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-12, msg=f'{name} step {i} {key}')


def test_awp_waits_for_its_start_epoch_and_then_changes_the_step():
    x, y, idx, _ = synthetic_batches(0, steps=1, batch=16, classes=4)
    method = make_method('trades_awp')
    assert method.start_epoch == 10 and method.gamma == 0.005 and make_method('at_awp').gamma == 0.01
    assert method.phase(9) != method.phase(10)
    results = {}
    for name, epoch in (('trades', 9), ('trades_awp', 9), ('trades_awp', 10)):
        torch.manual_seed(0)
        model = build_model('small_cnn', 4, in_channels=3, width=8).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        torch.manual_seed(1)
        train_step(model, optimizer, (x[0].double(), y[0], idx[0]), method=make_method(name), attack=ATTACK,
                   soft_labels=None, epoch=epoch)
        results[name, epoch] = torch.cat([p.flatten() for p in model.parameters()])
    assert torch.equal(results['trades', 9], results['trades_awp', 9]), 'before its start epoch AWP is TRADES'
    assert not torch.allclose(results['trades_awp', 9], results['trades_awp', 10])
