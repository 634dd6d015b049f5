"""Text a person reads: the final-table Markdown and the per-epoch log line."""

# Column order of the final table; 'worst' = correct under every attack evaluated (at the run's eps). The columns
# of settings['presets'] (evaluation.presets) come before 'worst'.
TABLE_COLUMNS = ('clean', 'fgsm', 'pgd', 'cw', 'autoattack', 'worst')
# Calibration (engine.calibration), after the accuracies: ECE in percent (15 equal-width bins), NLL in nats.
CALIBRATION_COLUMNS = ('ece_clean', 'nll_clean', 'ece_pgd', 'nll_pgd')
START_TEXT = {'uniform': 'uniform start', 'normal': '0.001 N(0, 1) start', 'none': 'no random start'}


def _over_255(value: float) -> str:
    """8/255 for 0.0313..., 2.5/255 when not a whole number of 1/255 steps."""
    k = round(value * 255, 4)
    return f'{k:g}/255'


def _pixels(value: float) -> str:
    """8/255 when value is a whole number of 1/255 steps, else the decimal (0.031, 0.003) as the source gives it."""
    k = value * 255
    return _over_255(value) if abs(k - round(k)) < 1e-6 else f'{value:g}'


def preset_line(name: str, p: dict) -> str:
    """'pgd20_sgls: eps 0.031, step 0.003, 20 steps, uniform start unclamped, CE loss, BN eval (source); ...'"""
    start = START_TEXT.get(p['start'], p['start'])
    if p['start'] == 'uniform':
        start += ' clamped to [0, 1]' if p['clamp_start'] else ' unclamped'
    worst = "counted in worst" if p.get('in_worst') else "not counted in worst (not the run's eps)"
    return (f"{name}: eps {_pixels(p['eps'])}, step {_pixels(p['step_size'])}, {p['steps']} steps, {start}, "
            f"{p['loss'].upper()} loss, BN {p['bn_mode']} ({p['source']}); {worst}")


def format_table(rows: dict[str, dict], settings: dict) -> str:
    """Markdown table: one row per key (e.g. 'best', 'final'); columns epoch (if any row has it) and the
    accuracies present in any row (2 decimals); then a line with the evaluation settings and one line per preset."""
    presets = settings.get('presets') or {}
    order = ('epoch',) + TABLE_COLUMNS[:-1] + tuple(presets) + TABLE_COLUMNS[-1:] + CALIBRATION_COLUMNS
    columns = [c for c in order if any(c in row for row in rows.values())]
    lines = ['| checkpoint | ' + ' | '.join(columns) + ' |',
             '|---|' + '---:|' * len(columns)]
    for label, row in rows.items():
        cells = []
        for column in columns:
            value = row.get(column)
            if value is None:
                cells.append('-')
            elif column == 'epoch':
                cells.append(str(int(value)))
            elif column.startswith('nll_'):
                cells.append(f'{value:.3f}')
            else:
                cells.append(f'{value:.2f}')
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')

    described = []
    l2 = settings.get('norm') == 'l2'   # L2 radii in pixel units of [0, 1] images; L-inf ones in 1/255
    radius = (lambda v: f'{v:g}') if l2 else _over_255
    if 'eps' in settings:
        described.append(f"{'L2' if l2 else 'L-inf'} eps = {radius(settings['eps'])}")
    if 'step_size' in settings:
        described.append(f"step size = {radius(settings['step_size'])}")
    for key, text in (('pgd_steps', 'PGD steps'), ('cw_steps', 'CW steps'),
                      ('autoattack_version', 'AutoAttack version')):
        if key in settings:
            described.append(f'{text} = {settings[key]}')
    if 'n' in settings:
        described.append(f"n = {settings['n']} examples")
    if settings.get('autoattack_n') not in (None, settings.get('n')):
        described.append(f"AutoAttack on the first {settings['autoattack_n']} of them")
    if 'seed' in settings:
        described.append(f"evaluation seed = {settings['seed']}")
    if 'best_selected_on' in settings:
        described.append(f"best checkpoint chosen on {settings['best_selected_on']}")
    if any(c in row for row in rows.values() for c in CALIBRATION_COLUMNS):
        described.append('ece_*: expected calibration error in % (15 equal-width confidence bins), nll_*: mean '
                         'negative log-likelihood in nats, on the clean and on the PGD inputs')
    same = [f'{label} = {row["same_as"]}' for label, row in rows.items() if row.get('same_as')]
    if same:
        described.append(f"{'; '.join(same)} (the same model, evaluated once)")
    footer = [f'- {preset_line(name, p)}' for name, p in presets.items()]
    return '\n'.join(lines) + '\n\n' + ', '.join(described) + '\n' + ''.join(f'{line}\n' for line in footer)


def epoch_line(r: dict) -> str:
    """One finished epoch of metrics.jsonl as a log line ('-' for what was not measured)."""
    def f(key, fmt='{:.2f}'):
        return fmt.format(r[key]) if r.get(key) is not None else '-'
    return (f"epoch {r['epoch']:>3} lr {r['lr']:.4g} loss {f('train_loss', '{:.4f}')} "
            f"train clean/rob {f('train_clean_acc')}/{f('train_robust_acc')} "
            f"test clean/pgd {f('test_clean_acc')}/{f('test_pgd_acc')} val pgd {f('val_pgd_acc')} "
            f"|g| {f('grad_norm', '{:.3f}')} {f('epoch_time_s', '{:.1f}')}s {f('images_per_s', '{:.0f}')} img/s")
