"""Every config field, declared once as fastargs Sections, and a strict loader in front of fastargs.

fastargs 1.2.0 has traps that must never reach a user: a failed validation exits with code 0, `--x False`
sets True, unknown YAML keys are silently ignored and environment variables beat the command line. So the
schema is fastargs' (Sections and Params, their checkers, the help), but we read YAML and the command line
ourselves, reject unknown keys (with close matches) and check every given value once with its Param's checker,
which also converts it (lists are parsed here, once, into tuples); fastargs' own collection and validation are
never run and the environment is never read. Priority: defaults < YAML files (in order) < command line.
The checkers (strict scalars, lists, rules such as "one path component") are in engine/config_checks.py.

The choices of data.dataset, model.arch and method.name come from their registries (engine.data.datasets,
engine.models, engine.methods); the method section's keys are declared next to the losses (methods.PARAMS).
"""
import difflib
import json
import math
import re
import sys

import yaml
from fastargs import Config, Param, Section
from fastargs.dict_utils import NestedNamespace

from engine.attacks import BN_MODES, NORMS, PRESETS
from engine.config_checks import Names, P, Rule, is_folder_name
from engine.data.datasets import DATASETS
from engine.errors import ConfigError
from engine.methods import METHODS, PARAMS as METHOD_PARAMS
from engine.models import ARCHS
from engine.precision import PRECISIONS


def declare(config):
    """The schema: one Section per part of the engine. Defaults reproduce the official SGLS code (CIFAR-10)."""
    def section(name, desc):
        return Section(name, desc, config_descriptor=config)

    section('data', 'Dataset, .beton files and loader').params(
        dataset=P(str, 'cifar10', 'which dataset', choices=tuple(DATASETS)),
        dir=P(str, 'data', 'folder of the .beton files (convert writes there)'),
        source=P(str, '', 'local source: CIFAR tarball or folder, Fashion-MNIST IDX folder ("" = default)'),
        download=P(bool, False, 'allow a torchvision download when no local source is given'),
        force=P(bool, False, 'convert: rewrite betons that already exist'),
        loader=P(str, 'gpu', 'gpu: whole beton on the device; ffcv: FFCV Loader', choices=('gpu', 'ffcv')),
        val_size=P(int, 1000, 'validation images held out of the training beton (Rice et al.: 1000)', low=0),
        split_seed=P(int, 0, 'seed of the validation split; the same for every method and seed'),
        train_limit=P(int, 0, 'train on only the first N training images (0 = all)', low=0),
        augment=P(str, 'auto', 'auto = the dataset\'s default (CIFAR: crop+flip, Fashion-MNIST: none)',
                  choices=('auto', 'crop_flip', 'crop', 'flip', 'none')),
        crop_padding=P(int, 4, 'zero padding of the random crop', low=0),
        num_workers=P(int, 2, 'ffcv loader workers', low=1),
        synthetic_n_train=P(int, 5000, 'synthetic: training images', low=1),
        synthetic_n_test=P(int, 1000, 'synthetic: test images', low=1),
        synthetic_classes=P(int, 10, 'synthetic: classes', low=2),
        synthetic_shape=P(tuple, (3, 32, 32), 'synthetic: C,H,W', of=int, length=3, low=1),
        synthetic_seed=P(int, 0, 'synthetic: generator seed'),
        drop_last=P(bool, True, 'drop the last partial training batch (official SGLS/TRADES code keeps it: 391 steps '
                    'of 128 on 50,000 images)'),
    )
    section('model', 'Network').params(
        arch=P(str, 'resnet18', 'architecture', choices=ARCHS),
        width=P(int, 0, 'base width / widen factor (0 = the architecture default)', low=0),
        normalize=P(bool, False, 'normalize inputs inside the model (off in the official code)'),
        mean=P(tuple, (), 'per-channel mean for normalize (empty = the dataset\'s statistics)', of=float),
        std=P(tuple, (), 'per-channel std for normalize (empty = the dataset\'s statistics)', of=float, low=1e-12),
        factory=P(str, '', 'run.py eval only: package.module:function returning an nn.Module that takes inputs in '
                  '[0, 1] (instead of model.arch; "" = model.arch)'),
    )
    section('attack', 'Training attack (PGD in the attack.norm ball); eps and step in 1/255 for linf (8 = 8/255), '
                      'in pixel units of [0, 1] images for l2 (0.5 = 0.5)').params(
        norm=P(str, 'linf', 'threat model: linf (eps and step in 1/255) or l2 (eps and step in pixel units of [0, 1] '
               'images, e.g. 0.5)', choices=NORMS),
        eps=P(float, 8.0, 'radius: linf in 1/255 (at most 255, the whole image range; below 1 needs '
              'attack.confirm_eps); l2 in pixel units (at most sqrt(C*H*W), the diameter of the image range: 55.4 '
              'for CIFAR; above 5 needs attack.confirm_eps)', low=0.0, high=255.0),
        step_size=P(float, 2.0, 'PGD step, in the units of eps (linf 1/255, l2 pixel units; > 0: a step of 0 leaves '
                    'the attack a no-op)', low=0.0, above=True),
        steps=P(int, 10, 'PGD steps', low=1),
        bn_mode=P(str, 'eval', 'BatchNorm mode while attacking (official code: eval)', choices=BN_MODES),
        confirm_eps=P(bool, False, 'allow an attack.eps that looks given in the other unit: linf below 1 (pixel units '
                      'given as 1/255?), l2 above 5 (1/255 given as pixel units?) or an l2 step_size above eps'),
    )
    section('method', 'Training objective (engine/methods.py)').params(
        name=P(str, 'at', 'the training objective (engine/methods.py: at = PGD-AT, sgls = SGLS on AT)',
               choices=tuple(METHODS)),
        **{key: P(kind, default, desc, **limits) for key, (kind, default, desc, limits) in METHOD_PARAMS.items()},
    )
    section('optimizer', 'SGD').params(
        lr=P(float, 0.1, 'peak learning rate', low=0.0),
        momentum=P(float, 0.9, 'momentum', low=0.0, high=1.0),
        weight_decay=P(float, 5e-4, 'weight decay', low=0.0),
        nesterov=P(bool, False, 'Nesterov momentum'),
    )
    section('schedule', 'Learning-rate schedule over epochs').params(
        kind=P(str, 'piecewise', 'piecewise: x gamma at each milestone; cosine: to 0 at the end',
               choices=('piecewise', 'cosine')),
        milestones=P(tuple, (100, 150), 'piecewise: 1-based epochs from which lr is multiplied by gamma', of=int,
                     increasing=True),
        gamma=P(float, 0.1, 'piecewise: factor', low=0.0),
    )
    section('training', 'Run').params(
        epochs=P(int, 200, 'epochs', low=1),
        batch_size=P(int, 128, 'batch size (fixed: the last partial batch is dropped); the global batch under '
                     'torchrun: each of N ranks takes batch_size / N', low=1),
        seed=P(int, 0, 'seed of initialization, data order, augmentation and attack noise'),
        device=Param(Rule(lambda v: re.fullmatch(r'auto|cpu|cuda(:[0-9]+)?', v) is not None,
                          'auto, cpu, cuda or cuda:N (N an int)'), 'auto | cpu | cuda | cuda:N', default='auto'),
        resume=P(bool, False, 'continue the run in the output folder from its last checkpoint'),
        stop_after=P(int, 0, 'stop after this many epochs in this invocation (0 = never); resume later', low=0),
        progress=P(str, 'auto', 'progress bar: auto = only on a terminal', choices=('auto', 'on', 'off')),
        engine=P(str, 'eager', 'eager: the reference step; fast: compiled, channels-last, mixed precision',
                 choices=('eager', 'fast')),
        precision=P(str, 'auto', 'fp32 | fp64 (weights, data and losses in float64: exact comparisons) | bf16 / fp16 '
                    '(fast engine: autocast); auto = bf16 on GPU with the fast engine, else fp32',
                    choices=PRECISIONS),
        channels_last=P(bool, True, 'fast engine: channels-last memory format'),
        compile=P(bool, True, 'fast engine: torch.compile the model'),
        cuda_graphs=P(bool, True, 'fast engine on a GPU: capture the whole step as CUDA graphs and replay them '
                      '(bf16 or fp32; ignored on CPU)'),
        fold_bn=P(bool, False, 'fast engine: the attack, clean-accuracy and evaluation forwards fold each eval-mode '
                  'BatchNorm into the conv before it (exact; engine/fold_bn.py); never the training forward'),
        fused_attack=P(bool, False, 'fast engine with compile: the attack objective (model and loss) compiled as one '
                       'graph, its update and projection as one kernel'),
        clean_acc=P(bool, True, 'measure train clean accuracy each step (one no-grad eval-mode forward, about 4% of '
                    'a PGD-10 step); false: train_clean_acc is not recorded'),
        weight_ema=P(bool, False, 'also keep an exponential moving average of the weights (any method; '
                     'engine/weight_ema.py): evaluated each epoch, its own best checkpoint and final-table rows'),
        weight_ema_decay=P(float, 0.995, 'weight EMA: ema = decay * ema + (1 - decay) * weights after every step',
                           low=0.0, high=0.9999999),
    )
    section('distributed', 'Data-parallel runs: run.py train under torchrun (engine/data_parallel.py)').params(
        sync_bn=P(bool, False, 'BatchNorm statistics of the global batch (all ranks) instead of each rank\'s slice; '
                  'what one process computes, at two all-reduces per BatchNorm forward'),
    )
    section('evaluation', 'Evaluation during and after training').params(
        every=P(int, 1, 'evaluate test and validation every N epochs (and always at the last)', low=1),
        pgd_steps=P(int, 10, 'PGD steps of the per-epoch evaluation', low=1),
        subset=P(int, 1000, 'test images evaluated each epoch (0 = all)', low=0),
        final_n=P(int, 0, 'test images in the final table (0 = all)', low=0),
        final_pgd_steps=P(int, 20, 'PGD steps in the final table', low=1),
        cw_steps=P(int, 30, 'CW-inf steps in the final table (0 = skip)', low=0),
        fgsm=P(bool, True, 'FGSM in the final table'),
        autoattack=P(bool, True, 'AutoAttack (pyautoattack) in the final table'),
        autoattack_n=P(int, 0, 'test images for AutoAttack (0 = final_n)', low=0),
        autoattack_version=P(str, 'standard', 'AutoAttack version', choices=('standard', 'plus', 'rand')),
        batch_size=P(int, 512, 'evaluation batch size', low=1),
        seed=P(int, 0, 'seed of every random draw of the final table and of run.py eval (PGD and CW starts, presets, '
               'AutoAttack): the same checkpoint gives the same numbers'),
        presets=Param(Names(PRESETS), 'named PGD evaluations of the papers\' code (engine/attacks.py PRESETS), one '
                      'final-table column each, with their own eps/step/steps/start', default=()),
    )
    section('output', 'Run folder').params(
        dir=P(str, 'runs', 'parent folder of run folders'),
        name=Param(Rule(is_folder_name, "a folder name: one path component, no '/', not '.' or '..'"),
                   'run folder name ("" = <dataset>-<arch>-<method>-s<seed>)', default=''),
        overwrite=P(bool, False, 'start afresh in an existing run folder'),
        tensorboard=P(bool, True, 'also write the per-epoch metrics as TensorBoard scalars (<run>/tensorboard/), '
                      'when the tensorboard package is installed'),
    )


SCHEMA = Config()
declare(SCHEMA)
KEYS = {'.'.join(path): param for path, param in SCHEMA.entries.items()}


def _check_key(key, where):
    if key not in KEYS:
        close = difflib.get_close_matches(key, KEYS, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ' (run.py train --help lists every key)'
        raise ConfigError(f"{where}: unknown key '{key}'{hint}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader whose mappings refuse a key given twice, at any level: PyYAML keeps the last silently, so a second
    `training:` block would drop every key of the first (epochs: 3 back to 200)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == 'tag:yaml.org,2002:merge':  # `<<: *anchor` may override; merged keys are no repeat
                continue
            key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
            try:
                if key in seen:  # read_yaml puts the file name in front
                    raise ConfigError(f"line {line}: key '{key}' is given twice (first at line {seen[key]}); YAML "
                                      'would silently keep only the last, so merge the two')
                seen[key] = line
            except TypeError:  # an unhashable key: the base constructor names that error
                pass
        return super().construct_mapping(node, deep=deep)


def read_yaml(path):
    """A YAML file of sections -> {'section.key': value}, refusing unknown sections and keys and repeated keys."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
        doc = yaml.load(data.decode('utf-8'), Loader=_UniqueKeyLoader)
    except OSError as e:
        raise ConfigError(f'{path}: cannot read config file ({e.strerror})') from None
    except UnicodeDecodeError as e:
        line = data.count(b'\n', 0, e.start) + 1
        raise ConfigError(f'{path}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the config file '
                          'as UTF-8') from None
    except ConfigError as e:
        raise ConfigError(f'{path}: {e}') from None
    except yaml.YAMLError as e:
        raise ConfigError(f'{path}: not valid YAML: {e}') from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f'{path}: expected a mapping of sections (data:, model:, ...) at the top level')
    values = {}
    sections = sorted({k.split('.')[0] for k in KEYS})
    for section, body in doc.items():
        if section not in sections:
            close = difflib.get_close_matches(str(section), sections, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else f" (sections: {', '.join(sections)})"
            raise ConfigError(f"{path}: unknown section '{section}'{hint}")
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: section '{section}' must be a mapping of keys to values")
        for key, value in body.items():
            full = f'{section}.{key}'
            _check_key(full, path)
            values[full] = value
    return values


def take_options(args, *names):
    """Remove every `NAME VALUE` / `NAME=VALUE` (NAME in names) from args: (values in order, remaining args)."""
    values, rest, i = [], [], 0
    while i < len(args):
        name = args[i].split('=', 1)[0]
        if name in names and '=' in args[i]:
            values.append(args[i].split('=', 1)[1])
            i += 1
        elif name in names:
            if i + 1 >= len(args):
                raise ConfigError(f'command line: {name} needs a value')
            values.append(args[i + 1])
            i += 2
        else:
            rest.append(args[i])
            i += 1
    return values, rest


def read_cli(args):
    """['--a.b=1', '--c.d', '2'] -> {'a.b': '1', 'c.d': '2'}; every value must be given explicitly."""
    values, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith('--'):
            raise ConfigError(f"command line: expected --section.key=value, got '{arg}'")
        key, eq, value = arg[2:].partition('=')
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith('--'):
                raise ConfigError(f"command line: '--{key}' needs a value (--{key}=VALUE)")
            value, i = args[i + 1], i + 1
        _check_key(key, 'command line')
        values[key] = value
        i += 1
    return values


def check_value(key, value, where):
    """The typed value of one config key (its Param's checker, the one validation), or ConfigError naming where."""
    try:
        return KEYS[key].checker.check(value)
    except (ValueError, TypeError):
        raise ConfigError(f"{where}: '{key}' must be {KEYS[key].checker.help()}, got {value!r}") from None


def load(config_files=(), cli_args=(), base=None, overrides=None, advise=True):
    """Resolve defaults < base (a saved params.json) < files < command line < overrides into `cfg.section.key`.
    advise=False: no warnings about training (eval of a checkpoint trains nothing)."""
    layers = [('saved params', dict(base or {}))] + [(path, read_yaml(path)) for path in config_files]
    layers += [('command line', read_cli(list(cli_args))), ('overrides', dict(overrides or {}))]
    for where, values in (layers[0], layers[-1]):
        for key in values:
            _check_key(key, where)
    values = {key: param.default for key, param in KEYS.items()}
    for where, layer in layers:
        for key, value in layer.items():
            values[key] = check_value(key, value, where)
    sections = {}
    for key, value in values.items():
        section, name = key.split('.')
        sections.setdefault(section, {})[name] = value
    cfg = NestedNamespace(sections)
    _check_consistency(cfg)
    if advise:
        _check_milestones(cfg)
    return cfg


_warned = set()


def warn(message):
    """Print `warning: <message>` to stderr once per process: config.load runs for every run of a sweep, and the
    same advice a hundred times would bury it."""
    if message not in _warned:
        _warned.add(message)
        print(f'warning: {message}', file=sys.stderr, flush=True)


def _check_milestones(cfg):
    """A milestone past the last epoch never lowers the learning rate. Only a warning: a short run with the default
    milestones (100, 150) is a common, deliberate test."""
    s, epochs = cfg.schedule, cfg.training.epochs
    late = [m for m in s.milestones if m > epochs]
    if s.kind != 'piecewise' or not late:
        return
    many = len(late) > 1
    if len(late) == len(s.milestones):
        outcome = f'the learning rate stays {cfg.optimizer.lr:g} throughout'
    else:
        outcome = f"{'they never lower' if many else 'it never lowers'} the learning rate"
    warn(f"schedule.milestones {', '.join(map(str, late))} {'lie' if many else 'lies'} past the last epoch "
         f'({epochs}): {outcome}')


# attack.norm=l2: an eps above this (in pixel units) is refused unless confirmed. Published L2 radii are 0.1-3 (CIFAR
# 0.25-1, ImageNet 3), while L-inf radii in 1/255 are 2-16: an l2 eps of 8 is most likely 8/255 meant for L-inf.
L2_EPS_CONFIRM_ABOVE = 5.0


def _check_attack_units(cfg):
    """Refuse an attack.eps that looks given in the other norm's unit (unless attack.confirm_eps) and an L2 radius
    larger than the image range's diameter (every image of the range is then inside the ball)."""
    a = cfg.attack
    if a.norm == 'linf' and 0 < a.eps < 1 and not a.confirm_eps:
        raise ConfigError(f"'attack.eps' {a.eps:g} with attack.norm=linf is in units of 1/255 (8 means 8/255), so "
                          f'this is {a.eps:g}/255 = {a.eps / 255:.2g} in pixel units: if you meant {a.eps:g} in pixel '
                          f'units give {a.eps * 255:g}; to train at {a.eps:g}/255 indeed, set '
                          "'attack.confirm_eps' true")
    if a.norm != 'l2':
        return
    d = cfg.data
    shape = DATASETS[d.dataset].shape or tuple(d.synthetic_shape)
    diameter = math.sqrt(math.prod(shape))
    if a.eps > diameter:
        raise ConfigError(f"'attack.eps' {a.eps:g} with attack.norm=l2 (pixel units) is larger than the L2 diameter "
                          f"of {'x'.join(map(str, shape))} images in [0, 1] (sqrt({math.prod(shape)}) = "
                          f'{diameter:.3g}): the ball would hold every image')
    if a.eps > L2_EPS_CONFIRM_ABOVE and not a.confirm_eps:
        raise ConfigError(f"'attack.eps' {a.eps:g} with attack.norm=l2 is in pixel units of [0, 1] images (typical "
                          f'L2 radii: 0.1-3, e.g. 0.5 on CIFAR): above {L2_EPS_CONFIRM_ABOVE:g} it looks like an '
                          "L-inf eps in 1/255; to train at this L2 radius indeed, set 'attack.confirm_eps' true")
    if a.step_size > a.eps and not a.confirm_eps:  # e.g. the default step 2 (2/255 for linf) left with eps 0.5
        raise ConfigError(f"'attack.step_size' {a.step_size:g} with attack.norm=l2 (pixel units) is larger than "
                          f"'attack.eps' {a.eps:g}: give the step in pixel units too, e.g. 2.5 * eps / steps = "
                          f"{2.5 * a.eps / a.steps:.3g} (Madry et al.), or set 'attack.confirm_eps' true")


def _check_consistency(cfg):
    """Rules across fields, checked before any work is done."""
    _check_attack_units(cfg)
    if cfg.method.label_noise != 'none' and cfg.method.noise_rate == 0:
        raise ConfigError("'method.noise_rate' must be > 0 when 'method.label_noise' is set")
    t = cfg.training
    if t.engine == 'fast' and t.precision == 'fp16' and t.cuda_graphs:
        raise ConfigError("'training.precision' fp16 needs 'training.cuda_graphs' false: fp16 loss scaling reads "
                          'an overflow flag back to the host every step, which a CUDA graph cannot hold')


def flat(cfg):
    """cfg namespace -> {'section.key': value}, the form saved as params.json (lists as JSON lists)."""
    out = {}
    for key in KEYS:
        section, name = key.split('.')
        value = getattr(getattr(cfg, section), name)
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def help_text():
    lines = []
    for path, section in SCHEMA.sections.items():
        lines.append(f'\n{path[0]}: {section.desc}')
        for key, param in KEYS.items():
            if key.split('.')[0] == path[0]:
                lines.append(f'  --{key:<28} {json.dumps(param.default):<12} {param.desc} [{param.checker.help()}]')
    return '\n'.join(lines)
