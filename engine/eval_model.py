"""`run.py eval`: the final-table evaluation of any model, written into a folder of its own.

    run.py eval --checkpoint runs/x/checkpoints/best.pt [--out DIR] [--section.key=value ...]
    run.py eval --checkpoint weights.pt|weights.safetensors --model.arch=resnet18 [--data.dataset=cifar10 ...]
    run.py eval --model.factory=package.module:function [--checkpoint weights.pt] [-C config.yaml ...]

The model is one of:
- a checkpoint of this engine: its saved params give the model, the data and the evaluation settings; overrides
  of the evaluation (evaluation.*, attack.* for the threat model, data.dir ...) are taken, overrides that change
  the network are refused, naming them;
- a plain state dict (a torch.save'd mapping of names to tensors, loaded with weights_only=True: a pickle that
  would run code is refused) or a .safetensors file, of the architecture given with --model.arch (required);
- the nn.Module returned by `function()` of --model.factory (imported from the current folder or the Python path),
  which takes images in [0, 1]; with --checkpoint, a state dict loaded into it (strict).
Every input is checked (the weights fit, the model maps one test-shaped batch to the data's classes) before
anything is written. The results go to --out DIR (default: <run>/eval/<checkpoint name>/ for a checkpoint in a
run's checkpoints/ folder, <file stem>-eval/ beside any other file, <output.dir>/eval-<function>/ for a factory
alone): eval.json and eval.md (the table), examples.csv (per test image), reliability.png, robustbench.json and,
when AutoAttack runs, autoattack.log. Nothing inside checkpoints/ is written; a folder that already holds an
eval.json is refused unless --output.overwrite=true.
"""
import functools
import importlib
import os
import sys

import torch
import torch.nn as nn

from engine import checkpoint as checkpoints, config as config_mod
from engine.data.datasets import dataset
from engine.errors import UserError
from engine.teacher import check_fits, convert_state, read_weights
from engine.train.build import dtype_of, model_of, num_classes_of, open_data, progress_on, resolve_device, \
    synthetic_spec
from engine.train.final import AUTOATTACK_LOG, evaluate_final, final_settings
from writers import examples as example_files, reliability, robustbench
from writers.run_files import write_eval
from writers.tables import format_table

# Overrides that change the network's tensors (layers, widths, classes, input channels): a checkpoint's weights
# fit only the values it was trained with.
MODEL_KEYS = ('model.', 'data.dataset', 'data.synthetic_classes', 'data.synthetic_shape')


def _misfit(model_state, saved):
    """Why the saved weights do not fit this model (the first difference), or None when they do."""
    for key, tensor in model_state.items():
        if key not in saved:
            return f"the checkpoint has no '{key}'"
        if tuple(saved[key].shape) != tuple(tensor.shape):
            return f"'{key}' is {tuple(saved[key].shape)} in the checkpoint but {tuple(tensor.shape)} here"
    extra = [key for key in saved if key not in model_state]
    return f"the checkpoint has '{extra[0]}', which this model lacks" if extra else None


def _as_given(value):
    return ','.join(map(str, value)) if isinstance(value, list) else value


def _load_run_weights(path, weights, params, cfg, model):
    """A checkpoint's weights into model, or a UserError naming the overrides that made the model different."""
    why = _misfit(model.state_dict(), weights)
    if why is None:
        try:
            model.load_state_dict(weights)
            return
        except RuntimeError as e:
            why = str(e).strip().splitlines()[-1].strip()
    saved = config_mod.flat(config_mod.load(base=params, advise=False))
    now = config_mod.flat(cfg)
    changed = [key for key in now if now[key] != saved[key]]
    shaping = [key for key in changed if key.startswith(MODEL_KEYS)] or changed
    if not shaping:
        raise UserError(f'{path}: its weights do not fit the model its own params describe ({why})')
    overrides = ', '.join(f'--{key}={_as_given(now[key])} (saved: {_as_given(saved[key])})' for key in shaping)
    raise UserError(f'{path}: the overrides {overrides} do not fit this checkpoint ({why}); its model is fixed by '
                    'the params it was trained with, so drop them')


def model_from_factory(spec):
    """The nn.Module of `package.module:function` (function may be dotted: module:Class.build), or a UserError
    naming the factory and, once imported, its file."""
    module_name, colon, attribute = spec.partition(':')
    if not colon or not module_name or not attribute:
        raise UserError(f"model.factory {spec!r}: expected package.module:function")
    if os.getcwd() not in sys.path:   # as `python -m`: a module in the current folder imports
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:   # ImportError, or any error the module raises while it is imported
        raise UserError(f'model.factory {spec!r}: cannot import {module_name} ({type(e).__name__}: {e})') from None
    where = getattr(module, '__file__', None) or module_name
    try:
        factory = functools.reduce(getattr, attribute.split('.'), module)
    except AttributeError:
        raise UserError(f'{where}: model.factory {spec!r}: the module has no {attribute}') from None
    if not callable(factory):
        raise UserError(f'{where}: model.factory {spec!r}: {attribute} is not callable')
    try:
        model = factory()
    except Exception as e:
        raise UserError(f'{where}: model.factory {spec!r}: {attribute}() raised {type(e).__name__}: {e}') from None
    if not isinstance(model, nn.Module):
        raise UserError(f'{where}: model.factory {spec!r}: {attribute}() returned a {type(model).__name__}, not a '
                        'torch.nn.Module')
    return model, where


def _explicit_keys(files, rest):
    keys = set(config_mod.read_cli(list(rest)))
    for path in files:
        keys |= set(config_mod.read_yaml(path))
    return keys


def _default_out(path, cfg, factory_name):
    if path is None:
        return os.path.join(cfg.output.dir, f"eval-{factory_name.rsplit('.', 1)[-1]}")
    folder, stem = os.path.dirname(os.path.abspath(path)), os.path.splitext(os.path.basename(path))[0]
    if os.path.basename(folder) == 'checkpoints' and os.path.exists(os.path.join(folder, '..', 'params.json')):
        return os.path.join(os.path.dirname(folder), 'eval', stem)
    return os.path.join(folder, f'{stem}-eval')


def _check_output(out_dir, overwrite):
    if os.path.exists(os.path.join(out_dir, 'eval.json')) and not overwrite:
        raise UserError(f'{out_dir}: already holds an evaluation (eval.json); give another --out, or '
                        '--output.overwrite=true to replace it')
    if os.path.basename(os.path.normpath(out_dir)) == 'checkpoints':
        raise UserError(f"{out_dir}: --out must not be a run's checkpoints folder")


def _check_outputs_classes(model, cfg, device, path):
    """One test-shaped batch through the model: it must give [2, classes] logits (a wrong input shape, classes or
    a model that is not a classifier stops here, before data is opened or anything written)."""
    shape = dataset(cfg.data.dataset).image_shape(synthetic_spec(cfg.data))
    probe = torch.zeros((2, *shape), device=device, dtype=next(model.parameters()).dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(probe)
    except Exception as e:
        raise UserError(f'{path}: the model does not take {cfg.data.dataset} images {tuple(shape)} '
                        f'({type(e).__name__}: {e})') from None
    finally:
        model.train(was_training)
    classes = num_classes_of(cfg)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, classes):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserError(f'{path}: the model maps a batch of 2 {cfg.data.dataset} images to {got}, not (2, {classes})'
                        ' logits')


def load_model(path, files, rest):
    """(cfg, model on its device, epoch or None, description, source) for run.py eval's inputs."""
    state, params = (None, None) if path is None else read_weights(path, 'model')
    if params is not None:   # a checkpoint of this engine: its params are the base of the config
        if files:
            raise UserError(f"{path}: a checkpoint of this engine carries its config; give overrides on the "
                            "command line, not -C files")
        base = {key: value for key, value in params.items() if not key.startswith('output.')}
        cfg = config_mod.load(cli_args=rest, base=base, advise=False)
        if cfg.model.factory:
            raise UserError(f'{path}: a checkpoint of this engine builds its own model; drop --model.factory')
        device = resolve_device(cfg.training.device)
        in_channels = dataset(cfg.data.dataset).image_shape(synthetic_spec(cfg.data))[0]
        model = model_of(cfg, in_channels, device)
        _load_run_weights(path, state, base, cfg, model)
        epoch = checkpoints.epoch_of(path)
        return cfg, model, epoch, f'{cfg.model.arch} checkpoint (epoch {epoch})', path
    cfg = config_mod.load(files, rest, advise=False)
    device = resolve_device(cfg.training.device)
    in_channels = dataset(cfg.data.dataset).image_shape(synthetic_spec(cfg.data))[0]
    if cfg.model.factory:
        model, where = model_from_factory(cfg.model.factory)
        model = model.to(device, dtype_of(cfg, device))
        source = path or where
        if state is not None:
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise UserError(f"{path}: its weights do not fit model.factory {cfg.model.factory!r}: "
                                f"{str(e).strip().splitlines()[-1].strip()}") from None
        _check_outputs_classes(model, cfg, device, source)
        return cfg, model, None, f'model.factory {cfg.model.factory}', source
    if path is None:
        raise UserError('eval needs --checkpoint PATH (a checkpoint of this engine, a state dict or a .safetensors '
                        'file) or --model.factory=package.module:function')
    if 'model.arch' not in _explicit_keys(files, rest):
        raise UserError(f'{path}: a plain state dict, not a checkpoint of this engine: name its architecture with '
                        f"--model.arch (and --model.width, --data.dataset when not the defaults)")
    model = model_of(cfg, in_channels, device)
    state = convert_state(state, cfg.model.arch)
    check_fits(path, state, model, cfg.model.arch, cfg.model.width, num_classes_of(cfg), in_channels, 'model')
    model.load_state_dict(state, strict=True)
    return cfg, model, None, f'{cfg.model.arch} state dict', path


def eval_model(args, log=print):
    """`run.py eval` (args: its command line after 'eval'): the row of the evaluated model, also written to --out."""
    paths, rest = config_mod.take_options(list(args), '--checkpoint')
    outs, rest = config_mod.take_options(rest, '--out')
    files, rest = config_mod.take_options(rest, '-C', '--config-file')
    path, out = (paths[-1] if paths else None), (outs[-1] if outs else None)
    cfg, model, epoch, description, source = load_model(path, files, rest)
    out_dir = out or _default_out(path, cfg, cfg.model.factory)
    _check_output(out_dir, cfg.output.overwrite)
    device = next(model.parameters()).device
    loaders, _ = open_data(cfg, device, log)
    os.makedirs(out_dir, exist_ok=True)
    aa_log = os.path.join(out_dir, AUTOATTACK_LOG) if cfg.evaluation.autoattack else None
    if aa_log is not None and os.path.exists(aa_log):
        os.remove(aa_log)
    row, per_example = evaluate_final(cfg, model, loaders.test, progress=progress_on(cfg), autoattack_log=aa_log)
    row = {'epoch': epoch, **row} if epoch is not None else row
    settings = final_settings(cfg, row['n'])
    label = os.path.basename(path) if path else cfg.model.factory
    # Logged before the files are written: a failed write (read-only folder, full disk) loses nothing.
    log(f'{out_dir}/eval.md:\n{format_table({label: row}, settings)}')
    example_files.write_examples(os.path.join(out_dir, 'examples.csv'), per_example, cfg.evaluation.presets)
    reliability.write_reliability(os.path.join(out_dir, 'reliability.png'), per_example, title=label)
    robustbench.write(out_dir, row, settings, arch=cfg.model.factory or cfg.model.arch, dataset=cfg.data.dataset,
                      checkpoint=label, name=label)
    write_eval(out_dir, {'model': description, 'source': os.path.abspath(source) if path else source,
                         'params': config_mod.flat(cfg)}, label, row, settings)
    return row
