"""engine.teacher: each file format loads into the network that was saved (the same logits, bitwise), the teacher
stays frozen (no gradients, eval mode whatever calls train(), unchanged by a student's training step), loading
draws no random numbers, and every bad file stops with a UserError naming it."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from engine import checkpoint, config
from engine.checkpoint import Progress
from engine.errors import UserError
from engine.models import build_model
from engine.teacher import Teacher, load_teacher, read_safetensors

CLASSES = 5
STATS = dict(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def trained_like(arch='small_cnn', width=8, in_channels=3, classes=CLASSES, seed=0, **kw):
    """A model whose BN statistics and affine parameters are not the 0/1 of init (so a wrong BN mode or a skipped
    buffer shows in the logits), in eval mode."""
    torch.manual_seed(seed)
    model = build_model(arch, classes, in_channels=in_channels, width=width, **kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        model.train()
        for _ in range(3):
            model(torch.rand(16, in_channels, 32, 32))
    return model.eval()


def save_engine_checkpoint(path, model, **model_params):
    """As a run writes best.pt: its resolved config as params, the model part, progress."""
    params = config.flat(config.load(overrides={f'model.{k}': v for k, v in model_params.items()}))
    checkpoint.save(path, {'model': model, 'progress': Progress()}, params)


def assert_same_logits(teacher, model, in_channels=3):
    x = torch.rand(8, in_channels, 32, 32)
    with torch.no_grad():
        expected = model(x)
    got = teacher(x)
    assert isinstance(teacher, Teacher) and got.dtype == expected.dtype
    assert torch.equal(got, expected)


# --- The three formats ---

@pytest.mark.parametrize('normalize', [False, True])
def test_engine_checkpoint_loads_with_its_saved_arch_width_and_normalisation(tmp_path, normalize):
    model = trained_like('resnet18', width=4, normalize=normalize, **STATS)
    path = tmp_path / 'best.pt'
    save_engine_checkpoint(path, model, arch='resnet18', width=4, normalize=normalize)
    teacher = load_teacher(path, num_classes=CLASSES, in_channels=3)
    assert teacher.arch == 'resnet18' and teacher.path == str(path)
    assert_same_logits(teacher, model)
    # Naming the arch (and width) the checkpoint has is allowed.
    assert_same_logits(load_teacher(path, arch='resnet18', width=4, num_classes=CLASSES, in_channels=3), model)


@pytest.mark.parametrize('arch, width', [('small_cnn', 8), ('mobilenet_v2', 8), ('wrn34_10', 1)])
def test_plain_state_dict_loads_with_its_arch(tmp_path, arch, width):
    model = trained_like(arch, width=width)
    torch.save(model.state_dict(), tmp_path / 'teacher.pt')
    assert_same_logits(load_teacher(tmp_path / 'teacher.pt', arch=arch, width=width, num_classes=CLASSES,
                                    in_channels=3), model)


def test_plain_state_dict_with_normalize_keys_and_with_given_statistics(tmp_path):
    wrapped = trained_like(normalize=True, **STATS)
    torch.save(wrapped.state_dict(), tmp_path / 'wrapped.pt')   # holds normalize.mean / std
    assert_same_logits(load_teacher(tmp_path / 'wrapped.pt', arch='small_cnn', width=8, num_classes=CLASSES,
                                    in_channels=3), wrapped)
    torch.save(wrapped.net.state_dict(), tmp_path / 'net.pt')   # a net trained on normalised inputs
    assert_same_logits(load_teacher(tmp_path / 'net.pt', arch='small_cnn', width=8, num_classes=CLASSES,
                                    in_channels=3, **STATS), wrapped)
    with pytest.raises(UserError, match='its own input normalisation'):
        load_teacher(tmp_path / 'wrapped.pt', arch='small_cnn', width=8, num_classes=CLASSES, in_channels=3,
                     **STATS)


def test_trades_layout_state_dict_from_data_parallel_loads_as_the_wrn(tmp_path):
    """The TRADES checkpoint layout (RSLAD's CIFAR-10 teacher): saved from nn.DataParallel ('module.'), stages
    as NetworkBlock ('block1.layer.0.'), 'convShortcut', and the unused sub_block1."""
    model = trained_like('wrn34_10', width=1)
    trades = {}
    for key, value in model.state_dict().items():
        key = key.replace('conv_shortcut', 'convShortcut')
        if key.startswith('block'):
            stage, rest = key.split('.', 1)
            key = f'{stage}.layer.{rest}'
            if stage == 'block1':
                trades[f'module.sub_block1.layer.{rest}'] = value.clone() + 1   # never used by forward()
        trades[f'module.{key}'] = value
    torch.save(trades, tmp_path / 'model-wideres-epoch76.pt')
    assert_same_logits(load_teacher(tmp_path / 'model-wideres-epoch76.pt', arch='wrn34_10', width=1,
                                    num_classes=CLASSES, in_channels=3), model)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_safetensors_loads_with_its_arch(tmp_path, dtype):
    model = trained_like('small_cnn', width=8, in_channels=1)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / 'teacher.safetensors'), metadata={'format': 'pt'})
    assert all(torch.equal(read_safetensors(tmp_path / 'teacher.safetensors')[k], v) for k, v in state.items())
    teacher = load_teacher(tmp_path / 'teacher.safetensors', arch='small_cnn', width=8, num_classes=CLASSES,
                           in_channels=1)
    if dtype == torch.float32:
        assert_same_logits(teacher, model, in_channels=1)
    else:   # the file's float16 weights, in the float32 teacher
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        assert_same_logits(teacher, model, in_channels=1)


def test_device_dtype_and_no_random_draws(tmp_path):
    model = trained_like()
    torch.save(model.state_dict(), tmp_path / 'teacher.pt')
    torch.manual_seed(123)
    before = torch.get_rng_state()
    teacher = load_teacher(tmp_path / 'teacher.pt', arch='small_cnn', width=8, num_classes=CLASSES,
                           in_channels=3, device=torch.device('cpu'), dtype=torch.float64)
    assert torch.equal(torch.get_rng_state(), before), 'loading a teacher must not move the run\'s random stream'
    assert all(t.dtype == torch.float64 and t.device.type == 'cpu'
               for t in [*teacher.parameters(), *(b for b in teacher.buffers() if b.is_floating_point())])
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(teacher(x), model.double()(x), rtol=1e-12, atol=1e-12)


# --- Frozen ---

def test_teacher_is_frozen_and_stays_in_eval_mode(tmp_path):
    model = trained_like()
    torch.save(model.state_dict(), tmp_path / 'teacher.pt')
    teacher = load_teacher(tmp_path / 'teacher.pt', arch='small_cnn', width=8, num_classes=CLASSES, in_channels=3)
    assert not any(p.requires_grad for p in teacher.parameters())
    for switch in (lambda: teacher.train(), lambda: teacher.train(True), lambda: nn.ModuleList([teacher]).train()):
        switch()
        assert not teacher.training and not any(m.training for m in teacher.modules())
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    out = teacher(x)
    assert not out.requires_grad and out.grad_fn is None, 'teacher outputs carry no graph'
    # Eval-mode BN: an image's logits do not depend on the rest of its batch.
    torch.testing.assert_close(teacher(x[:1]), out[:1], rtol=1e-5, atol=1e-6)


def test_a_student_training_step_leaves_the_teacher_unchanged(tmp_path):
    teacher_model = trained_like(seed=1)
    torch.save(teacher_model.state_dict(), tmp_path / 'teacher.pt')
    teacher = load_teacher(tmp_path / 'teacher.pt', arch='small_cnn', width=8, num_classes=CLASSES, in_channels=3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(2)
    student = build_model('small_cnn', CLASSES, width=8)
    both = nn.ModuleDict({'student': student, 'teacher': teacher})   # a wrapper that trains "everything"
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(16, 3, 32, 32)
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)

    def kl(inputs):   # KL(T(x) || S(inputs)), batch mean
        return F.kl_div(F.log_softmax(student(inputs), dim=1), F.softmax(teacher(x), dim=1), reduction='batchmean')
    both.train()
    with torch.no_grad():
        kl_before = kl(x).item()
    for _ in range(5):
        both.train()
        loss = kl(x_adv) + kl(x)   # RSLAD-style: KL(T(x) || S(x')) + KL(T(x) || S(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert kl(x).item() < kl_before, 'the student moved toward the teacher'
    assert x_adv.grad is not None, 'the student still gets input gradients'
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items()), 'teacher weights or BN moved'
    assert not teacher.training and student.training
    with torch.no_grad():
        assert torch.equal(teacher(x), teacher_model(x))


def test_reference_part_refuses_another_teacher_on_resume(tmp_path):
    model = trained_like()
    torch.save(model.state_dict(), tmp_path / 'a.pt')
    torch.save(trained_like(seed=5).state_dict(), tmp_path / 'b.pt')
    kw = dict(arch='small_cnn', width=8, num_classes=CLASSES, in_channels=3)
    saved = load_teacher(tmp_path / 'a.pt', **kw).reference().state_dict()
    load_teacher(tmp_path / 'a.pt', **kw).reference().load_state_dict(saved)
    with pytest.raises(UserError, match='not the one the run was trained with'):
        load_teacher(tmp_path / 'b.pt', **kw).reference().load_state_dict(saved)


# --- Messages: each names the file ---

def test_classes_that_differ_from_the_data(tmp_path):
    path = tmp_path / 'best.pt'
    save_engine_checkpoint(path, trained_like(classes=10), arch='small_cnn', width=8)
    with pytest.raises(UserError) as err:
        load_teacher(path, num_classes=100, in_channels=3)
    assert str(path) in str(err.value) and '10 classes' in str(err.value) and 'the data 100' in str(err.value)


def test_input_channels_that_differ_from_the_data(tmp_path):
    torch.save(trained_like(in_channels=1).state_dict(), tmp_path / 'gray.pt')
    with pytest.raises(UserError) as err:
        load_teacher(tmp_path / 'gray.pt', arch='small_cnn', width=8, num_classes=CLASSES, in_channels=3)
    message = str(err.value)
    assert str(tmp_path / 'gray.pt') in message and 'takes 1 input channels' in message and 'has 3' in message


def test_keys_that_do_not_fit_the_arch(tmp_path):
    torch.save(trained_like().state_dict(), tmp_path / 'cnn.pt')
    for arch, width in (('resnet18', 4), ('small_cnn', 16)):   # another arch; the arch at another width
        with pytest.raises(UserError) as err:
            load_teacher(tmp_path / 'cnn.pt', arch=arch, width=width, num_classes=CLASSES, in_channels=3)
        assert str(tmp_path / 'cnn.pt') in str(err.value) and f'do not fit {arch}' in str(err.value)
    state = trained_like().state_dict()
    del state['classifier.1.bias']
    torch.save(state, tmp_path / 'partial.pt')
    with pytest.raises(UserError, match=r'partial\.pt.*missing keys: classifier\.1\.bias'):
        load_teacher(tmp_path / 'partial.pt', arch='small_cnn', width=8, num_classes=CLASSES, in_channels=3)


def test_missing_unreadable_and_unsafe_files(tmp_path):
    kw = dict(arch='small_cnn', width=8, num_classes=CLASSES, in_channels=3)
    with pytest.raises(UserError, match=r'nothing\.pt: no such teacher file'):
        load_teacher(tmp_path / 'nothing.pt', **kw)
    (tmp_path / 'garbage.pt').write_bytes(b'not a torch file')
    with pytest.raises(UserError, match=r'garbage\.pt: cannot load the teacher safely'):
        load_teacher(tmp_path / 'garbage.pt', **kw)
    torch.save({'w': nn.Linear(2, 2)}, tmp_path / 'code.pt')   # a pickled module: weights_only refuses it
    with pytest.raises(UserError, match=r'code\.pt: cannot load the teacher safely'):
        load_teacher(tmp_path / 'code.pt', **kw)
    torch.save({'epoch': 3, 'note': 'no tensors'}, tmp_path / 'other.pt')
    with pytest.raises(UserError, match=r'other\.pt: neither a checkpoint of this engine nor a state dict'):
        load_teacher(tmp_path / 'other.pt', **kw)
    (tmp_path / 'bad.safetensors').write_bytes((10 ** 6).to_bytes(8, 'little') + b'{}')
    with pytest.raises(UserError, match=r'bad\.safetensors: not a valid \.safetensors file'):
        load_teacher(tmp_path / 'bad.safetensors', **kw)


def test_arch_needed_for_plain_files_and_consistent_for_checkpoints(tmp_path):
    torch.save(trained_like().state_dict(), tmp_path / 'plain.pt')
    with pytest.raises(UserError, match=r'plain\.pt: a plain state dict.*name its architecture.*mobilenet_v2'):
        load_teacher(tmp_path / 'plain.pt', num_classes=CLASSES, in_channels=3)
    with pytest.raises(UserError, match=r"plain\.pt: cannot build the teacher: unknown model arch 'vgg16'"):
        load_teacher(tmp_path / 'plain.pt', arch='vgg16', num_classes=CLASSES, in_channels=3)
    path = tmp_path / 'best.pt'
    save_engine_checkpoint(path, trained_like(), arch='small_cnn', width=8)
    with pytest.raises(UserError, match=r"best\.pt: a checkpoint of 'small_cnn', but the teacher arch given is"):
        load_teacher(path, arch='resnet18', num_classes=CLASSES, in_channels=3)
    with pytest.raises(UserError, match=r'best\.pt: a checkpoint of width 8, but the teacher width given is 4'):
        load_teacher(path, width=4, num_classes=CLASSES, in_channels=3)
