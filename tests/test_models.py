"""Model zoo: exact parameter counts, initialisation statistics against the official recipes, shapes for
CIFAR/Fashion-MNIST inputs, channels_last, normalization."""
import math

import pytest
import torch
import torch.nn as nn

from engine.errors import ConfigError
from engine.models import ARCHS, build_model


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def small_cnn_params(classes, in_ch, w=32, hidden=200):
    # conv (no bias) + BN (weight, bias) per conv; three linears with bias.
    convs = 9 * (in_ch * w + w * w + w * 2 * w + 2 * w * 2 * w) + 2 * (w + w + 2 * w + 2 * w)
    linears = (2 * w * 16 + 1) * hidden + (hidden + 1) * hidden + (hidden + 1) * classes
    return convs + linears


@pytest.fixture(scope='module')
def full_size():
    """full_size(arch): the default-width 10-class RGB model, seed 0, built once per module (wrn34_10 has 46M
    parameters). Tests must not change its parameters or buffers."""
    cache = {}

    def get(arch):
        if arch not in cache:
            torch.manual_seed(0)
            cache[arch] = build_model(arch, 10)
        return cache[arch]
    yield get
    cache.clear()


@pytest.mark.parametrize('arch, expected', [
    ('resnet18', 11_173_962),         # official SGLS / kuangliu ResNet-18 figure
    # kuangliu's PreActResNet18 has 11,171,146; Rice et al.'s adds a final BatchNorm2d(512): +1,024.
    ('preact_resnet18', 11_172_170),
    ('wrn34_10', 46_160_474),         # TRADES WRN-34-10 without its unused sub_block1
    ('small_cnn', small_cnn_params(10, 3)),
])
def test_parameter_counts_10_classes_rgb(full_size, arch, expected):
    assert n_params(full_size(arch)) == expected


def test_resnet18_param_count_follows_classes_and_channels():
    # Linear: 512 weights + 1 bias per class; stem conv: 64 * 9 weights per input channel.
    assert n_params(build_model('resnet18', 100)) == 11_173_962 + 90 * 513
    assert n_params(build_model('resnet18', 10, in_channels=1)) == 11_173_962 - 2 * 64 * 9
    assert n_params(build_model('small_cnn', 10, in_channels=1)) == small_cnn_params(10, 1)


# --- Initialisation, per arch, as its official code leaves each layer (sources quoted in the model modules) ---
# 'he_fan_out': w ~ N(0, sqrt(2 / (k*k*out_channels))), the loop
#     n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels; m.weight.data.normal_(0, math.sqrt(2. / n))
# 'default': PyTorch's default, kaiming_uniform_(a=sqrt(5)) for weights = U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
#     fan_in = weight[0].numel(); the same bound for a Linear bias.
# 'zero': bias.data.zero_().  BatchNorm: weight 1, bias 0 everywhere (fill_(1) / zero_(), or the default).
INIT_RULES = {
    # devicerxx/SGLS models/resnet.py lines 73-79: convs He-normal fan-out, BN (1, 0), no Linear branch.
    'resnet18': dict(conv='he_fan_out', linear_weight='default', linear_bias='default'),
    # locuslab/robust_overfitting preactresnet.py (= SGLS models/pre.py): no init code, PyTorch's defaults.
    'preact_resnet18': dict(conv='default', linear_weight='default', linear_bias='default'),
    # yaodongyu/TRADES models/wideresnet.py lines 74-82 (= SGLS models/wideresnet.py lines 72-80): convs He-normal
    # fan-out, BN (1, 0), Linear bias zeroed, Linear weight left at the default.
    'wrn34_10': dict(conv='he_fan_out', linear_weight='default', linear_bias='zero'),
    # Our own test model (no official source): PyTorch's defaults; the golden runs are recorded with it.
    'small_cnn': dict(conv='default', linear_weight='default', linear_bias='default'),
}
SIGMAS = 6


def assert_sample_of(w, dist, scale, what):
    """w is a sample of N(0, scale) (dist 'normal') or U(-scale, scale) ('uniform'), within SIGMAS standard errors.

    Standard errors for n i.i.d. draws of std s and kurtosis K (3 normal, 9/5 uniform): mean s / sqrt(n); sample
    std, relatively, sqrt((K - 1) / (4n)), i.e. 1 / sqrt(2n) for a normal sample and sqrt(0.2 / n) for a uniform."""
    w = w.detach().double().flatten()
    n = w.numel()
    std, kurtosis = (scale, 3.0) if dist == 'normal' else (scale / math.sqrt(3), 1.8)
    rel_err = w.std().item() / std - 1
    assert abs(rel_err) <= SIGMAS * math.sqrt((kurtosis - 1) / (4 * n)), \
        f'{what}: sample std {w.std().item():.5g}, expected {std:.5g} ({n} weights)'
    assert abs(w.mean().item()) <= SIGMAS * std / math.sqrt(n), f'{what}: mean {w.mean().item():.3g}'
    peak = w.abs().max().item()
    if dist == 'uniform':
        assert peak <= scale, f'{what}: |w| reaches {peak:.5g} > bound {scale:.5g}'
    else:
        # A uniform sample of this std never passes sqrt(3) std; a normal one of n >= 432 draws fails to with
        # probability P(|z| < sqrt 3)^n = 0.917^n < 1e-16.
        assert peak > math.sqrt(3) * std, f'{what}: |w| <= {peak:.5g}, looks uniform, not normal'


def default_bound(m):
    return 1 / math.sqrt(m.weight[0].numel())


@pytest.mark.parametrize('arch', ARCHS)
def test_init_follows_the_official_recipe(full_size, arch):
    rules = INIT_RULES[arch]
    counts = {nn.Conv2d: 0, nn.BatchNorm2d: 0, nn.Linear: 0}
    for name, m in full_size(arch).named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.bias is None, f'{name}: conv bias (not in the official models)'
            if rules['conv'] == 'he_fan_out':
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                assert_sample_of(m.weight, 'normal', math.sqrt(2 / fan_out), name)
            else:
                assert_sample_of(m.weight, 'uniform', default_bound(m), name)
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)), name
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean)), name
            assert torch.equal(m.running_var, torch.ones_like(m.running_var)), name
        elif isinstance(m, nn.Linear):
            assert rules['linear_weight'] == 'default'
            assert_sample_of(m.weight, 'uniform', default_bound(m), name)
            if rules['linear_bias'] == 'zero':
                assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
            else:   # too few entries (often 10) for statistics: in the bound, and drawn (not constant)
                assert m.bias.abs().max() <= default_bound(m) and m.bias.std() > 0, name
        else:
            assert not list(m.parameters(recurse=False)), f'{name}: {type(m).__name__} has no init rule here'
            continue
        counts[type(m)] += 1
    assert all(counts.values()), counts


def test_he_init_differs_from_pytorch_default_where_it_should(full_size):
    """The stem conv of ResNet-18 is N(0, sqrt(2 / (9 * 64))) = 0.059 (official), not the default's
    1 / sqrt(3 * 27) = 0.111 (what this module did before following SGLS models/resnet.py)."""
    stem = full_size('resnet18').conv1.weight
    assert abs(stem.std().item() - math.sqrt(2 / (9 * 64))) < 0.006
    assert abs(full_size('preact_resnet18').conv1.weight.std().item() - 1 / math.sqrt(3 * 27)) < 0.01


TINY_WIDTH = {'resnet18': 4, 'preact_resnet18': 4, 'wrn34_10': 1, 'small_cnn': 8}


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('shape', [(3, 32, 32), (1, 28, 28)])
def test_output_shape(arch, shape):
    model = build_model(arch, 7, in_channels=shape[0], width=TINY_WIDTH[arch])
    assert model(torch.rand(2, *shape)).shape == (2, 7)


def test_default_width_full_size_forward(full_size):
    model = full_size('resnet18').eval()
    with torch.no_grad():   # eval + no_grad: the shared model's parameters and buffers stay as built
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize('arch', ARCHS)
def test_init_is_deterministic_for_a_seed(arch):
    """Initialisation happens in __init__ from the global generator: the same seed gives the same model (all
    parameters and buffers), another seed other weights."""
    def build(seed):
        torch.manual_seed(seed)
        return build_model(arch, 10, width=TINY_WIDTH[arch]).state_dict()
    first, again, other = build(0), build(0), build(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(v.is_floating_point() and not torch.equal(v, other[k]) for k, v in first.items())


@pytest.mark.parametrize('arch', ARCHS)
def test_channels_last_matches_contiguous(arch):
    torch.manual_seed(0)
    model = build_model(arch, 10, width=TINY_WIDTH[arch]).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        got = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_normalize_layer():
    mean, std = (0.5, 0.25, 0.1), (0.2, 0.3, 0.4)
    torch.manual_seed(0)
    model = build_model('small_cnn', 10, width=8, normalize=True, mean=mean, std=std).eval()
    x = torch.rand(3, 3, 32, 32)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(x), (x - m) / s)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net((x - m) / s))
    assert {'normalize.mean', 'normalize.std'} <= set(model.state_dict())
    assert n_params(model) == n_params(model.net)   # buffers, not parameters


@pytest.mark.parametrize('mean, std', [((0.5,), (0.2, 0.2, 0.2)), ((0.5, 0.5, 0.5), ()),
                                       ((0.5, 0.5, 0.5), (0.2, 0.0, 0.2))])
def test_normalize_bad_stats(mean, std):
    with pytest.raises(ConfigError):
        build_model('small_cnn', 10, normalize=True, mean=mean, std=std)


def test_unknown_arch():
    with pytest.raises(ConfigError) as err:
        build_model('resnet50', 10)
    message = str(err.value)
    assert 'resnet50' in message and all(arch in message for arch in ARCHS)


# --- Issue 14: mobilenet_v2 (RSLAD's student) and the wide ResNets wrn28_10, wrn70_16 ---
# The parametrized tests above run on every arch of ARCHS; these are the new archs' rules and small widths.
INIT_RULES.update({
    # zibojia/RSLAD cifar10_models/mobilenet_v2.py (commit c40e04f) has no init code: PyTorch's defaults.
    'mobilenet_v2': dict(conv='default', linear_weight='default', linear_bias='default'),
    # One WideResNet class (TRADES' init) for every depth and width.
    'wrn28_10': INIT_RULES['wrn34_10'],
    'wrn70_16': INIT_RULES['wrn34_10'],
})
# wrn70_16 at width 2: its 33 blocks give logits of ~1e2-1e3 at init, and at width 1 (seed 0) the elementwise
# channels_last tolerance above is exceeded by rounding alone (1.1x); at width 2 it holds with a 3x margin.
TINY_WIDTH.update({'mobilenet_v2': 8, 'wrn28_10': 1, 'wrn70_16': 2})
NEW_ARCHS = ('mobilenet_v2', 'wrn28_10', 'wrn70_16')


def assert_close_normwise(got, ref, rtol):
    """|got - ref| <= rtol * max|ref|: rounding errors scale with the logits' size, which is ~1e3 for a deep WRN at
    init, so a small logit may differ more than an elementwise tolerance allows (as tests/test_packing.py)."""
    error, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    assert error <= rtol * scale, f'max difference {error:.3g} at scale {scale:.3g}'


def wrn_params(depth, k, classes, in_ch=3):
    """TRADES WideResNet (without sub_block1) by formula: stem 3x3 conv to 16; per stage n pre-activation blocks
    (BN on the input, conv3x3, BN, conv3x3; a 1x1 projection where the channels change, in every stage's first
    block since 16 != 16k for k > 1); final BN; Linear with bias."""
    n, widths = (depth - 4) // 6, [16, 16 * k, 32 * k, 64 * k]
    total = 9 * in_ch * 16
    for cin, cout in zip(widths, widths[1:]):
        for i in range(n):
            c = cin if i == 0 else cout
            total += 2 * c + 9 * c * cout + 2 * cout + 9 * cout * cout + (c * cout if c != cout else 0)
    return total + 2 * widths[3] + (widths[3] + 1) * classes


def mobilenet_v2_params(classes, in_ch=3, stem=32):
    """RSLAD / kuangliu MobileNetV2 by formula: per conv its weights (depthwise: 9 per channel), per BN 2 per
    channel, the stride-1 shortcut projections, the 1x1 conv to 1280, Linear with bias."""
    cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    total, cin = 9 * in_ch * stem + 2 * stem, stem
    for expansion, cout, blocks, stride in cfg:
        for s in [stride] + [1] * (blocks - 1):
            planes = expansion * cin
            total += cin * planes + 2 * planes + 9 * planes + 2 * planes + planes * cout + 2 * cout
            if s == 1 and cin != cout:
                total += cin * cout + 2 * cout
            cin = cout
    return total + 320 * 1280 + 2 * 1280 + (1280 + 1) * classes


def meta_params(arch, classes, **kw):
    with torch.device('meta'):   # shapes only: no storage, no init time (wrn70_16 has 267M parameters)
        return n_params(build_model(arch, classes, **kw))


@pytest.mark.parametrize('arch, classes, expected', [
    # Counted from the official definitions (RSLAD's files at commit c40e04f, instantiated): MobileNetV2
    # 2,296,922 / 2,412,212; TRADES WideResNet minus its unused sub_block1 (38,119,866 - 1,640,672 for WRN-28-10,
    # 48,262,586 - 2,102,112 for WRN-34-10, 279,234,554 - 12,438,048 for WRN-70-16).
    ('mobilenet_v2', 10, 2_296_922),
    ('mobilenet_v2', 100, 2_412_212),
    ('wrn28_10', 10, 36_479_194),
    ('wrn34_10', 10, 46_160_474),
    ('wrn70_16', 10, 266_796_506),
    ('wrn70_16', 100, 266_888_756),
])
def test_new_arch_parameter_counts(arch, classes, expected):
    formula = (mobilenet_v2_params(classes) if arch == 'mobilenet_v2' else
               wrn_params(*{'wrn28_10': (28, 10), 'wrn34_10': (34, 10), 'wrn70_16': (70, 16)}[arch], classes))
    assert formula == expected
    assert meta_params(arch, classes) == expected
    if arch == 'mobilenet_v2':
        assert n_params(build_model(arch, classes)) == expected


def test_widths_of_the_new_archs():
    # wrn: width = widen factor (WRN-28-4, WRN-70-2); mobilenet_v2: width = stem channels only.
    assert meta_params('wrn28_10', 10, width=4) == wrn_params(28, 4, 10)
    assert meta_params('wrn70_16', 100, width=2, in_channels=1) == wrn_params(70, 2, 100, in_ch=1)
    assert n_params(build_model('mobilenet_v2', 10, width=16, in_channels=1)) == mobilenet_v2_params(10, 1, 16)


def test_wide_resnet_builder_and_bad_depth():
    from engine.models.wideresnet import WideResNet, wide_resnet, wrn34_10
    model = wrn34_10(10, 3, 1)
    assert isinstance(model, WideResNet) and len(model.block1) == 5 and wrn34_10.__name__ == 'wrn34_10'
    assert len(wide_resnet(16, 4)(10).block2) == 2
    with pytest.raises(ValueError, match='6n\\+4'):
        wide_resnet(30, 10)


@pytest.mark.parametrize('arch', NEW_ARCHS)
@pytest.mark.parametrize('shape', [(3, 32, 32), (3, 28, 28), (1, 28, 28)])
def test_new_arch_output_shapes(arch, shape):
    torch.manual_seed(0)
    model = build_model(arch, 7, in_channels=shape[0], width=TINY_WIDTH[arch] if arch != 'mobilenet_v2' else 0)
    assert model(torch.rand(2, *shape)).shape == (2, 7)


def test_mobilenet_v2_pool_is_the_sources_on_32x32_and_ends_at_4x4_on_28x28():
    """The source ends with relu(bn2(conv2(out))), avg_pool2d(out, 4), view, linear: its last map is 4x4 on
    32x32 inputs, and the adaptive pool computes the same there; 28x28 inputs end at 4x4 too."""
    torch.manual_seed(0)
    model = build_model('mobilenet_v2', 10).eval()
    for size in (32, 28):
        seen = {}
        hook = model.bn2.register_forward_hook(lambda m, i, out: seen.update(out=out))
        with torch.no_grad():
            logits = model(torch.rand(2, 3, size, size))
            hook.remove()
            assert seen['out'].shape == (2, 1280, 4, 4)
            source = model.linear(torch.nn.functional.avg_pool2d(seen['out'].relu(), 4).view(2, -1))
        torch.testing.assert_close(logits, source, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('arch', NEW_ARCHS)
def test_new_archs_pack(arch):
    from engine.packing import pack_inputs, pack_models
    wrapper = dict(normalize=True, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(build_model(arch, 4, width=TINY_WIDTH[arch], **wrapper))
    packed = pack_models(models)
    xs = torch.rand(2, 4, 3, 16, 16)
    for mode in (True, False):   # batch statistics, then running statistics
        for m in (packed, *models):
            m.train(mode)
        logits = packed(pack_inputs(xs))
        for s, model in enumerate(models):
            assert_close_normwise(logits[:, s], model(xs[s]), rtol=1e-4)   # float32, grouped kernels


# conv -> BN pairs: mobilenet_v2: stem, 3 per block x 17 blocks, the 4 stride-1 projection shortcuts (where the
# channels change at stride 1: 32->16, 16->24, 64->96, 160->320) and conv2 -> bn2: every conv. Wide ResNets
# (pre-activation): conv1 -> bn2 in each of their 3n blocks, plus the stem conv -> block1.0.bn1 when the widen
# factor is > 1 (then block1.0 projects its pre-activated input, so bn1 is the stem's only reader; at width 1
# the identity shortcut reads the stem output too, which fold_bn leaves alone).
FOLD_PAIRS = [('mobilenet_v2', 8, 1 + 3 * 17 + 4 + 1), ('wrn28_10', 1, 12), ('wrn34_10', 1, 15),
              ('wrn34_10', 2, 16), ('wrn70_16', 2, 34)]


@pytest.mark.parametrize('arch, width, pairs', FOLD_PAIRS)
def test_fold_bn_folds_the_expected_pairs(arch, width, pairs):
    from engine.fold_bn import fold_bn
    torch.manual_seed(0)
    model = build_model(arch, 10, width=width).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        model.train()
        model(torch.rand(16, 3, 32, 32, dtype=torch.float64))
    model.eval()
    view, folded = fold_bn(model)
    assert folded == pairs
    if arch == 'mobilenet_v2':
        assert folded == sum(isinstance(m, nn.Conv2d) for m in model.modules())   # every conv has its BN
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_close_normwise(view(x), model(x), rtol=1e-12)
