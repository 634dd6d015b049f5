"""The final table of a run: its best and final checkpoints (and the weight EMA's), each evaluated once.

Always computed by the eager model in the run's dtype (fp32, or fp64), so the reported numbers never depend on
the speed-ups of training.engine=fast. Every random draw comes from evaluation.seed (engine.evaluate), so the same
checkpoint gives the same numbers however often it is evaluated; when the best checkpoint is the final model (chosen
at the last epoch) it is evaluated once and both rows carry that one evaluation.

Besides final.json / final.md (writers.run_files) a run folder gets, per row, examples/<row>.csv (per test image:
correct under each attack, the clean margin, confidences and NLLs: writers.examples), reliability.png (the final
row's clean and PGD reliability diagrams), robustbench.json with robustbench.safetensors (writers.robustbench) and,
when AutoAttack runs, autoattack.log (its own log, every row).
"""
import os

from engine import checkpoint
from engine.config import flat
from engine.attacks import PRESETS
from engine.evaluate import evaluate, in_worst
from engine.train.build import attack_budget, model_of, progress_on
from writers import board, examples as example_files, reliability, robustbench
from writers.run_files import write_final
from writers.tables import format_table

AUTOATTACK_LOG = 'autoattack.log'


def final_settings(cfg, n):
    e, budget = cfg.evaluation, attack_budget(cfg)
    settings = {'norm': budget['norm'], 'eps': budget['eps'], 'step_size': budget['step_size'],
                'pgd_steps': e.final_pgd_steps, 'n': n, 'seed': e.seed}
    if e.cw_steps:
        settings['cw_steps'] = e.cw_steps
    if e.autoattack:
        settings.update(autoattack_version=e.autoattack_version, autoattack_n=min(e.autoattack_n or n, n))
    if e.presets:  # only then: a run without presets keeps the final.json it always had
        settings['presets'] = {name: {**PRESETS[name].settings(), 'in_worst': in_worst(PRESETS[name], budget['eps'])}
                               for name in e.presets}
    return settings


def evaluate_final(cfg, model, batches, *, progress=False, autoattack_log=None):
    """One row of the final table and its per-example columns: (row, examples).

    Columns: clean, FGSM, PGD-20, CW, AutoAttack, one per evaluation.presets name (each with its own settings; in
    'worst' only at the run's eps, see engine.evaluate.in_worst), the per-example worst case, and the calibration
    of the clean and PGD predictions (ece_clean, nll_clean, ece_pgd, nll_pgd). AutoAttack on a smaller subset
    (evaluation.autoattack_n) runs as its own pass over the first autoattack_n images; 'worst' then excludes it and
    the examples' autoattack column is empty (None) for the images it did not attack."""
    e, budget = cfg.evaluation, attack_budget(cfg)
    attacks = ['clean'] + ['fgsm'] * e.fgsm + ['pgd'] + ['cw'] * (e.cw_steps > 0)
    same_n = e.autoattack and e.autoattack_n in (0, e.final_n)
    common = dict(norm=budget['norm'], eps=budget['eps'], step_size=budget['step_size'],
                  pgd_steps=e.final_pgd_steps, cw_steps=max(e.cw_steps, 1), autoattack_version=e.autoattack_version,
                  seed=e.seed, per_example=True, progress=progress, autoattack_log=autoattack_log)
    row = evaluate(model, batches, attacks=tuple(attacks + ['autoattack'] * same_n), max_examples=e.final_n,
                   presets=tuple(PRESETS[name] for name in e.presets), calibration=True, **common)
    per_example = row.pop('examples')
    if e.autoattack and not same_n:  # AutoAttack on its own (smaller) subset
        subset = evaluate(model, batches, attacks=('autoattack',), max_examples=e.autoattack_n, **common)
        row['autoattack'] = subset['autoattack']
        attacked = dict(zip(subset['examples']['index'].tolist(), subset['examples']['autoattack'].tolist()))
        per_example['autoattack'] = [attacked.get(i) for i in per_example['index'].tolist()]
    return row, per_example


def _write_rows_files(run_dir, rows, per_example, presets):
    for name, columns in per_example.items():
        example_files.write_examples(os.path.join(run_dir, 'examples', f'{name}.csv'), columns, presets)
    reliability.write_reliability(os.path.join(run_dir, 'reliability.png'), per_example['final'],
                                  title=f"{os.path.basename(run_dir)}: final model")


def final_table(cfg, model, loaders, run_dir, best, device, log, ema=None, best_ema=None):
    """final.json / final.md of a finished run: its best checkpoint (when one was chosen) and its final model;
    with training.weight_ema also the averaged model's best (best-ema.pt, chosen on its own evaluations) and final
    (`ema`, the averaged model) as the rows 'ema_best' and 'ema_final'. A best chosen at the last epoch is the final
    model: it is evaluated once, and the final row says so ('same_as')."""
    epochs, progress = cfg.training.epochs, progress_on(cfg)
    aa_log = os.path.join(run_dir, AUTOATTACK_LOG) if cfg.evaluation.autoattack else None
    if aa_log is not None and os.path.exists(aa_log):
        os.remove(aa_log)  # the log of an earlier, interrupted final table: this one starts it afresh
    rows, per_example, weights = {}, {}, {}
    for name, file, chosen, final_model in (('', 'best.pt', best, model), ('ema_', 'best-ema.pt', best_ema, ema)):
        if final_model is None:
            continue
        evaluated = []   # (row name, epoch, model)
        if chosen['epoch'] > 0 and chosen['epoch'] != epochs:
            best_model = model_of(cfg, loaders.image_shape[0], device)
            best_model.load_state_dict(checkpoint.load(os.path.join(run_dir, 'checkpoints', file), device)['model'])
            evaluated.append((f'{name}best', chosen['epoch'], best_model))
        evaluated.append((f'{name}final', epochs, final_model))
        for row_name, epoch, row_model in evaluated:
            if aa_log is not None:
                with open(aa_log, 'a', encoding='utf-8') as f:
                    f.write(f'== {row_name} (epoch {epoch}) ==\n')
            if progress:
                log(f'final table: {row_name} (epoch {epoch})')
            row, per_example[row_name] = evaluate_final(cfg, row_model, loaders.test, progress=progress,
                                                        autoattack_log=aa_log)
            rows[row_name] = {'epoch': epoch, **row}
            weights[row_name] = row_model
        if chosen['epoch'] == epochs:   # the best checkpoint is the final model: one evaluation, two rows
            rows[f'{name}best'] = dict(rows[f'{name}final'])
            rows[f'{name}final']['same_as'] = f'{name}best'
            per_example[f'{name}best'] = per_example[f'{name}final']
            weights[f'{name}best'] = weights[f'{name}final']
    rows = {key: rows[key] for key in ('best', 'final', 'ema_best', 'ema_final') if key in rows}
    settings = final_settings(cfg, rows['final']['n'])
    settings['best_selected_on'] = 'validation PGD' if loaders.val is not None else 'test PGD (no validation split)'
    # Logged before the files are written: a full disk or a read-only folder then loses the write, not the table.
    log(f'{run_dir}/final.md:\n{format_table(rows, settings)}')
    _write_rows_files(run_dir, rows, per_example, cfg.evaluation.presets)
    exported = robustbench.exported_row(rows)
    robustbench.write(run_dir, rows[exported], settings, arch=cfg.model.arch, dataset=cfg.data.dataset,
                      checkpoint=exported, state_dict=weights[exported].state_dict())
    write_final(run_dir, rows, settings, method=cfg.method.name, seed=cfg.training.seed)
    board.write_final_board(run_dir, flat(cfg), rows)
