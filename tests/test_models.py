"""Model zoo: exact parameter counts, shapes for CIFAR/Fashion-MNIST inputs, channels_last, normalization."""
import pytest
import torch

from engine.errors import ConfigError
from engine.models import ARCHS, build_model


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def small_cnn_params(classes, in_ch, w=32, hidden=200):
    # conv (no bias) + BN (weight, bias) per conv; three linears with bias.
    convs = 9 * (in_ch * w + w * w + w * 2 * w + 2 * w * 2 * w) + 2 * (w + w + 2 * w + 2 * w)
    linears = (2 * w * 16 + 1) * hidden + (hidden + 1) * hidden + (hidden + 1) * classes
    return convs + linears


@pytest.mark.parametrize('arch, expected', [
    ('resnet18', 11_173_962),         # official SGLS / kuangliu ResNet-18 figure
    # kuangliu's PreActResNet18 has 11,171,146; Rice et al.'s adds a final BatchNorm2d(512): +1,024.
    ('preact_resnet18', 11_172_170),
    ('wrn34_10', 46_160_474),         # TRADES WRN-34-10 without its unused sub_block1
    ('small_cnn', small_cnn_params(10, 3)),
])
def test_parameter_counts_10_classes_rgb(arch, expected):
    assert n_params(build_model(arch, 10)) == expected


def test_resnet18_param_count_follows_classes_and_channels():
    # Linear: 512 weights + 1 bias per class; stem conv: 64 * 9 weights per input channel.
    assert n_params(build_model('resnet18', 100)) == 11_173_962 + 90 * 513
    assert n_params(build_model('resnet18', 10, in_channels=1)) == 11_173_962 - 2 * 64 * 9
    assert n_params(build_model('small_cnn', 10, in_channels=1)) == small_cnn_params(10, 1)


TINY_WIDTH = {'resnet18': 4, 'preact_resnet18': 4, 'wrn34_10': 1, 'small_cnn': 8}


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('shape', [(3, 32, 32), (1, 28, 28)])
def test_output_shape(arch, shape):
    model = build_model(arch, 7, in_channels=shape[0], width=TINY_WIDTH[arch])
    assert model(torch.rand(2, *shape)).shape == (2, 7)


def test_default_width_full_size_forward():
    torch.manual_seed(0)
    model = build_model('resnet18', 10).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


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
