"""The engine's parts from a config: device, data, model, method, attack budget, learning rate.

Only the orchestration (engine.train, sweep, eval) reads the config; the core (models, attacks, methods, step)
takes what these functions hand it as plain arguments.
"""
import math
import sys

import torch

from engine.data.convert import convert
from engine.data.datasets import dataset
from engine.data.loaders import make_loaders
from engine.data.sources import SyntheticSpec
from engine.errors import UserError
from engine.methods import method_from_config
from engine.models import build_model
from engine.precision import param_dtype, resolve_precision


def resolve_device(name):
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f"training.device={name!r} but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)


def dtype_of(cfg, device):
    """dtype of the run's weights, data and soft labels (float64 for training.precision=fp64)."""
    return param_dtype(resolve_precision(cfg.training.precision, device, cfg.training.engine))


def attack_budget(cfg):
    """The training attack in pixel units, as engine.attacks takes it: for attack.norm linf the config gives eps and
    the step in 1/255, and this is the one place that converts them; for l2 they are in pixel units already."""
    a = cfg.attack
    unit = 255 if a.norm == 'linf' else 1
    return dict(norm=a.norm, eps=a.eps / unit, step_size=a.step_size / unit, steps=a.steps, bn_mode=a.bn_mode)


def lr_at(cfg, epoch):
    """Learning rate of 1-based `epoch`: piecewise (x gamma from each milestone on) or cosine to 0."""
    lr = cfg.optimizer.lr
    if cfg.schedule.kind == 'cosine':
        return lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / cfg.training.epochs))
    return lr * cfg.schedule.gamma ** sum(epoch >= m for m in cfg.schedule.milestones)


def synthetic_spec(d):
    return SyntheticSpec(d.synthetic_n_train, d.synthetic_n_test, d.synthetic_classes, d.synthetic_shape,
                         d.synthetic_seed)


def num_classes_of(cfg):
    return dataset(cfg.data.dataset).num_classes(synthetic_spec(cfg.data))


def progress_on(cfg):
    """Whether progress bars show: training.progress on, or auto on a terminal."""
    return cfg.training.progress == 'on' or (cfg.training.progress == 'auto' and sys.stderr.isatty())


def convert_data(cfg, log=print):
    d = cfg.data
    return convert(d.dataset, d.dir, source=d.source, download=d.download, force=d.force,
                   synthetic=synthetic_spec(d), progress=progress_on(cfg), log=log)


def open_data(cfg, device, log=print):
    """(loaders, (train beton path, test beton path)); converts what is missing first."""
    d = cfg.data
    train_path, test_path = convert_data(cfg, log)
    augment = dataset(d.dataset).augment if d.augment == 'auto' else d.augment
    loaders = make_loaders(train_path, test_path, kind=d.loader, batch_size=cfg.training.batch_size,
                           eval_batch_size=cfg.evaluation.batch_size, device=device, seed=cfg.training.seed,
                           val_size=d.val_size, split_seed=d.split_seed, train_limit=d.train_limit,
                           crop_padding=d.crop_padding if 'crop' in augment else 0, flip='flip' in augment,
                           num_workers=d.num_workers, dtype=dtype_of(cfg, device), num_classes=num_classes_of(cfg),
                           drop_last=d.drop_last)
    return loaders, (train_path, test_path)


def model_of(cfg, in_channels, device):
    """The configured network on `device`, in the run's dtype."""
    m = cfg.model
    mean, std = dataset(cfg.data.dataset).statistics(in_channels)
    model = build_model(m.arch, num_classes_of(cfg), in_channels=in_channels, width=m.width,
                        normalize=m.normalize, mean=m.mean or mean, std=m.std or std)
    return model.to(device, dtype_of(cfg, device))


def method_of(cfg):
    return method_from_config(cfg.method)


def uses_graphs(cfg, device):
    return cfg.training.engine == 'fast' and cfg.training.cuda_graphs and device.type == 'cuda'
