"""PNG plots of the many-seed comparison: mean curve with 95% CI band per method, and final metrics with CIs.

Drawn on matplotlib Figure objects with the Agg canvas directly (no pyplot): no global figure state and no display
needed, so it works on headless machines and inside tests. build_figures returns the Figure objects (a test can
inspect their artists); write_plots saves them.

What the summary may say about the runs is optional: summary["setting"] (dataset, arch, the training attack, the
final table's evaluation) and summary["groups"][g]["params"] (the params.json keys common to a group's runs) label
the plots when present; an old summary without them still gets every plot, with plainer titles.
"""
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from engine.stats import column_mean_ci95
from writers.atomic import atomic_path

DPI = 120
ACCURACY_RANGE = (0.0, 100.0)
NON_NEGATIVE = (0.0, None)  # a norm cannot be negative, whatever the t interval says
# engine/step.py: global_grad_norm of every parameter's .grad right after backward (and fp16 unscaling; averaged
# over ranks under torchrun), before the SGD step adds weight decay; engine/train/run_state.py end_epoch divides the
# epoch's sum of these per-step norms by its number of steps.
GRAD_NORM_LABEL = ("gradient norm: L2 norm of the training loss's gradient over all\n"
                   "parameters, per step before weight decay; mean over the epoch's steps")
# Train and test curves differ three ways (line style, band fill vs hatching, band alpha), so they stay apart when
# printed in grey or when one method's bands overlap another's.
STYLES = {
    "test": {"linestyle": "-", "band": {"alpha": 0.25}},
    "train": {"linestyle": "--", "band": {"alpha": 0.6, "hatch": "///", "facecolor": "none"}},
}
SGLS_LINESTYLE = ":"


def _color(index):
    return f"C{index % 10}"


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _dict(value):
    return value if isinstance(value, dict) else {}


def _setting(summary):
    return _dict(_dict(summary).get("setting"))


def _group_params(summary, group):
    return _dict(_dict(_dict(_dict(summary).get("groups")).get(group)).get("params"))


def _has_point(record, key):
    return isinstance(record.get("epoch"), int) and record["epoch"] >= 1 and _is_number(record.get(key))


def _epoch_matrix(runs_metrics, key):
    """(runs x epochs) matrix of one per-epoch key, NaN where a run has no value; (None, None) if no run has it."""
    epochs = [record["epoch"] for metrics in runs_metrics for record in metrics if _has_point(record, key)]
    if not epochs:
        return None, None
    matrix = np.full((len(runs_metrics), max(epochs)), np.nan)
    for run_index, metrics in enumerate(runs_metrics):
        for record in metrics:
            if _has_point(record, key):
                matrix[run_index, record["epoch"] - 1] = record[key]
    return np.arange(1, matrix.shape[1] + 1), matrix


def _eps_text(norm, eps):
    """The radius as the config gives it: attack.eps is in 1/255 for linf, in pixel units for l2."""
    return f"L2 eps {eps:g}" if norm == "l2" else f"L-inf eps {eps:g}/255"


def _test_images(params, setting):
    """How many test images the per-epoch evaluation used, or None when the summary does not say.

    evaluation.subset caps the count (0 = all); the test set's size is known only when the final table ran on
    all of it (evaluation.final_n 0), as setting.eval.n then is that size."""
    subset = params.get("evaluation.subset")
    final_n = _dict(setting.get("eval")).get("n")
    test_size = final_n if _is_int(final_n) and params.get("evaluation.final_n") == 0 else None
    if not _is_int(subset):
        return None
    if subset == 0:
        return test_size
    return min(subset, test_size) if test_size else subset


def epoch_attack_text(params, setting):
    """The per-epoch evaluation, e.g. 'PGD-10 on 1000 test images, L-inf eps 8/255', or None when unknown. It
    attacks with the training attack's eps and step (engine.train.run_state.evaluate_epoch), not the final
    table's settings."""
    steps = params.get("evaluation.pgd_steps")
    if not _is_int(steps):
        return None
    text = f"PGD-{steps}"
    images = _test_images(params, setting)
    if images:
        text += f" on {images} test images"
    elif params.get("evaluation.subset") == 0:
        text += " on all test images"
    if _is_number(params.get("attack.eps")):
        text += f", {_eps_text(params.get('attack.norm', 'linf'), params['attack.eps'])}"
    return text


def _per_group_text(groups, text_of):
    """One text for all groups when they agree, else 'group: text' for each group that has one."""
    texts = {group: text_of(group) for group in groups}
    known = {group: text for group, text in texts.items() if text}
    if not known:
        return None
    if len(set(known.values())) == 1 and len(known) == len(texts):
        return next(iter(known.values()))
    return "; ".join(f"{group}: {text}" for group, text in known.items())


def _train_attack_steps(params, setting):
    steps = params.get("attack.steps", _dict(setting.get("train_attack")).get("steps"))
    return steps if _is_int(steps) else None


def sgls_start_epoch(summary, group):
    """The 1-based epoch from which an SGLS group trains on soft labels, or None (not SGLS, or not recorded)."""
    params = _group_params(summary, group)
    name, start = params.get("method.name"), params.get("method.sgls_start_epoch")
    return start if isinstance(name, str) and name.startswith("sgls") and _is_int(start) else None


def _draw_band(axes, epochs, matrix, color, kind, label, limits, gid):
    """Mean line and 95% t CI band of one (runs x epochs) matrix, styled as a `kind` ('test' or 'train') curve;
    the line's gid is `gid`, the band's `gid`/band (for tests and for anyone post-processing the figure). Returns
    the legend entry: (handle, label), the handle the line over its band so the legend shows both styles."""
    count, mean, low, high = column_mean_ci95(matrix)
    if limits is not None:  # a t interval can pass 0% or 100% (or 0 for a norm); the quantity cannot
        low, high = np.clip(low, *limits), np.clip(high, *limits)
    style = STYLES[kind]
    # Only epochs some run evaluated; dropping the gaps keeps the line continuous across unevaluated epochs.
    evaluated = count > 0
    n_runs = int(count.max())
    (line,) = axes.plot(epochs[evaluated], mean[evaluated], color=color, linestyle=style["linestyle"], gid=gid)
    # With a single run per epoch there is no CI: draw the line alone rather than a zero-width band.
    has_band = count >= 2
    if has_band.any():
        band = {"color": color, "linewidth": 0, **style["band"]}
        if "facecolor" in band:  # hatched: the hatching takes the colour, the face stays empty
            band["edgecolor"] = band.pop("color")
        patch = axes.fill_between(epochs[has_band], low[has_band], high[has_band], gid=f"{gid}/band", **band)
        return (patch, line), f"{label} (n={n_runs} runs)"
    return line, f"{label} (n={n_runs} runs)"


def _title_prefix(setting):
    about = " ".join(str(setting[key]) for key in ("dataset", "arch") if isinstance(setting.get(key), str))
    return f"{about}: " if about else ""


def _curve_figure(curves, summary, series, title, ylabel, limits):
    """One mean line with CI band per (group, series entry), series = [(metric key, 'test' | 'train', label of
    group)]; a dotted vertical line at each SGLS group's start epoch. None when no group has any of the keys."""
    figure = Figure(figsize=(9, 5.5), layout="constrained")
    axes = figure.add_subplot()
    last_epoch, legend = 0, []
    for index, (group, runs_metrics) in enumerate(curves.items()):
        for key, kind, label_of in series:
            epochs, matrix = _epoch_matrix(runs_metrics, key)
            if matrix is not None:
                legend.append(_draw_band(axes, epochs, matrix, _color(index), kind, f"{group} {label_of(group)}",
                                         limits, gid=f"{group}/{key}"))
                last_epoch = max(last_epoch, int(epochs[-1]))
    if not last_epoch:
        return None
    for index, group in enumerate(curves):
        start = sgls_start_epoch(summary, group)
        if start is not None and start <= last_epoch:  # a run shorter than the start never trained with SGLS
            marker = axes.axvline(start, color=_color(index), linestyle=SGLS_LINESTYLE, linewidth=1.5,
                                  gid=f"{group}/sgls_start")
            legend.append((marker, f"{group}: SGLS from epoch {start}"))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    axes.set_title(f"{_title_prefix(_setting(summary))}{title}", fontsize="medium")
    axes.set(xlabel="epoch", ylabel=ylabel)
    axes.grid(alpha=0.3)
    axes.legend(*zip(*legend), fontsize="small", title="mean and 95% t CI over runs", title_fontsize="small")
    return figure


def robust_figure(curves, summary):
    """Test PGD accuracy of the per-epoch evaluation (solid, filled band) and train robust accuracy, the
    accuracy on the training attack's examples as the step trained on them (dashed, hatched band)."""
    setting = _setting(summary)
    test = _per_group_text(curves, lambda g: epoch_attack_text(_group_params(summary, g), setting))

    def train_label(group):
        steps = _train_attack_steps(_group_params(summary, group), setting)
        return f"train (robust, PGD-{steps} of the training attack)" if steps else "train (robust, training attack)"

    def test_label(group):
        steps = _group_params(summary, group).get("evaluation.pgd_steps")
        return f"test (PGD-{steps})" if _is_int(steps) else "test (PGD)"

    return _curve_figure(curves, summary, [("test_pgd_acc", "test", test_label),
                                           ("train_robust_acc", "train", train_label)],
                         "robust accuracy per epoch" + (f"\ntest: {test}" if test else ""),
                         "robust accuracy (%)", ACCURACY_RANGE)


def clean_figure(curves, summary):
    """Clean accuracy: test subset (solid) and the training batches before their attack (dashed)."""
    setting = _setting(summary)
    images = _per_group_text(curves, lambda g: _test_images(_group_params(summary, g), setting))
    test = f"test: {images} test images per epoch" if images else ""
    return _curve_figure(curves, summary, [("test_clean_acc", "test", lambda g: "test"),
                                           ("train_clean_acc", "train", lambda g: "train (clean training batches)")],
                         "clean accuracy per epoch" + (f"\n{test}" if test else ""), "clean accuracy (%)",
                         ACCURACY_RANGE)


def grad_norm_figure(curves, summary):
    return _curve_figure(curves, summary, [("grad_norm", "train", lambda g: "train")],
                         "gradient norm per epoch", GRAD_NORM_LABEL, NON_NEGATIVE)


def _column_label(column, evaluation):
    """A final-table column with its attack's settings where the summary has them (PGD-20, CW-30, ...)."""
    steps = {"pgd": "pgd_steps", "cw": "cw_steps"}
    if column in steps and _is_int(evaluation.get(steps[column])):
        return f"{column.upper() if column == 'pgd' else 'CW'}-{evaluation[steps[column]]}"
    if column == "autoattack" and isinstance(evaluation.get("autoattack_version"), str):
        return f"AutoAttack\n({evaluation['autoattack_version']})"
    return column


# Final-table columns by unit: accuracies share an axis; ECE (percent, but 0 is best) and NLL (nats, unbounded)
# would be misread on it, so each has its own panel row.
FINAL_KINDS = (("accuracy", "accuracy (%)"), ("ece", "ECE (%, 15 bins)"), ("nll", "NLL (nats)"))


def _column_kind(column):
    return next((kind for kind, _ in FINAL_KINDS[1:] if column.startswith(kind)), "accuracy")


def final_metrics_figure(summary):
    """Mean and 95% t CI of each final-table column, methods side by side: one panel column per row of final.json
    (best, final, and the weight-EMA rows where recorded), one panel row per unit (accuracy, ECE, NLL)."""
    methods = list(summary["groups"])
    evaluation = _dict(_setting(summary).get("eval"))
    # "row.column" metrics that some group recorded, in summary order (compare orders the rows best, final,
    # ema_best, ema_final); the gap metrics have no row and are not final-table columns.
    recorded = [metric.split(".", 1) for metric in summary["metrics"] if "." in metric
                and any(metric in group["metrics"] for group in summary["groups"].values())]
    rows = list(dict.fromkeys(row for row, _ in recorded))
    if not rows:
        return None
    columns_of = {(row, kind): [column for r, column in recorded if r == row and _column_kind(column) == kind]
                  for row in rows for kind, _ in FINAL_KINDS}
    kinds = [(kind, label) for kind, label in FINAL_KINDS if any(columns_of[(row, kind)] for row in rows)]
    figure = Figure(figsize=(5 * len(rows), 1.2 + 3.6 * len(kinds)), layout="constrained")
    panels = figure.subplots(len(kinds), len(rows), sharey="row", squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for (kind, ylabel), panel_row in zip(kinds, panels):
        for row, axes in zip(rows, panel_row):
            columns = columns_of[(row, kind)]
            for index, method in enumerate(methods):
                for position, column in enumerate(columns):
                    stat = summary["groups"][method]["metrics"].get(f"{row}.{column}")
                    if stat is None:
                        continue
                    x = position - 0.4 + width * (index + 0.5)
                    # n=1: no CI, so a bare point (yerr=None) instead of a misleading zero-length bar.
                    yerr = None if stat.get("ci95_t") is None else [[stat["mean"] - stat["ci95_t"][0]],
                                                                   [stat["ci95_t"][1] - stat["mean"]]]
                    axes.errorbar([x], [stat["mean"]], yerr=yerr, fmt="o", color=_color(index), capsize=4,
                                  label=method)
            axes.set_xticks(range(len(columns)), [_column_label(column, evaluation) for column in columns])
            if kind == kinds[0][0]:
                axes.set_title(f"{row} row (mean, 95% t CI over seeds)", fontsize="medium")
            axes.grid(axis="y", alpha=0.3)
        panel_row[0].set_ylabel(ylabel)
    text = evaluation.get("text")
    figure.suptitle(f"{_title_prefix(_setting(summary))}final table" + (f": {text}" if isinstance(text, str) else ""))
    # Every point carries its method's label; keep one legend entry per method, from any panel.
    legend_entries = {}
    for axes in panels.flat:
        for handle, label in zip(*axes.get_legend_handles_labels()):
            legend_entries.setdefault(label, handle)
    figure.legend(legend_entries.values(), legend_entries.keys(), loc="outside right upper", fontsize="small")
    return figure


def build_figures(curves, summary):
    """{file name: Figure} of every plot that has data, in the order write_plots writes them."""
    figures = {"robust_acc.png": robust_figure(curves, summary), "clean_acc.png": clean_figure(curves, summary),
               "grad_norm.png": grad_norm_figure(curves, summary), "final_metrics.png": final_metrics_figure(summary)}
    return {name: figure for name, figure in figures.items() if figure is not None}


def _save(figure, path):
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=DPI, format="png")
    return path


def write_plots(curves, summary, out_dir):
    """Write the PNGs into out_dir and return the paths written (a plot with no data at all is left out).

    curves: {group: [per-epoch metric dicts of each run]} (metrics.jsonl contents); summary: compare's dict.
    """
    return [_save(figure, os.path.join(out_dir, name)) for name, figure in build_figures(curves, summary).items()]
