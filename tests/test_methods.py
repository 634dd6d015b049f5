"""Losses and the soft-label update against the formulas, written out here on fixed tensors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.methods import LossInputs, make_method, corrupt_labels
from engine.soft_labels import SoftLabels
from engine.train.build import lr_at
from engine import config


def softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def log_softmax(z):
    return np.log(softmax(z))


class Linear(torch.nn.Module):
    """logits = x.flatten(1) @ W: a model whose outputs the test can compute by hand."""

    def __init__(self, W):
        super().__init__()
        self.W = torch.nn.Parameter(torch.tensor(W, dtype=torch.float32))

    def forward(self, x):
        return x.flatten(1) @ self.W


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(6, 4))
    x = rng.uniform(size=(3, 6))
    x_adv = np.clip(x + rng.uniform(-0.1, 0.1, size=x.shape), 0, 1)
    y = np.array([2, 0, 3])
    idx = np.array([4, 1, 6])  # beton indices, not batch positions
    return W, x, x_adv, y, idx


def run_loss(method, model, x, x_adv, y, idx, soft_labels, epoch):
    return method.loss(model, LossInputs(x, y, idx, epoch, x_adv, soft_labels))


def as_t(*arrays):
    return [torch.tensor(a, dtype=torch.float32 if a.dtype.kind == 'f' else torch.int64) for a in arrays]


def test_soft_label_update_touches_only_its_rows():
    sl = SoftLabels(torch.tensor([0, 2, 1, 0, 1]), 3)
    pred = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    rows = sl.update(torch.tensor([3, 1]), pred, 0.9)
    expected = np.eye(3)[[0, 2, 1, 0, 1]].astype(np.float32)
    expected[3] = 0.9 * np.array([1, 0, 0]) + 0.1 * np.array([0.2, 0.5, 0.3])
    expected[1] = 0.9 * np.array([0, 0, 1]) + 0.1 * np.array([0.1, 0.1, 0.8])
    np.testing.assert_allclose(sl.table.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(rows.numpy(), expected[[3, 1]], rtol=1e-6)


@pytest.mark.parametrize('r,T', [(1.0, 1.0), (0.7, 2.0)])
def test_sgls_loss_and_update_equal_formula(batch, r, T):
    W, x, x_adv, y, idx = batch
    labels = np.array([0, 0, 1, 2, 2, 3, 3, 1])
    labels[idx] = y
    m = make_method('sgls', sgls_alpha=0.9, sgls_lam=0.2, sgls_start_epoch=5, sgls_r=r, sgls_temperature=T)
    model = Linear(W)
    sl = SoftLabels(torch.tensor(labels), 4)
    sl.table[idx[0]] = torch.tensor([0.1, 0.2, 0.6, 0.1])  # a row that is already soft
    t_before = sl.table.numpy().copy()
    xt, xat, yt, it = as_t(x, x_adv, y, idx)

    # Before start_epoch: plain cross-entropy on the adversarial logits, table untouched.
    loss, logits = run_loss(m, model, xt, xat, yt, it, sl, epoch=4)
    z_adv = x_adv @ W
    np.testing.assert_allclose(loss.item(), -np.mean(log_softmax(z_adv)[np.arange(3), y]), rtol=1e-5)
    np.testing.assert_array_equal(sl.table.numpy(), t_before)

    # From start_epoch on: t[idx] = a t[idx] + (1-a)(lam p(x) + (1-lam) p(x_adv)); loss vs r t + (1-r) onehot.
    loss, logits = run_loss(m, model, xt, xat, yt, it, sl, epoch=5)
    mix = 0.2 * softmax(x @ W / T) + 0.8 * softmax(z_adv / T)
    t_new = 0.9 * t_before[idx] + 0.1 * mix
    target = r * t_new + (1 - r) * np.eye(4)[y]
    expected = np.mean(np.sum(-log_softmax(z_adv) * target, axis=1))
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-5)
    expected_table = t_before.copy()
    expected_table[idx] = t_new
    np.testing.assert_allclose(sl.table.numpy(), expected_table, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(logits.detach().numpy(), z_adv, rtol=1e-5)

    # The target is a constant: the gradient is that of soft CE on f(x_adv) alone.
    loss.backward()
    W_t = torch.tensor(W, dtype=torch.float32, requires_grad=True)
    ref = torch.sum(-F.log_softmax(xat @ W_t, 1) * torch.tensor(target, dtype=torch.float32), 1).mean()
    ref.backward()
    np.testing.assert_allclose(model.W.grad.numpy(), W_t.grad.numpy(), rtol=1e-4, atol=1e-6)


def kl(p, q):
    return np.sum(p * (np.log(p) - np.log(q)), axis=1)


def test_trades_loss_equals_formula(batch):
    W, x, x_adv, y, idx = batch
    m = make_method('trades', beta=6.0)
    loss, _ = run_loss(m, Linear(W), *as_t(x, x_adv, y, idx), None, epoch=1)
    z, z_adv = x @ W, x_adv @ W
    expected = -np.mean(log_softmax(z)[np.arange(3), y]) + 6.0 * np.mean(kl(softmax(z), softmax(z_adv)))
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-5)


def test_sgls_trades_loss_equals_formula(batch):
    W, x, x_adv, y, idx = batch
    labels = np.zeros(8, dtype=np.int64)
    labels[idx] = y
    m = make_method('sgls_trades', beta=3.0, sgls_start_epoch=2)
    sl = SoftLabels(torch.tensor(labels), 4)
    loss, _ = run_loss(m, Linear(W), *as_t(x, x_adv, y, idx), sl, epoch=1)
    z, z_adv = x @ W, x_adv @ W
    plain = -np.mean(log_softmax(z)[np.arange(3), y]) + 3.0 * np.mean(kl(softmax(z), softmax(z_adv)))
    np.testing.assert_allclose(loss.item(), plain, rtol=1e-5)
    loss, _ = run_loss(m, Linear(W), *as_t(x, x_adv, y, idx), sl, epoch=2)
    t = 0.9 * np.eye(4)[y] + 0.1 * (0.2 * softmax(z) + 0.8 * softmax(z_adv))
    expected = np.mean(np.sum(-log_softmax(z) * t, 1)) + 3.0 * np.mean(kl(softmax(z), softmax(z_adv)))
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-5)
    np.testing.assert_allclose(sl.table.numpy()[idx], t, rtol=1e-5)


# The train-mode forwards of one step, as the official code runs them (written out from the sources named in
# engine/methods.py TRADES_ORDERS): yaodongyu/TRADES trades_loss; the SGLS authors' TRADES and TRADES_SAT classes.
OFFICIAL_FORWARDS = {('trades', 'trades'): 'clean adv clean', ('trades', 'sgls_code'): 'clean adv',
                     ('sgls_trades', 'trades'): 'clean adv clean', ('sgls_trades', 'sgls_code'): 'clean adv adv'}


@pytest.mark.parametrize('method,order', list(OFFICIAL_FORWARDS))
@pytest.mark.parametrize('start', ['normal', 'uniform'])
def test_trades_batchnorm_statistics_follow_the_official_forwards(method, order, start):
    """One whole train_step against the official step written out (attack in eval mode from the same start,
    then the train-mode forwards): BatchNorm running statistics equal in float64, and for TRADES in its
    official order the updated weights too (the loss as trades_loss computes it)."""
    import copy
    from engine.step import make_sgd, train_step
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 4)).double()
    official = copy.deepcopy(model)
    x, y, idx = torch.rand(16, 12, dtype=torch.float64), torch.randint(0, 4, (16,)), torch.arange(16)
    eps, step, steps, beta = 8 / 255, 2 / 255, 3, 6.0
    m = make_method(method, trades_order=order, trades_start=start, beta=beta,
                    **({'sgls_start_epoch': 1} if method == 'sgls_trades' else {}))
    soft = SoftLabels(y, 4, torch.float64) if m.soft_labels else None
    torch.manual_seed(1)
    train_step(model, make_sgd(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), (x, y, idx), method=m,
               attack=dict(eps=eps, step_size=step, steps=steps, bn_mode='eval'), soft_labels=soft, epoch=1)

    torch.manual_seed(1)
    kl_sum = torch.nn.KLDivLoss(reduction='sum')
    official.eval()
    if start == 'normal':
        x_adv = x.detach() + 0.001 * torch.randn(x.shape, dtype=x.dtype)
    else:
        x_adv = (x.detach() + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_()
        loss_kl = kl_sum(F.log_softmax(official(x_adv), dim=1), F.softmax(official(x), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = torch.min(torch.max(x_adv.detach() + step * torch.sign(grad), x - eps), x + eps).clamp(0, 1)
    official.train()
    outputs = [official({'clean': x, 'adv': x_adv}[which]) for which in OFFICIAL_FORWARDS[method, order].split()]
    bn, official_bn = model[1], official[1]
    assert bn.num_batches_tracked.item() == official_bn.num_batches_tracked.item() == len(outputs)
    torch.testing.assert_close(bn.running_mean, official_bn.running_mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bn.running_var, official_bn.running_var, rtol=1e-12, atol=1e-14)
    if (method, order) == ('trades', 'trades'):  # trades_loss: CE on the first clean forward, KL to the third
        logits, logits_adv, logits_again = outputs
        loss = F.cross_entropy(logits, y) + beta / len(x) * kl_sum(F.log_softmax(logits_adv, dim=1),
                                                                 F.softmax(logits_again, dim=1))
        sgd = make_sgd(official.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        sgd.zero_grad()
        loss.backward()
        sgd.step()
        for a, b in zip(model.parameters(), official.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_sgls_clean_forward_runs_in_train_mode_without_graph():
    """As the official code: the clean pass updates BatchNorm statistics but builds no graph."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4))
    x, x_adv = torch.rand(8, 6), torch.rand(8, 6)
    y, idx = torch.randint(0, 4, (8,)), torch.arange(8)
    sl = SoftLabels(y, 4)
    model.train()
    run_loss(make_method('sgls', sgls_start_epoch=1), model, x, x_adv, y, idx, sl, epoch=1)
    bn = model[2]
    assert bn.num_batches_tracked.item() == 2  # adversarial pass + clean pass


def test_label_noise_by_index():
    labels = torch.arange(10).repeat(1000)
    sym = corrupt_labels(labels, 10, 'sym', 0.4, seed=1)
    changed = (sym != labels).float().mean().item()
    assert abs(changed - 0.4) < 0.02
    assert torch.equal(sym, corrupt_labels(labels, 10, 'sym', 0.4, seed=1))
    assert not torch.equal(sym, corrupt_labels(labels, 10, 'sym', 0.4, seed=2))
    asym = corrupt_labels(labels, 10, 'asym', 0.4, seed=1)
    moved = asym != labels
    pairs = set(zip(labels[moved].tolist(), asym[moved].tolist()))
    assert pairs == {(9, 1), (2, 0), (4, 7), (3, 5), (5, 3)}


def test_learning_rate_schedules():
    cfg = config.load()
    assert [lr_at(cfg, e) for e in (1, 99, 100, 149, 150, 200)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    cos = config.load(cli_args=['--schedule.kind=cosine', '--training.epochs=10'])
    assert lr_at(cos, 1) == pytest.approx(0.1)
    assert lr_at(cos, 6) == pytest.approx(0.05)


def test_each_method_declares_what_it_needs():
    from engine.methods import CE_ATTACK, KL_ATTACK, METHODS, Objective
    needs = {name: (make_method(name).attack, make_method(name).soft_labels) for name in METHODS}
    assert needs == {'ce': (None, False), 'at': (CE_ATTACK, False), 'trades': (KL_ATTACK, False),
                     'sgls': (CE_ATTACK, True), 'sgls_trades': (KL_ATTACK, True),
                     'at_ls': (CE_ATTACK, False), 'trades_sat': (KL_ATTACK, True), 'te': (CE_ATTACK, True),
                     'mart': (Objective('ce', 'normal'), False), 'at_awp': (CE_ATTACK, False),
                     'trades_awp': (KL_ATTACK, False), 'rslad': (KL_ATTACK, False), 'ard': (CE_ATTACK, False)}
    assert (CE_ATTACK.loss, CE_ATTACK.start, KL_ATTACK.loss, KL_ATTACK.start) == ('ce', 'uniform', 'kl', 'normal')
    sgls = make_method('sgls', sgls_start_epoch=3)
    assert [sgls.phase(e) for e in (1, 2, 3, 4)] == [False, False, True, True]
    assert make_method('at').phase(1) == make_method('at').phase(100)  # one phase: one compiled / captured step
    with pytest.raises(config.ConfigError, match="method 'at' has no parameter beta"):
        make_method('at', beta=1.0)
    # the config's method section reads exactly each method's parameters
    cfg = config.load(cli_args=['--method.name=sgls_trades', '--method.beta=2', '--method.sgls_lam=0.5'])
    from engine.methods import method_from_config
    m = method_from_config(cfg.method)
    assert (m.name, m.beta, m.sgls_lam, m.sgls_alpha) == ('sgls_trades', 2.0, 0.5, 0.9)


def _method_name_tests(source):
    """Where `source` decides something by a method's name: a comparison of a `...method...name` expression with
    a string, its startswith / endswith, or a string constant naming an SGLS / TRADES method ('at' and 'ce' are
    also other things' names: the default method and baseline, the cross-entropy attack objective)."""
    import ast

    def is_method_name(node):
        return isinstance(node, ast.Attribute) and node.attr == 'name' and 'method' in ast.unparse(node.value)

    def is_string(node):
        return (isinstance(node, ast.Constant) and isinstance(node.value, str)) or (
            isinstance(node, (ast.Tuple, ast.List, ast.Set)) and all(is_string(e) for e in node.elts))

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(map(is_method_name, sides)) and any(map(is_string, sides)):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ('startswith', 'endswith') and is_method_name(node.func.value):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Constant) and node.value in ('sgls', 'sgls_trades', 'trades'):
            found.append((node.lineno, repr(node.value)))
    return found


def test_no_method_is_recognised_by_its_name_outside_methods_py():
    """What a method does is a property declared next to its loss: no engine module outside engine/methods/ tests
    a method's name."""
    import glob
    import os
    # the check itself sees what it must
    assert len(_method_name_tests("if method.name != 'ce': pass\nx = cfg.method.name.startswith('s')\n"
                                  "y = 'trades' in z\nif run.method.name in ('at', 'x'): pass")) == 4
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'engine')
    found = []
    for path in glob.glob(os.path.join(root, '**', '*.py'), recursive=True):
        if os.path.relpath(path, root).split(os.sep)[0] not in ('methods.py', 'methods'):  # the package itself
            with open(path) as f:
                found += [f'{os.path.relpath(path, root)}:{line}: {text}'
                          for line, text in _method_name_tests(f.read())]
    assert not found, found
