"""The final table of a run (best and final checkpoints) and `run.py eval` of a saved checkpoint.

Always computed by the eager model in the run's dtype (fp32, or fp64), so the reported numbers never depend on
the speed-ups of training.engine=fast.
"""
import os

from engine import checkpoint, config as config_mod
from engine.attacks import PRESETS
from engine.data.datasets import dataset
from engine.errors import UserError
from engine.evaluate import evaluate, in_worst
from engine.train.build import attack_budget, model_of, open_data, resolve_device, synthetic_spec
from writers.run_files import write_eval, write_final
from writers.tables import format_table

# Overrides that change the network's tensors (layers, widths, classes, input channels): a checkpoint's weights
# fit only the values it was trained with.
MODEL_KEYS = ('model.', 'data.dataset', 'data.synthetic_classes', 'data.synthetic_shape')


def final_settings(cfg, n):
    e, budget = cfg.evaluation, attack_budget(cfg)
    settings = {'eps': budget['eps'], 'step_size': budget['step_size'], 'pgd_steps': e.final_pgd_steps, 'n': n}
    if e.cw_steps:
        settings['cw_steps'] = e.cw_steps
    if e.autoattack:
        settings.update(autoattack_version=e.autoattack_version, autoattack_n=min(e.autoattack_n or n, n))
    if e.presets:  # only then: a run without presets keeps the final.json it always had
        settings['presets'] = {name: {**PRESETS[name].settings(), 'in_worst': in_worst(PRESETS[name], budget['eps'])}
                               for name in e.presets}
    return settings


def evaluate_final(cfg, model, loader):
    """One row of the final table: clean, FGSM, PGD-20, CW-inf, AutoAttack, one column per evaluation.presets name
    (each with its own settings; in 'worst' only at the run's eps, see engine.evaluate.in_worst) and the
    per-example worst case."""
    e, budget = cfg.evaluation, attack_budget(cfg)
    attacks = ['clean'] + ['fgsm'] * e.fgsm + ['pgd'] + ['cw'] * (e.cw_steps > 0)
    same_n = e.autoattack and e.autoattack_n in (0, e.final_n)
    common = dict(eps=budget['eps'], step_size=budget['step_size'], pgd_steps=e.final_pgd_steps,
                  cw_steps=max(e.cw_steps, 1), autoattack_version=e.autoattack_version)
    row = evaluate(model, loader, attacks=tuple(attacks + ['autoattack'] * same_n), max_examples=e.final_n,
                   presets=tuple(PRESETS[name] for name in e.presets), preset_seed=cfg.training.seed, **common)
    if e.autoattack and not same_n:  # AutoAttack on its own (smaller) subset; 'worst' then excludes it
        row['autoattack'] = evaluate(model, loader, attacks=('autoattack',), max_examples=e.autoattack_n,
                                     **common)['autoattack']
    return row


def final_table(cfg, model, loaders, run_dir, best, device, log, ema=None, best_ema=None):
    """final.json / final.md of a finished run: its best checkpoint (when one was chosen) and its final model;
    with training.weight_ema also the averaged model's best (best-ema.pt, chosen on its own evaluations) and final
    (`ema`, the averaged model) as the rows 'ema_best' and 'ema_final'."""
    rows = {}
    for name, file, chosen, final_model in (('', 'best.pt', best, model), ('ema_', 'best-ema.pt', best_ema, ema)):
        if final_model is None:
            continue
        if chosen['epoch'] > 0:
            best_model = model_of(cfg, loaders.image_shape[0], device)
            best_model.load_state_dict(checkpoint.load(os.path.join(run_dir, 'checkpoints', file), device)['model'])
            rows[f'{name}best'] = {'epoch': chosen['epoch'], **evaluate_final(cfg, best_model, loaders.test)}
        rows[f'{name}final'] = {'epoch': cfg.training.epochs, **evaluate_final(cfg, final_model, loaders.test)}
    settings = final_settings(cfg, rows['final']['n'])
    settings['best_selected_on'] = 'validation PGD' if loaders.val is not None else 'test PGD (no validation split)'
    # Logged before the files are written: a full disk or a read-only folder then loses the write, not the table.
    log(f'{run_dir}/final.md:\n{format_table(rows, settings)}')
    write_final(run_dir, rows, settings, method=cfg.method.name, seed=cfg.training.seed)


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


def _load_weights(path, state, params, cfg, model):
    """The checkpoint's weights into model, or a UserError naming the overrides that made the model different."""
    why = _misfit(model.state_dict(), state['model'])
    if why is None:
        try:
            model.load_state_dict(state['model'])
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


def eval_checkpoint(path, cli_args=(), log=print):
    """`run.py eval --checkpoint PATH`: the final-table evaluation of a saved model, with its own config."""
    state = checkpoint.load(path)
    # Eval writes beside the checkpoint, never into output.*: an old run's name (say 'sweep/a', allowed before
    # output.name had to be one folder) must not stop its evaluation.
    params = {key: value for key, value in state['params'].items() if not key.startswith('output.')}
    cfg = config_mod.load(cli_args=cli_args, base=params, advise=False)
    device = resolve_device(cfg.training.device)
    # The model is built and loaded before any data is opened: an override that does not fit fails at once.
    in_channels = dataset(cfg.data.dataset).image_shape(synthetic_spec(cfg.data))[0]
    model = model_of(cfg, in_channels, device)
    _load_weights(path, state, params, cfg, model)
    loaders, _ = open_data(cfg, device, log)
    row = {'epoch': state['progress']['epoch'], **evaluate_final(cfg, model, loaders.test)}
    stem, settings = os.path.splitext(path)[0], final_settings(cfg, row['n'])
    # Logged before the files are written: a failed write (read-only folder, full disk) loses nothing.
    log(f'{stem}-eval.md:\n{format_table({os.path.basename(path): row}, settings)}')
    write_eval(stem, path, row, settings)
    return row
