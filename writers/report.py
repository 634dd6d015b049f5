"""Files of the many-seed comparison: summary.json, summary.csv and report.md (from engine.compare's summary dict).

Every file is written to a temporary name in the same folder and moved into place with os.replace, so a reader
(or a crash) never sees half a file.
"""
import csv
import io
import os

from writers.atomic import write_text_atomic

METRIC_LABELS = {
    "clean": "clean", "pgd": "PGD", "cw": "CW", "autoattack": "AutoAttack", "worst": "worst case",
    "robust_overfit_gap": "robust overfitting gap (best PGD - final PGD)",
    "train_test_robust_gap": "train - test robust gap (last evaluated epoch)",
}
ROW_TITLES = {"best": "Best checkpoint", "final": "Final epoch"}
CSV_COLUMNS = ("method", "metric", "n", "mean", "std", "sem", "ci95_t_low", "ci95_t_high", "ci95_boot_low",
               "ci95_boot_high", "diff_vs_baseline", "diff_ci95_low", "diff_ci95_high", "p_welch", "p_paired",
               "cohens_d", "dz")


def _metric_label(metric):
    return METRIC_LABELS.get(metric.split(".")[-1], metric)


def _comparison(summary, method, metric):
    return summary["comparisons"].get(method, {}).get(metric) or {}


def write_summary_csv(summary, path):
    """One row per method x metric: the summary statistics, plus the test against the baseline (empty for it)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for method, group in summary["groups"].items():
        for metric, stat in group["metrics"].items():
            test = _comparison(summary, method, metric)
            welch, paired = test.get("welch") or {}, test.get("paired") or {}
            ci_t, ci_boot, diff_ci = stat["ci95_t"] or (None, None), stat["ci95_boot"] or (None, None), \
                welch.get("ci95") or (None, None)
            row = (method, metric, stat["n"], stat["mean"], stat["std"], stat["sem"], *ci_t, *ci_boot,
                   welch.get("diff"), *diff_ci, welch.get("p"), paired.get("p"), test.get("cohens_d"), test.get("dz"))
            writer.writerow("" if value is None else value for value in row)
    write_text_atomic(path, buffer.getvalue())


def _number(value, digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}"


def _p_value(value):
    if value is None:
        return "n/a"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _interval(bounds, digits=2):
    return "n/a" if bounds is None else f"[{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _summary_table(summary, metrics):
    rows = []
    for metric in metrics:
        for method, group in summary["groups"].items():
            stat = group["metrics"].get(metric)
            if stat is None:
                continue
            spread = f"{stat['mean']:.2f}" if stat["std"] is None else f"{stat['mean']:.2f} ± {stat['std']:.2f}"
            rows.append((_metric_label(metric), method, stat["n"], spread, _interval(stat["ci95_t"]),
                         _interval(stat["ci95_boot"])))
    return _table(("metric", "method", "n", "mean ± std", "95% CI (t)", "95% CI (bootstrap)"), rows)


def _difference_table(summary):
    rows, notes = [], {}
    for method, by_metric in summary["comparisons"].items():
        for metric in summary["metrics"]:
            test = by_metric.get(metric)
            if test is None:
                continue
            if test.get("note"):
                notes.setdefault(method, set()).add(test["note"])
            welch, paired = test["welch"] or {}, test["paired"] or {}
            effect = f"d = {_number(test['cohens_d'])}"
            if test["dz"] is not None:
                effect += f"; dz = {_number(test['dz'])}"
            rows.append((method, metric, _number(welch.get("diff")), _interval(welch.get("ci95")),
                         _p_value(welch.get("p")), _interval(paired.get("ci95")) if paired else "n/a",
                         _p_value(paired.get("p")), effect))
    lines = _table(("method", "metric", "diff", "95% CI (Welch)", "p (Welch)", "95% CI (paired)", "p (paired)",
                    "effect size"), rows)
    for method, method_notes in notes.items():
        lines.append(f"\n- {method}: no paired test or no test where: {'; '.join(sorted(method_notes))}")
    return lines


def _failure_line(item):
    """'- `path`: failed at epoch 3: loss is not finite (value nan)' from a summary['failed'] entry."""
    epoch = "" if item.get("epoch") is None else f" at epoch {item['epoch']}"
    value = "" if item.get("value") is None else f" (value {item['value']})"
    return f"- `{item['path']}`: failed{epoch}: {item['reason']}{value}"


def write_report(summary, path):
    """report.md; the plot paths in summary['plots'] are taken as relative to the report's own folder."""
    baseline = summary["baseline"]
    lines = [f"# Many-seed comparison by `{summary['group_by']}`", ""]
    lines += [f"- {method}: {group['n_runs']} run(s), seeds {group['seeds']}"
              for method, group in summary["groups"].items()]
    failed, missing = summary.get("failed", []), summary.get("missing", [])
    if failed:
        lines.append(f"- {len(failed)} failed run(s) (training diverged), left out of every statistic: "
                     "see Failed runs")
    if missing:
        lines.append(f"- {len(missing)} metric value(s) recorded as null or NaN, left out of their statistics: "
                     "see Missing values")
    lines += ["", "Accuracies in percent. 95% CI (t): Student t interval of the mean over seeds; "
              "95% CI (bootstrap): percentile bootstrap of the mean (10000 resamples, fixed seed). "
              "n/a: undefined with a single run."]
    if summary["warnings"]:
        lines += ["", "**Warnings**", ""] + [f"- {warning}" for warning in summary["warnings"]]

    for row, title in ROW_TITLES.items():
        metrics = [metric for metric in summary["metrics"] if metric.startswith(f"{row}.")]
        lines += ["", f"## {title}", ""] + _summary_table(summary, metrics)
    gap_metrics = [metric for metric in summary["metrics"] if "." not in metric]
    lines += ["", "## Gaps", ""] + _summary_table(summary, gap_metrics)

    lines += ["", f"## Differences vs baseline `{baseline}`", ""]
    if summary["comparisons"]:
        lines += ["diff = method - baseline. Welch's t-test always; the paired t-test (pairs = same training.seed) "
                  "only when both groups ran the same seeds with the GPU loader (same seed = same data order). "
                  "Effect size: Cohen's d (pooled SD); dz for the paired differences.", ""]
        lines += _difference_table(summary)
    else:
        lines.append("Only one group: nothing to compare.")

    lines += ["", "## Failed runs", ""]
    lines += [_failure_line(item) for item in failed] or ["None."]
    lines += ["", "## Skipped runs", ""]
    lines += [f"- `{item['path']}`: {item['reason']}" for item in summary["skipped"]] or ["None."]
    if missing:
        lines += ["", "## Missing values", ""]
        lines += [f"- `{item['path']}`: {item['metric']} is {item['value']} in {item['file']}" for item in missing]

    if summary["plots"]:
        lines += ["", "## Plots", ""]
        lines += [f"![{os.path.splitext(os.path.basename(plot))[0]}]({plot})\n" for plot in summary["plots"]]
    write_text_atomic(path, "\n".join(lines) + "\n")
