"""Robust-accuracy evaluation: clean, FGSM, PGD, CW, AutoAttack, presets and the per-example worst case; optionally
per-example results and calibration (engine.calibration).

The table it feeds is formatted by writers.tables."""
import hashlib
import math
import sys
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
from tqdm import tqdm

from engine import attacks as atk
from engine import calibration as calib
from engine.errors import ConfigError

EVAL_ATTACKS = ('clean', 'fgsm', 'pgd', 'cw', 'autoattack')
# AutoAttack runs in chunks of this many of its batches, one pyautoattack call each (reseeded with the same seed):
# the only way to show progress, as run_standard_evaluation has no callback. The AutoAttack numbers therefore depend
# on the chunk size (each chunk attacks only its own still-robust points), which is why it is fixed, not a setting.
AUTOATTACK_CHUNK_BATCHES = 4
# Per-example float columns, in this order, before the bool columns; the pgd ones only when PGD is evaluated.
STAT_COLUMNS = ('clean_margin', 'clean_confidence', 'clean_nll', 'pgd_confidence', 'pgd_nll')


def in_worst(preset: atk.PgdPreset, eps: float) -> bool:
    """Whether a preset's column counts in 'worst': only when it attacks at the run's eps (to rounding). A preset
    at another radius (pgd20_sgls / pgd20_trades: 0.031 against the usual 8/255 = 0.0314) measures another
    threat model, and the per-example worst case is over attacks of one budget."""
    return math.isclose(preset.eps, eps, rel_tol=1e-9, abs_tol=0.0)


def stream_seed(seed: int, name: str) -> int:
    """The seed of attack `name`'s own random stream in an evaluation seeded `seed`: the first 63 bits of
    sha256('<seed>/<name>'). One stream per attack, so adding, removing or reordering attacks changes no other
    column; a hash rather than seed + k, so the streams of nearby seeds do not coincide."""
    return int.from_bytes(hashlib.sha256(f'{seed}/{name}'.encode()).digest()[:8], 'little') >> 1


def _logits(model: nn.Module, x: torch.Tensor, batch_size: int = 0) -> torch.Tensor:
    """The model's logits without grad (batched when batch_size > 0)."""
    with torch.no_grad():
        if batch_size <= 0:
            return model(x)
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def _bar(progress: bool, total, desc: str) -> tqdm:
    # On stderr and gone when done: the caller shows it on a terminal only, and the log keeps the table.
    return tqdm(total=total, desc=desc, unit='img', disable=not progress, file=sys.stderr, leave=False,
                dynamic_ncols=True)


def _batches(loader: Iterable, max_examples: int, bar: tqdm, device):
    """(x, y, index) per batch of (x, y) or (x, y, index) batches, cut to max_examples in all, the index int64 on
    device; a missing (or None) index is the example's position in the stream. Stops before fetching a batch it would
    not use."""
    n = 0
    for batch in loader:
        if len(batch) not in (2, 3):
            raise ValueError(f'evaluation batches are (x, y) or (x, y, index); got {len(batch)} items')
        x, y, index = (*batch, None) if len(batch) == 2 else batch
        if max_examples > 0:
            x, y = x[:max_examples - n], y[:max_examples - n]
        b = y.shape[0]   # from shapes: known on the host without a sync
        # Made on the device, or copied as the images are: no blocking copy per batch.
        index = (torch.arange(n, n + b, device=device) if index is None else
                 torch.as_tensor(index)[:b].to(device, torch.int64, non_blocking=True))
        if n == 0 and hasattr(loader, '__len__'):   # an estimate for the ETA: full batches of the first's size
            bar.total = len(loader) * b if max_examples <= 0 else min(len(loader) * b, max_examples)
            bar.refresh()
        yield x, y, index
        n += b
        bar.update(b)
        if 0 < max_examples <= n:
            return   # before fetching another batch: loading one may be costly


def _attack_runs(model: nn.Module, attacks: tuple, presets: tuple, *, eps, step_size, pgd_steps, cw_steps, norm,
                 seed, preset_seed) -> tuple[dict, int]:
    """name -> x_adv function for the asked gradient attacks (in the asked order), then the presets; and the
    AutoAttack seed. seed None: today's streams (pgd and cw from torch's global generator, part of a training run's
    saved random stream; the presets from one shared CPU generator seeded preset_seed; AutoAttack seed 0). seed an
    int: every attack its own CPU generator seeded stream_seed(seed, name), so the noise is device-independent and
    torch's global state is not touched."""
    if seed is None:
        shared = torch.Generator().manual_seed(preset_seed or 0) if presets else None
        generators = {'pgd': None, 'cw': None, **{p.name: shared for p in presets}}
        autoattack_seed = 0
    else:
        generators = {name: torch.Generator().manual_seed(stream_seed(seed, name))
                      for name in ('pgd', 'cw') + tuple(p.name for p in presets)}
        autoattack_seed = stream_seed(seed, 'autoattack')
    gradient = {
        'fgsm': lambda x, y: atk.fgsm(model, x, y, eps=eps, norm=norm),
        'pgd': lambda x, y: atk.pgd(model, x, y, eps=eps, step_size=step_size, steps=pgd_steps, norm=norm,
                                    generator=generators['pgd']),
        'cw': lambda x, y: atk.cw(model, x, y, eps=eps, step_size=step_size, steps=cw_steps, norm=norm,
                                  generator=generators['cw']),
    }
    # In the asked order: with seed None pgd and cw share the global generator, so the order fixes their draws.
    runs = {name: gradient[name] for name in attacks if name in gradient}
    for p in presets:   # presets are L-inf by definition (their papers' settings)
        runs[p.name] = lambda x, y, p=p: p.attack(model, x, y, generators[p.name])
    return runs, autoattack_seed


def _attack_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, runs: dict, stats: bool) -> tuple[dict, dict]:
    """One batch: per-example correctness on the clean input (always: 'worst' needs it) and under each of runs;
    with stats, the clean margin, confidence and NLL and PGD's confidence and NLL (engine.calibration)."""
    logits = _logits(model, x)
    correct, extra = {'clean': logits.argmax(dim=1) == y}, {}
    if stats:
        s = calib.example_stats(logits, y)
        extra.update(clean_margin=s['margin'], clean_confidence=s['confidence'], clean_nll=s['nll'])
    for name, run in runs.items():
        logits = _logits(model, run(x, y))
        correct[name] = logits.argmax(dim=1) == y
        if stats and name == 'pgd':
            s = calib.example_stats(logits, y)
            extra.update(pgd_confidence=s['confidence'], pgd_nll=s['nll'])
    return correct, extra


def _autoattack_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, progress: bool,
                        **autoattack_kwargs) -> torch.Tensor:
    """Per-example correctness under AutoAttack, run in chunks of AUTOATTACK_CHUNK_BATCHES * batch_size examples
    (one call each, same seed and log file, which pyautoattack's logging handler appends to) with a bar over them."""
    chunk = AUTOATTACK_CHUNK_BATCHES * batch_size
    parts = []
    with _bar(progress, x.shape[0], 'AutoAttack') as bar:
        for start in range(0, x.shape[0], chunk):
            xc, yc = x[start:start + chunk], y[start:start + chunk]
            x_adv = atk.autoattack(model, xc, yc, batch_size=batch_size, **autoattack_kwargs)
            parts.append(_logits(model, x_adv, batch_size).argmax(dim=1) == yc)
            bar.update(yc.shape[0])
    return torch.cat(parts)


def _assemble(n: int, columns: dict, reported: tuple, in_worst_case: tuple, extra: dict, per_example: bool,
              calibrated: bool, device) -> dict:
    """The result dict from the per-example device columns, with one host read: every count and (when asked) every
    per-example column travel in one float64 tensor (exact: counts, labels and indices < 2**53, bools, floats)."""
    worst = columns['clean'].clone()
    for name in in_worst_case:
        worst &= columns[name]
    columns = {**columns, 'worst': worst}
    reported = reported + ('worst',)
    counts = torch.stack([columns[name].sum() for name in reported]) if n else torch.zeros(len(reported), device=device)
    kept = {}
    if per_example or calibrated:
        # clean correctness travels for the clean ECE even when 'clean' is not a column asked for
        kept = {**extra, **{name: columns[name] for name in ('clean',) + reported}}
    pieces = [counts] + list(kept.values())
    host = torch.cat([p.to(torch.float64).reshape(-1) for p in pieces]).cpu()   # the one host read
    totals, *values = host.split([p.numel() for p in pieces])
    result = {'n': n}
    for name, total in zip(reported, totals.tolist()):
        result[name] = 100.0 * total / n if n else float('nan')
    examples = {name: value.to(torch.int64 if name in ('index', 'label') else
                               torch.float64 if name in STAT_COLUMNS else torch.bool)
                for name, value in zip(kept, values)}
    if calibrated:
        for where in ('clean', 'pgd'):
            if f'{where}_confidence' in examples:
                result[f'ece_{where}'] = 100.0 * calib.ece(examples[f'{where}_confidence'], examples[where])
                result[f'nll_{where}'] = calib.nll(-examples[f'{where}_nll'])
    if 'clean' not in reported:
        examples.pop('clean', None)
    if per_example:
        result['examples'] = examples
    return result


def evaluate(model: nn.Module, loader: Iterable, *, attacks: Iterable[str] = ('clean', 'pgd'), eps: float,
             step_size: float, pgd_steps: int = 20, cw_steps: int = 30, max_examples: int = 0,
             autoattack_version: str = 'standard', autoattack_batch: int = 256,
             autoattack_attacks: tuple[str, ...] = (), presets: Sequence[atk.PgdPreset] = (),
             seed: int | None = None, norm: str = 'linf', progress: bool = False, autoattack_log: str | None = None,
             per_example: bool = False, calibration: bool = False, preset_seed: int | None = None) -> dict:
    """Accuracy in percent under each asked attack, plus 'n' (examples) and 'worst' (per example: correct
    on the clean input, under every asked attack and under every preset at eps, see in_worst).

    loader: any iterable of (x, y) or (x, y, index) batches (images in [0, 1] NCHW, int64 labels, int64 indices); an
    example without an index gets its position in the stream (0, 1, ...). At most max_examples (0: all) are used.
    FGSM, PGD and CW attack in the `norm` ball of radius eps ('linf' or 'l2'), in eval mode, PGD and CW from a
    uniform random start with step_size. AutoAttack (autoattack_version; 'custom' needs autoattack_attacks) runs
    after the gradient attacks on all collected examples, in batches of autoattack_batch and in chunks of
    AUTOATTACK_CHUNK_BATCHES batches (its numbers depend on that fixed chunk size); autoattack_log: a file its log is
    appended to. presets (engine.attacks.PRESETS) add one column each, keyed by the preset's name, run after the
    other gradient attacks with their own settings; they count in 'worst' only as in_worst says.

    Random draws. seed an int: each attack draws from its own stream, a CPU generator seeded stream_seed(seed, name)
    for pgd, cw and each preset (so adding an attack changes no other column, and the noise does not depend on the
    device), and AutoAttack is seeded stream_seed(seed, 'autoattack'); torch's global random state is left as it
    was. seed None (the per-epoch evaluation of training): pgd and cw draw from torch's global generator, in the
    asked order; presets from one CPU generator seeded preset_seed (default 0; a legacy argument, only with seed
    None), batch after batch and preset after preset; AutoAttack seed 0 (run on a forked RNG state).

    progress: tqdm bars on stderr (examples attacked, then AutoAttack's chunks), gone when done; the caller shows
    them on a terminal only.
    calibration: adds 'ece_clean' and 'nll_clean' and, when pgd is asked, 'ece_pgd' and 'nll_pgd': the expected
    calibration error in percent (0-100; 15 equal-width bins, engine.calibration) of the max softmax probability
    against correctness, and the mean -log p_label in nats, on the clean and on the PGD inputs.
    per_example: adds 'examples', a dict of 1-D CPU tensors of length n, in this order: 'index', 'label' (int64),
    'clean_margin' (label logit - largest other logit), 'clean_confidence' (max softmax probability), 'clean_nll'
    (-log p_label), 'pgd_confidence' and 'pgd_nll' (the same on the PGD input; when pgd is asked) (float64), then a
    bool column (correct) per asked attack in table order (clean, fgsm, pgd, cw, autoattack), one per preset and
    'worst': each column's sum is n * accuracy / 100. For AutoAttack on a subset (a second call with
    attacks=('autoattack',) and a smaller max_examples over the same loader), join that call's 'autoattack' column
    to this one's rows on 'index'; this call's 'worst' then excludes AutoAttack.
    The host reads results once, at the end. The model's modes are restored.
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
    if norm not in atk.NORMS:
        raise ConfigError(f"evaluation norm must be one of {', '.join(atk.NORMS)}; got {norm!r}")
    if seed is not None and preset_seed is not None:
        raise ConfigError('evaluate: give seed (all attacks) or the legacy preset_seed (presets, with seed None)')
    device = next(model.parameters()).device
    runs, autoattack_seed = _attack_runs(model, attacks, presets, eps=eps, step_size=step_size, pgd_steps=pgd_steps,
                                         cw_steps=cw_steps, norm=norm, seed=seed, preset_seed=preset_seed)
    stats = per_example or calibration
    # Per-example device tensors, per batch; AutoAttack's inputs are kept as it runs once over all of them.
    parts = {name: [] for name in ('index', 'label', 'clean') + tuple(runs)}
    extra_parts = {name: [] for name in STAT_COLUMNS[:3] + STAT_COLUMNS[3:] * ('pgd' in attacks)} if stats else {}
    kept_x = []
    n = 0
    with atk.eval_mode(model):
        with _bar(progress, max_examples or None, 'evaluation') as bar:
            for images, labels, index in _batches(loader, max_examples, bar, device):
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                correct, extra = _attack_batch(model, images, labels, runs, stats)
                for name, value in (('index', index), ('label', labels), *correct.items()):
                    parts[name].append(value)
                for name, value in extra.items():
                    extra_parts[name].append(value)
                if 'autoattack' in attacks:
                    kept_x.append(images)
                n += labels.shape[0]
        columns = {name: torch.cat(p) if p else torch.zeros(0, dtype=torch.bool, device=device)
                   for name, p in parts.items()}
        if 'autoattack' in attacks:
            columns['autoattack'] = torch.zeros(0, dtype=torch.bool, device=device)
            if n > 0:
                columns['autoattack'] = _autoattack_correct(
                    model, torch.cat(kept_x), columns['label'], batch_size=autoattack_batch, progress=progress,
                    eps=eps, version=autoattack_version, attacks_to_run=autoattack_attacks, seed=autoattack_seed,
                    log_path=autoattack_log, norm=norm)
    extra = {'index': columns['index'], 'label': columns['label'],
             **{name: torch.cat(p) if p else torch.zeros(0, device=device) for name, p in extra_parts.items()}}
    counted = tuple(name for name in attacks if name != 'clean') + tuple(
        p.name for p in presets if in_worst(p, eps))
    table_order = tuple(a for a in EVAL_ATTACKS if a in attacks) + preset_names
    result = _assemble(n, columns, table_order, counted, extra, per_example, calibration, device)
    # The accuracies in the asked order (then presets, worst), as the final table's rows always were.
    ordered = {'n': n, **{name: result[name] for name in attacks + preset_names + ('worst',)}}
    return {**ordered, **{k: v for k, v in result.items() if k not in ordered}}
