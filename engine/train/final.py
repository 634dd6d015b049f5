"""The final table of a run (best and final checkpoints) and `run.py eval` of a saved checkpoint.

Always computed by the eager model in the run's dtype (fp32, or fp64), so the reported numbers never depend on
the speed-ups of training.engine=fast.
"""
import os

from engine import checkpoint, config as config_mod
from engine.evaluate import evaluate
from engine.train.build import attack_budget, model_of, open_data, resolve_device
from writers.run_files import write_eval, write_final


def final_settings(cfg, n):
    e, budget = cfg.evaluation, attack_budget(cfg)
    settings = {'eps': budget['eps'], 'step_size': budget['step_size'], 'pgd_steps': e.final_pgd_steps, 'n': n}
    if e.cw_steps:
        settings['cw_steps'] = e.cw_steps
    if e.autoattack:
        settings.update(autoattack_version=e.autoattack_version, autoattack_n=min(e.autoattack_n or n, n))
    return settings


def evaluate_final(cfg, model, loader):
    """One row of the final table: clean, FGSM, PGD-20, CW-inf, AutoAttack and the per-example worst case."""
    e, budget = cfg.evaluation, attack_budget(cfg)
    attacks = ['clean'] + ['fgsm'] * e.fgsm + ['pgd'] + ['cw'] * (e.cw_steps > 0)
    same_n = e.autoattack and e.autoattack_n in (0, e.final_n)
    common = dict(eps=budget['eps'], step_size=budget['step_size'], pgd_steps=e.final_pgd_steps,
                  cw_steps=max(e.cw_steps, 1), autoattack_version=e.autoattack_version)
    row = evaluate(model, loader, attacks=tuple(attacks + ['autoattack'] * same_n), max_examples=e.final_n,
                   **common)
    if e.autoattack and not same_n:  # AutoAttack on its own (smaller) subset; 'worst' then excludes it
        row['autoattack'] = evaluate(model, loader, attacks=('autoattack',), max_examples=e.autoattack_n,
                                     **common)['autoattack']
    return row


def final_table(cfg, model, loaders, run_dir, best, device, log):
    """final.json / final.md of a finished run: its best checkpoint (when one was chosen) and its final model."""
    rows = {}
    if best['epoch'] > 0:
        best_model = model_of(cfg, loaders.image_shape[0], device)
        best_model.load_state_dict(checkpoint.load(os.path.join(run_dir, 'checkpoints', 'best.pt'), device)['model'])
        rows['best'] = {'epoch': best['epoch'], **evaluate_final(cfg, best_model, loaders.test)}
    rows['final'] = {'epoch': cfg.training.epochs, **evaluate_final(cfg, model, loaders.test)}
    settings = final_settings(cfg, rows['final']['n'])
    settings['best_selected_on'] = 'validation PGD' if loaders.val is not None else 'test PGD (no validation split)'
    table = write_final(run_dir, rows, settings, method=cfg.method.name, seed=cfg.training.seed)
    log(f'{run_dir}/final.md:\n{table}')


def eval_checkpoint(path, cli_args=(), log=print):
    """`run.py eval --checkpoint PATH`: the final-table evaluation of a saved model, with its own config."""
    state = checkpoint.load(path)
    cfg = config_mod.load(cli_args=cli_args, base=state['params'])
    device = resolve_device(cfg.training.device)
    loaders, _ = open_data(cfg, device, log)
    model = model_of(cfg, loaders.image_shape[0], device)
    model.load_state_dict(state['model'])
    row = {'epoch': state['progress']['epoch'], **evaluate_final(cfg, model, loaders.test)}
    stem = os.path.splitext(path)[0]
    table = write_eval(stem, path, row, final_settings(cfg, row['n']))
    log(f'{stem}-eval.md:\n{table}')
    return row
