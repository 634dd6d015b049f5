"""Teachers for distillation (RSLAD, ARD; issue 14): a trained network, loaded safely and frozen.

load_teacher(path, ...) reads one of three files:
- a checkpoint of this engine (runs/<name>/checkpoints/best.pt or last.pt): its saved params (engine.checkpoint)
  give the architecture and width, its 'model' part the weights, the input normalisation included when the run
  had model.normalize on (the Normalize buffers are in the state dict);
- a plain state dict saved with torch.save (e.g. the TRADES WRN-34-10 checkpoint RSLAD's CIFAR-10 rows use as
  their teacher), its architecture named by the caller;
- a .safetensors file (read by the safetensors package), its architecture named by the caller.
Everything is loaded with weights_only=True (or is no pickle at all): a teacher file can hold no code.

The network is built on the meta device and its storage filled from the file (load_state_dict, strict): no
random draws, so loading a teacher leaves the run's random stream as it was (the student's init, attack noise and
data order are those of the same run without a teacher), and no time is spent initialising 267M parameters of a
WRN-70-16 that the file overwrites. Plain state dicts get the conversions of the layouts these archs copy: a
'module.' prefix on every key (a model saved from inside nn.DataParallel, as the TRADES and RSLAD scripts do) is
dropped, and for the wide ResNets TRADES' key names are read (see convert_state) and the keys of its
WideResNet.sub_block1, which its forward() never uses (engine/models/wideresnet.py), dropped: the TRADES
WRN-34-10 checkpoint, RSLAD's CIFAR-10 teacher, loads as wrn34_10. DeepMind's WRN-70-16 (RSLAD's CIFAR-100
teacher) is another network and does not load (engine/models/wideresnet.py says how it differs).

The result is a Teacher: eval mode for good (its train() is a no-op, so a student's model.train() or a wrapper's
train() cannot switch its BatchNorm to batch statistics), parameters requires_grad=False, and its forward runs
under torch.no_grad(): the logits come without a graph, and no gradient reaches the teacher whatever the loss
does with them. (no_grad, not inference_mode: a loss multiplies the teacher's probabilities into a term whose
backward saves them, which inference tensors refuse.)

Every failure a user can fix is a UserError that names the file: missing or unreadable, not a state dict, an
architecture its keys or shapes do not fit, or a teacher whose classes or input channels differ from the data's.
"""
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from engine.errors import ConfigError, UserError
from engine.models import ARCHS, build_model, default_width


class Teacher(nn.Module):
    """A frozen network: eval mode that train() cannot change, no gradients, outputs without a graph."""

    def __init__(self, model: nn.Module, path: str, arch: str, fingerprint: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.path, self.arch, self.fingerprint = path, arch, fingerprint
        self.training = False

    def train(self, mode: bool = True):
        # A no-op on purpose: a teacher's BN keeps its running statistics and dropout stays off. A parent's
        # train() reaches the children only through this call, so the teacher's modules stay in eval mode too.
        return self

    def forward(self, x):
        with torch.no_grad():
            return self.model(x)

    def reference(self) -> 'TeacherReference':
        """A checkpoint part naming this teacher (see TeacherReference)."""
        return TeacherReference(self.path, self.fingerprint)

    def extra_repr(self):
        return f'path={self.path!r}, arch={self.arch!r}'


class TeacherReference:
    """A checkpoint part (engine.checkpoint) that records which teacher a run distils from, without its weights:
    {'path', 'sha256'}. Loading it into a run whose teacher file differs (another sha256) raises, so a resumed run
    never continues with another teacher silently."""

    def __init__(self, path: str, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint

    def state_dict(self):
        return {'path': self.path, 'sha256': self.fingerprint}

    def load_state_dict(self, state):
        if state.get('sha256') != self.fingerprint:
            raise UserError(f"the teacher {self.path} (sha256 {self.fingerprint}) is not the one the run was "
                            f"trained with ({state.get('path')}, sha256 {state.get('sha256')})")


def load_teacher(path, *, num_classes: int, in_channels: int, device='cpu', dtype: torch.dtype = torch.float32,
                 arch: str = '', width: int = 0, mean: Sequence[float] = (), std: Sequence[float] = ()) -> Teacher:
    """The frozen teacher stored at `path`, on `device` in `dtype`, checked against the data.

    num_classes, in_channels: the data's; a teacher with others stops with a UserError naming both numbers.
    arch: an engine.models arch; '' = the file is a checkpoint of this engine and its params name it (given for
        such a file, it must be the checkpoint's). width: as model.width (0 = the arch's default); for a checkpoint
        of this engine its saved width is used (a nonzero width must equal it).
    mean, std: only for a plain state dict / .safetensors without normalisation inside, of a network trained on
        normalised inputs: the teacher then normalises its [0, 1] input so (engine.models.Normalize). A file that
        holds its normalisation (an engine checkpoint with model.normalize, or 'normalize.*' keys) uses its own.
    """
    path = os.fspath(path)
    state, params = read_weights(path)
    if params is not None:
        saved_arch, saved_width = params.get('model.arch'), int(params.get('model.width') or 0)
        if saved_arch not in ARCHS:
            raise UserError(f'{path}: a checkpoint of arch {saved_arch!r}, which this engine does not build')
        if arch and arch != saved_arch:
            raise UserError(f'{path}: a checkpoint of {saved_arch!r}, but the teacher arch given is {arch!r} '
                            "(leave it empty for this engine's checkpoints)")
        if width and width != (saved_width or default_width(saved_arch)):
            raise UserError(f'{path}: a checkpoint of width {saved_width or default_width(saved_arch)}, but the '
                            f'teacher width given is {width}')
        if mean or std:
            raise UserError(f'{path}: a checkpoint of this engine holds its own input normalisation (or none); '
                            'give no teacher mean / std for it')
        arch, width = saved_arch, saved_width
    elif not arch:
        raise UserError(f"{path}: a plain state dict, not a checkpoint of this engine: name its architecture "
                        f"(teacher arch: one of {', '.join(ARCHS)})")
    else:
        state = convert_state(state, arch)
    own_normalize = 'normalize.mean' in state or 'normalize.std' in state
    if own_normalize and (mean or std):
        raise UserError(f'{path}: holds its own input normalisation; give no teacher mean / std for it')
    normalize = own_normalize or bool(mean or std)
    if normalize and not own_normalize and (len(mean) != in_channels or len(std) != in_channels):
        raise UserError(f'{path}: teacher normalisation needs one mean and one std per input channel '
                        f'({in_channels}); got mean {tuple(mean)} and std {tuple(std)}')
    try:
        with torch.device('meta'):   # no storage, no random draws: every tensor comes from the file
            model = build_model(arch, num_classes, in_channels=in_channels, width=width, normalize=normalize,
                                mean=tuple(mean) or (0.0,) * in_channels, std=tuple(std) or (1.0,) * in_channels)
    except ConfigError as e:
        raise UserError(f'{path}: cannot build the teacher: {e}') from None
    check_fits(path, state, model, arch, width, num_classes, in_channels)
    target = model.net if normalize and not own_normalize else model
    model.to_empty(device=device)
    if normalize and not own_normalize:   # the given statistics (to_empty left the buffers unset)
        model.normalize.mean.copy_(torch.tensor(mean).view_as(model.normalize.mean))
        model.normalize.std.copy_(torch.tensor(std).view_as(model.normalize.std))
    unset = set(dict(model.named_buffers())) - set(model.state_dict())
    assert not unset, f'non-persistent buffers the file cannot fill: {sorted(unset)}'
    target.load_state_dict(state, strict=True)
    return Teacher(model.to(device, dtype), path, arch, _sha256(path))


def read_weights(path, what='teacher'):
    """(state dict, params or None) of a checkpoint of this engine, a torch.save'd state dict (weights_only) or a
    .safetensors file: params are the saved config when the file is a checkpoint of this engine. `what` names the
    file in messages (a teacher, a model to evaluate)."""
    if not os.path.isfile(path):
        raise UserError(f'{path}: no such {what} file')
    if path.endswith('.safetensors'):
        return read_safetensors(path, what), None
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding objects weights_only refuses
        first = str(e).splitlines()[0] if str(e) else ''
        raise UserError(f'{path}: cannot load the {what} safely ({type(e).__name__}: {first})') from None
    if isinstance(state, Mapping) and 'params' in state and 'model' in state:
        try:
            params = json.loads(state['params'])
        except (TypeError, ValueError):
            raise UserError(f"{path}: its 'params' are not this engine's saved config") from None
        return state['model'], params
    if isinstance(state, Mapping) and isinstance(state.get('state_dict'), Mapping):
        state = state['state_dict']   # {'state_dict': ...}, a common wrapper
    if not (isinstance(state, Mapping) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise UserError(f'{path}: neither a checkpoint of this engine nor a state dict (a mapping of names to '
                        'tensors)')
    return dict(state), None


def convert_state(state, arch):
    """Plain state dicts: drop a DataParallel 'module.' prefix; for the wide ResNets, read TRADES' key names."""
    if all(key.startswith('module.') for key in state):
        state = {key[len('module.'):]: value for key, value in state.items()}
    if arch.startswith('wrn'):
        state = {_TRADES_WRN_BLOCK.sub(r'\1.', key).replace('.convShortcut.', '.conv_shortcut.'): value
                 for key, value in state.items() if not key.startswith('sub_block1.')}
    return state


# TRADES' WideResNet (yaodongyu/TRADES models/wideresnet.py, commit 6e8e11b) wraps each stage in a NetworkBlock
# (keys 'block1.layer.0.bn1.weight') and names the projection convShortcut; engine/models/wideresnet.py has the
# same layers as 'block1.0.bn1.weight' and conv_shortcut. Checked when this was written on RSLAD's copy of that
# class (zibojia/RSLAD cifar10_models/wideresnet.py, commit c40e04f): its state dict, renamed so and without
# sub_block1, loads strictly into wrn34_10, wrn28_10 and WRN-70-2 and gives the same logits (float64, 6e-13).
_TRADES_WRN_BLOCK = re.compile(r'^(block[123])\.layer\.')


def _first_and_last(model):
    """State-dict keys of the stem conv's weight (input channels) and the classifier's weight (classes)."""
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return f'{convs[0]}.weight', f'{linears[-1]}.weight'


def check_fits(path, state, model, arch, width, num_classes, in_channels, what='teacher'):
    """UserError naming the file unless `state` fits `model` (classes and channels first: the likeliest)."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    if 'normalize.mean' in expected and 'normalize.mean' not in state:   # the net alone: normalisation given
        expected = {key[len('net.'):]: shape for key, shape in expected.items() if key.startswith('net.')}
    stem, classifier = (key[len('net.'):] if key not in expected else key for key in _first_and_last(model))
    if classifier in state and state[classifier].dim() == 2 and state[classifier].shape[0] != num_classes:
        raise UserError(f'{path}: the {what} has {state[classifier].shape[0]} classes, the data {num_classes}')
    if stem in state and state[stem].dim() == 4 and state[stem].shape[1] != in_channels:
        raise UserError(f'{path}: the {what} takes {state[stem].shape[1]} input channels, the data has '
                        f'{in_channels}')
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [f'{key} {list(state[key].shape)} (the arch: {list(shape)})' for key, shape in expected.items()
              if key in state and tuple(state[key].shape) != shape]
    if missing or unexpected or shapes:
        def some(keys):
            return ', '.join(keys[:4]) + (f' and {len(keys) - 4} more' if len(keys) > 4 else '')
        problems = [f'{what}: {some(keys)}' for what, keys in (('missing keys', missing),
                                                               ('unexpected keys', unexpected),
                                                               ('other shapes', shapes)) if keys]
        raise UserError(f"{path}: its weights do not fit {arch} (width {width or 'default'}): "
                        + '; '.join(problems) + ' (another arch or width?)')


def read_safetensors(path, what='teacher') -> dict:
    """The tensors of a .safetensors file (the safetensors package: a JSON header and raw tensors, no pickle), or a
    UserError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(path), device='cpu')
    except OSError as e:
        raise UserError(f'{path}: cannot read the {what} ({e.strerror or e})') from None
    except (SafetensorError, ValueError) as e:
        raise UserError(f'{path}: not a valid .safetensors file ({e})') from None
    if not tensors:
        raise UserError(f'{path}: a .safetensors file with no tensors')
    return tensors


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
            digest.update(block)
    return digest.hexdigest()
