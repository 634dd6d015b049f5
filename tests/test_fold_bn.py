"""engine.fold_bn: eval-mode BatchNorm folded into the conv before it computes what conv + BN compute (float64,
every architecture, packed seeds), follows the weights as they train, leaves train mode alone, and really removes
the BN kernels from the compiled attack and clean-accuracy graphs (never from the training graph)."""
import torch
import torch.nn as nn
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from engine.fast import FastStep
from engine.fold_bn import FoldedConvBN, fold_bn
from engine.methods import make_method
from engine.models import build_model
from engine.packing import pack_models
from engine.soft_labels import SoftLabels
from tests.synthetic import synthetic_batches

# conv -> BN pairs, counted from each architecture's forward: ResNet-18 (post-activation) has the stem, 2 per
# block x 8 blocks and 3 projection shortcuts; pre-activation ResNet-18 only bn2 after conv1 in each of its 8
# blocks; WRN-34 the same in each of its 15 blocks (at width 1: the stem's output also feeds the first block's
# identity shortcut; from widen factor 2 on that block has a conv shortcut and its bn1 folds too); small_cnn its 4
# conv-BN-ReLU groups.
PAIRS = {'resnet18': 1 + 16 + 3, 'preact_resnet18': 8, 'wrn34_10': 15, 'small_cnn': 4}
WIDTH = {'resnet18': 4, 'preact_resnet18': 4, 'wrn34_10': 1, 'small_cnn': 8}


def trained_stats_model(arch, seed=0, normalize=True):
    """A float64 model whose BN running statistics and affine parameters are not the trivial 0/1 of init."""
    torch.manual_seed(seed)
    model = build_model(arch, 10, in_channels=3, width=WIDTH[arch], normalize=normalize, mean=(0.5, 0.4, 0.3),
                        std=(0.2, 0.25, 0.3)).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.train()
    for _ in range(3):
        model(torch.rand(16, 3, 32, 32, dtype=torch.float64))
    return model


def test_folded_forward_equals_conv_then_bn_for_every_arch_and_packed_seeds():
    x = torch.rand(8, 3, 32, 32, dtype=torch.float64)
    for arch, pairs in PAIRS.items():
        model = trained_stats_model(arch).eval()
        view, folded = fold_bn(model)
        assert folded == pairs, (arch, folded)
        assert {id(p) for p in view.parameters()} == {id(p) for p in model.parameters()}, 'shares the weights'
        torch.testing.assert_close(view(x), model(x), rtol=1e-12, atol=1e-12, msg=arch)
    packed = pack_models([trained_stats_model('resnet18', seed) for seed in (0, 1)]).eval()
    view, folded = fold_bn(packed)
    assert folded == PAIRS['resnet18']
    xs = torch.rand(8, 6, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(view(xs), packed(xs), rtol=1e-12, atol=1e-12)


def test_the_fold_follows_the_weights_and_train_mode_is_left_alone():
    model = trained_stats_model('resnet18')
    view, _ = fold_bn(model)
    x = torch.rand(8, 3, 32, 32, dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(x).sum().backward()  # moves the running statistics too
    optimizer.step()
    model.eval()
    torch.testing.assert_close(view(x), model(x), rtol=1e-12, atol=1e-12)  # refolded from the new weights
    model.train()  # train mode: batch statistics, running statistics updated as by the model itself
    reference = trained_stats_model('resnet18').train()
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(view(x), reference(x), rtol=0, atol=0)
    torch.testing.assert_close(model.state_dict(), reference.state_dict(), rtol=0, atol=0)


def test_only_a_bn_directly_after_a_conv_is_folded():
    class Shared(nn.Module):  # the conv's output is read twice: folding would change the second reader
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.bn_after_relu = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            out = self.conv(x)
            return self.bn(out) + out + self.bn_after_relu(torch.relu(out))
    model = Shared()
    assert fold_bn(model) == (model, 0)
    view, folded = fold_bn(build_model('small_cnn', 4, 3, width=8, normalize=True, mean=(0.5,) * 3, std=(0.5,) * 3))
    assert folded == sum(isinstance(m, FoldedConvBN) for m in view.modules()) == 4
    assert 'normalize' in dict(view.named_modules()), 'the input normalization stays a layer of its own'


def test_fast_step_with_fold_bn_has_no_batch_norm_in_its_eval_graphs():
    """Recording backend: without fold_bn the attack's and clean-accuracy forwards run eval-mode batch norm
    (_native_batch_norm_legit_no_training); with it none does, and the training forward keeps its batch norm."""
    def norm_ops(fold):
        forwards = []

        def forward_compiler(gm, _):
            forwards.append({str(n.target) for n in gm.graph.nodes if 'batch_norm' in str(n.target)})
            return make_boxed_func(gm.forward)
        torch._dynamo.reset()
        x, y, idx, labels = synthetic_batches(0, steps=1, batch=16, classes=4)
        torch.manual_seed(0)
        model = build_model('small_cnn', 4, in_channels=3, width=8)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        fast = FastStep(model, torch.device('cpu'), precision='fp32', fold_bn=fold, backend=aot_autograd(
            fw_compiler=forward_compiler, bw_compiler=lambda gm, _: make_boxed_func(gm.forward)))
        fast(optimizer, (x[0], y[0], idx[0]), method=make_method('at'), soft_labels=SoftLabels(labels, 4), epoch=1,
             attack=dict(eps=8 / 255, step_size=2 / 255, steps=2, bn_mode='eval'))
        return forwards
    eval_op, train_op = ('aten._native_batch_norm_legit_no_training.default',
                         'aten._native_batch_norm_legit_functional.default')
    plain, folded = norm_ops(False), norm_ops(True)
    assert any(eval_op in ops for ops in plain) and any(train_op in ops for ops in plain), plain
    assert not any(eval_op in ops for ops in folded), folded
    assert sum(train_op in ops for ops in folded) == 1, folded  # the training forward, unfolded
