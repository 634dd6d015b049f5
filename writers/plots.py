"""PNG plots of the many-seed comparison: mean curve with 95% CI band per method, and final metrics with CIs.

Drawn on matplotlib Figure objects with the Agg canvas directly (no pyplot): no global figure state and no display
needed, so it works on headless machines and inside tests.
"""
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from engine.stats import column_mean_ci95
from writers.atomic import atomic_path

DPI = 120


def _color(index):
    return f"C{index % 10}"


def _has_point(record, key):
    return isinstance(record.get("epoch"), int) and record["epoch"] >= 1 and isinstance(record.get(key), (int, float))


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


def _draw_band(axes, epochs, matrix, color, linestyle, label, limits=None):
    count, mean, low, high = column_mean_ci95(matrix)
    if limits is not None:  # a t interval can pass 0% or 100%; accuracy cannot
        low, high = np.clip(low, *limits), np.clip(high, *limits)
    # Only epochs some run evaluated; dropping the gaps keeps the line continuous across unevaluated epochs.
    evaluated = count > 0
    n_runs = int(count.max())
    axes.plot(epochs[evaluated], mean[evaluated], color=color, linestyle=linestyle, label=f"{label} (n={n_runs})")
    # With a single run per epoch there is no CI: draw the line alone rather than a zero-width band.
    has_band = count >= 2
    if has_band.any():
        axes.fill_between(epochs[has_band], low[has_band], high[has_band], color=color, alpha=0.2, linewidth=0)


def _save(figure, path):
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=DPI, format="png")
    return path


def _curve_plot(curves, series, title, ylabel, path, limits=None):
    """One line per (method, key) in series [(key, linestyle, suffix)]; returns the path, or None if no data."""
    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.add_subplot()
    drew = False
    for index, (method, runs_metrics) in enumerate(curves.items()):
        for key, linestyle, suffix in series:
            epochs, matrix = _epoch_matrix(runs_metrics, key)
            if matrix is not None:
                _draw_band(axes, epochs, matrix, _color(index), linestyle, f"{method}{suffix}", limits)
                drew = True
    if not drew:
        return None
    axes.set(title=title, xlabel="epoch", ylabel=ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, path)


def _final_metrics_plot(summary, path):
    """Mean and 95% t CI of each row column, methods side by side; best and final rows in two panels."""
    methods = list(summary["groups"])
    figure = Figure(figsize=(10, 4.5), layout="constrained")
    panels = figure.subplots(1, 2, sharey=True)
    drew = False
    for axes, row in zip(panels, ("best", "final")):
        # Columns in summary order, kept if any method recorded them (autoattack may be off everywhere).
        columns = [metric.split(".", 1)[1] for metric in summary["metrics"] if metric.startswith(f"{row}.")
                   and any(metric in group["metrics"] for group in summary["groups"].values())]
        width = 0.8 / max(len(methods), 1)
        for index, method in enumerate(methods):
            for position, column in enumerate(columns):
                stat = summary["groups"][method]["metrics"].get(f"{row}.{column}")
                if stat is None:
                    continue
                x = position - 0.4 + width * (index + 0.5)
                # n=1: no CI, so a bare point (yerr=None) instead of a misleading zero-length bar.
                yerr = None if stat["ci95_t"] is None else [[stat["mean"] - stat["ci95_t"][0]],
                                                           [stat["ci95_t"][1] - stat["mean"]]]
                axes.errorbar([x], [stat["mean"]], yerr=yerr, fmt="o", color=_color(index), capsize=4, label=method)
                drew = True
        axes.set_xticks(range(len(columns)), columns)
        axes.set_title(f"{row} row (mean, 95% CI over seeds)")
        axes.grid(axis="y", alpha=0.3)
    if not drew:
        return None
    panels[0].set_ylabel("accuracy (%)")
    # Every point carries its method's label; keep one legend entry per method, from either panel.
    legend_entries = {}
    for axes in panels:
        for handle, label in zip(*axes.get_legend_handles_labels()):
            legend_entries.setdefault(label, handle)
    figure.legend(legend_entries.values(), legend_entries.keys(), loc="outside right upper", fontsize="small")
    return _save(figure, path)


def write_plots(curves, summary, out_dir):
    """Write the PNGs into out_dir and return the paths written (a plot with no data at all is left out).

    curves: {method: [per-epoch metric dicts of each run]} (metrics.jsonl contents); summary: compare's dict.
    """
    planned = [
        _curve_plot(curves, [("test_pgd_acc", "-", " test PGD"), ("train_robust_acc", "--", " train robust")],
                    "Robust accuracy per epoch: test PGD (solid) vs train (dashed)", "robust accuracy (%)",
                    os.path.join(out_dir, "robust_acc.png"), limits=(0, 100)),
        _curve_plot(curves, [("test_clean_acc", "-", "")], "Clean test accuracy per epoch", "clean accuracy (%)",
                    os.path.join(out_dir, "clean_acc.png"), limits=(0, 100)),
        _curve_plot(curves, [("grad_norm", "-", "")], "Gradient norm per epoch", "grad norm",
                    os.path.join(out_dir, "grad_norm.png")),
        _final_metrics_plot(summary, os.path.join(out_dir, "final_metrics.png")),
    ]
    return [path for path in planned if path is not None]
