"""Robust-accuracy evaluation: clean, FGSM, PGD, CW-inf, AutoAttack and the per-example worst case.

The table it feeds is formatted by writers.tables."""
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from engine import attacks as atk
from engine.errors import ConfigError

EVAL_ATTACKS = ('clean', 'fgsm', 'pgd', 'cw', 'autoattack')


def in_worst(preset: atk.PgdPreset, eps: float) -> bool:
    """Whether a preset's column counts in 'worst': only when it attacks at the run's eps (to rounding). A preset
    at another radius (pgd20_sgls / pgd20_trades: 0.031 against the usual 8/255 = 0.0314) measures another
    threat model, and the per-example worst case is over attacks of one budget."""
    return math.isclose(preset.eps, eps, rel_tol=1e-9, abs_tol=0.0)


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 0) -> torch.Tensor:
    """Per-example bool: the model's prediction equals y (batched when batch_size > 0)."""
    with torch.no_grad():
        if batch_size <= 0:
            return model(x).argmax(dim=1) == y
        return torch.cat([model(x[i:i + batch_size]).argmax(dim=1) == y[i:i + batch_size]
                          for i in range(0, x.shape[0], batch_size)])


def evaluate(model: nn.Module, loader: Iterable, *, attacks: Iterable[str] = ('clean', 'pgd'), eps: float,
             step_size: float, pgd_steps: int = 20, cw_steps: int = 30, max_examples: int = 0,
             autoattack_version: str = 'standard', autoattack_batch: int = 256,
             autoattack_attacks: tuple[str, ...] = (), presets: Sequence[atk.PgdPreset] = (),
             preset_seed: int = 0) -> dict:
    """Accuracy in percent under each asked attack, plus 'n' (examples) and 'worst' (per example: correct
    on the clean input, under every asked attack and under every preset at eps, see in_worst).

    loader yields (images in [0, 1] NCHW, labels, indices). PGD and CW start uniformly in the eps-ball,
    run in eval mode, with step_size. AutoAttack (autoattack_version; 'custom' needs autoattack_attacks)
    runs after the gradient attacks on all collected examples, in batches of autoattack_batch.
    presets (engine.attacks.PRESETS) add one column each, keyed by the preset's name, run after the other
    gradient attacks with their own settings; they count in 'worst' only as in_worst says. Their random starts
    draw from a CPU generator seeded with preset_seed (as the official scripts draw on the CPU), so adding a preset
    changes no other column and a preset's noise does not depend on the device.
    Counts stay on the device; the host reads them once at the end. The model's modes are restored.
    """
    attacks = tuple(attacks)
    unknown = [a for a in attacks if a not in EVAL_ATTACKS]
    if unknown or not attacks:
        raise ConfigError(f"evaluation attacks must be a non-empty subset of {', '.join(EVAL_ATTACKS)}; "
                          f'got {attacks}')
    presets = tuple(presets)
    preset_names = tuple(p.name for p in presets)
    if len(set(preset_names)) != len(preset_names) or set(preset_names) & set(EVAL_ATTACKS + ('n', 'worst')):
        raise ConfigError(f"evaluation presets must have distinct names other than the attacks'; got {preset_names}")
    device = next(model.parameters()).device
    gradient_attacks = {
        'fgsm': lambda x, y: atk.fgsm(model, x, y, eps=eps),
        'pgd': lambda x, y: atk.pgd(model, x, y, eps=eps, step_size=step_size, steps=pgd_steps),
        'cw': lambda x, y: atk.cw_inf(model, x, y, eps=eps, step_size=step_size, steps=cw_steps),
    }
    # In the asked order: pgd and cw draw random starts, so a fixed order keeps a seeded run reproducible.
    asked_gradient_attacks = [name for name in attacks if name in gradient_attacks]
    counts = {name: torch.zeros((), dtype=torch.long, device=device) for name in attacks + preset_names}
    counted = [in_worst(preset, eps) for preset in presets]
    preset_generator = torch.Generator().manual_seed(preset_seed) if presets else None
    worst = torch.zeros((), dtype=torch.long, device=device)
    kept_x, kept_y, kept_correct = [], [], []   # inputs for AutoAttack, which runs once over all of them
    n = 0   # from batch shapes: known on the host without a sync
    with atk.eval_mode(model):
        for images, labels, _ in loader:
            if max_examples > 0:
                images, labels = images[:max_examples - n], labels[:max_examples - n]
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            # 'worst' always includes the clean prediction, asked for or not: an example the model gets
            # wrong is not robust even if an attack's random start happens to land on a correct point.
            all_correct = _correct(model, images, labels)
            if 'clean' in attacks:
                counts['clean'] += all_correct.sum()
            for name in asked_gradient_attacks:
                correct = _correct(model, gradient_attacks[name](images, labels), labels)
                counts[name] += correct.sum()
                all_correct &= correct
            for preset, in_worst_case in zip(presets, counted):
                correct = _correct(model, preset.attack(model, images, labels, preset_generator), labels)
                counts[preset.name] += correct.sum()
                if in_worst_case:
                    all_correct &= correct
            if 'autoattack' in attacks:
                kept_x.append(images)
                kept_y.append(labels)
                kept_correct.append(all_correct)
            else:
                worst += all_correct.sum()
            n += labels.shape[0]
            if 0 < max_examples <= n:
                break   # before fetching another batch: loading one may be costly

        if 'autoattack' in attacks and n > 0:
            x_all, y_all = torch.cat(kept_x), torch.cat(kept_y)
            x_adv = atk.autoattack(model, x_all, y_all, eps=eps, version=autoattack_version,
                                   batch_size=autoattack_batch, attacks_to_run=autoattack_attacks)
            correct = _correct(model, x_adv, y_all, autoattack_batch)
            counts['autoattack'] += correct.sum()
            worst += (torch.cat(kept_correct) & correct).sum()

    names = list(counts) + ['worst']
    totals = torch.stack([counts[name] for name in counts] + [worst]).tolist()   # the one host read
    result = {'n': n}
    for name, total in zip(names, totals):
        result[name] = 100.0 * total / n if n else float('nan')
    return result
