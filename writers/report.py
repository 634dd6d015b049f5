"""Files of the many-seed comparison: summary.json, summary.csv and report.md (from engine.compare's summary dict).

Every file is written to a temporary name in the same folder and moved into place with os.replace, so a reader
(or a crash) never sees half a file.
"""
import csv
import io
import os

from writers.atomic import write_text_atomic

METRIC_LABELS = {
    "clean": "clean", "fgsm": "FGSM", "pgd": "PGD", "cw": "CW", "autoattack": "AutoAttack", "worst": "worst case",
    "ece_clean": "ECE clean (lower is better)", "nll_clean": "NLL clean (lower is better)",
    "ece_pgd": "ECE PGD (lower is better)", "nll_pgd": "NLL PGD (lower is better)",
    "robust_overfit_gap": "robust overfitting gap (best PGD - final PGD)",
    "train_test_robust_gap": "train - test robust gap (last evaluated epoch)",
}
ROW_TITLES = {"best": "Best checkpoint", "final": "Final epoch", "ema_best": "Weight-EMA best checkpoint",
              "ema_final": "Weight-EMA final epoch"}
CSV_COLUMNS = ("method", "metric", "n", "mean", "std", "sem", "ci95_t_low", "ci95_t_high", "ci95_boot_low",
               "ci95_boot_high", "diff_vs_baseline", "diff_ci95_low", "diff_ci95_high", "p_welch", "p_paired",
               "cohens_d", "dz", "p_welch_holm", "p_paired_holm", "seeds_needed_observed", "seeds_needed_detect")


def _metric_label(metric):
    return METRIC_LABELS.get(metric.split(".")[-1], metric)


def _seeds(entry):
    """A seeds-needed entry as text: '12', 'more than 1000', or 'n/a' (spread 0 or unknown)."""
    if not entry or (entry.get("n") is None and entry.get("more_than") is None):
        return "n/a"
    return str(entry["n"]) if entry["n"] is not None else f"more than {entry['more_than']}"


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
            needed = test.get("seeds_needed") or {}
            row = (method, metric, stat["n"], stat["mean"], stat["std"], stat["sem"], *ci_t, *ci_boot,
                   welch.get("diff"), *diff_ci, welch.get("p"), paired.get("p"), test.get("cohens_d"), test.get("dz"),
                   welch.get("p_holm"), paired.get("p_holm"),
                   _seeds(needed.get("observed")) if needed else None, _seeds(needed.get("detect")) if needed else None)
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
                         _p_value(paired.get("p")), effect, _p_value(welch.get("p_holm")),
                         _p_value(paired.get("p_holm"))))
    lines = _table(("method", "metric", "diff", "95% CI (Welch)", "p (Welch)", "95% CI (paired)", "p (paired)",
                    "effect size", "Holm p (Welch)", "Holm p (paired)"), rows)
    for method, method_notes in notes.items():
        lines.append(f"\n- {method}: no paired test or no test where: {'; '.join(sorted(method_notes))}")
    return lines


def _failure_line(item):
    """'- `path`: failed at epoch 3: loss is not finite (value nan)' from a summary['failed'] entry."""
    epoch = "" if item.get("epoch") is None else f" at epoch {item['epoch']}"
    value = "" if item.get("value") is None else f" (value {item['value']})"
    return f"- `{item['path']}`: failed{epoch}: {item['reason']}{value}"


def _shown(value):
    """A setting value: a list (the runs disagree) as 'a | b', None as 'unknown'."""
    if isinstance(value, list):
        return " | ".join("unknown" if v is None else str(v) for v in value) if value else "none"
    return "unknown" if value is None else str(value)


def _setting_lines(summary):
    setting = summary["setting"]
    commit = _shown(setting["git_commit"]) + (" (uncommitted changes)" if setting.get("git_dirty") else "")
    lines = ["## Setting", "",
             f"- dataset {_shown(setting['dataset'])}, arch {_shown(setting['arch'])}, "
             f"{_shown(setting['epochs'])} epochs",
             f"- training data: {setting.get('training_data') or 'n/a'}",
             f"- training attack: {setting['train_attack']['text']}",
             f"- evaluation (final table): {setting['eval']['text']}",
             f"- engine {_shown(setting['engine'])}, precision {_shown(setting['precision'])}",
             f"- code: git {commit}; torch {_shown(setting['torch'])}; device {_shown(setting['device'])}"
             + (f" ({setting['runs_without_provenance']} run(s) without provenance.json)"
                if setting.get("runs_without_provenance") else "")]
    keys = summary["group_by"]
    lines.append(f"- grouped by: {', '.join(f'`{key}`' for key in keys) or 'nothing (one group)'}; runs that "
                 "differ only in training.seed (and in where they ran or wrote) are pooled")
    for key, values in summary["pooled"].items():
        lines.append(f"- pooled over `{key}` (--pool): {_shown(values)}")
    others = {key: values for key, values in setting["differs"].items() if key not in keys}
    for key, values in others.items():
        if key not in summary["pooled"]:
            lines.append(f"- also differs: `{key}`: {_shown(values)}")
    return lines


def _seeds_needed_lines(summary):
    rows = []
    for method, by_metric in summary["comparisons"].items():
        for metric, test in by_metric.items():
            needed = test.get("seeds_needed")
            if needed:
                rows.append((method, metric, _number(needed["sd"]), _number(needed["observed"]["delta"]),
                             _seeds(needed["observed"]), _seeds(needed["detect"])))
    if not rows:
        return []
    detect = summary.get("detect")
    return ["", "### Seeds needed", "",
            f"Seeds per arm for 80% power at alpha 0.05 (two-sided two-sample t-test, equal n per arm, the pooled "
            f"per-seed SD observed here): the smallest n with P(|T| > t_crit) >= 0.8, T noncentral t with df = 2n - 2 "
            f"and ncp = delta / (sd * sqrt(2 / n)); for the observed difference and for {_number(detect)} point(s) "
            "(--detect). n/a: no spread observed.", ""] + _table(
        ("method", "metric", "pooled SD", "observed diff", "seeds (observed diff)", f"seeds ({_number(detect)})"),
        rows)


def _per_example_lines(summary):
    lines = ["", "## Per-example (paired image by image) statistics", ""]
    results = summary.get("paired_examples") or {}
    if not any(results.values()):
        return lines + ["None: no run has examples/<row>.csv (runs from before per-example results were written)."]
    lines += ["Where both groups were evaluated on the same test images (examples/<row>.csv, paired on `index`). "
              "McNemar: exact two-sided test per seed pair (b = images only the method gets right, c = only the "
              "baseline); p per seed, not adjusted. Bootstrap: two-level percentile 95% CI of the mean difference "
              "(method - baseline, points), resampling seeds (seed pairs when paired) and test images (one draw "
              "shared by all runs: every run saw the same images), 10000 resamples, fixed seed. Variance of the mean "
              "difference: from the seeds (var of the per-seed differences / S) and from the test sample "
              "(var over images of the seed-averaged per-image difference / n); 'seeds' is the seeds' fraction.", ""]
    rows, notes, flagged = [], [], False
    for method, by_row in results.items():
        for row, result in by_row.items():
            if result.get("note"):
                notes.append(f"- {method}, {row}: {result['note']}")
                continue
            for column, stat in result["columns"].items():
                mcnemar = stat["mcnemar"]
                per_seed = "; ".join(f"s{seed}: {m['b']}/{m['c']}, p {_p_value(m['p'])}"
                                     for seed, m in mcnemar.items()) if mcnemar else stat["mcnemar_note"]
                boot, var = stat["bootstrap"], stat["variance"]
                fraction = "n/a" if var["seed_fraction"] is None else f"{100 * var['seed_fraction']:.0f}%"
                few = boot.get("few_seeds", False)
                flagged = flagged or few
                rows.append((method, f"{row}.{column}", stat["n_images"], _number(boot["diff"]),
                             _interval(boot["ci95"]) + (" †" if few else ""), per_seed,
                             _number(var["seed_var_of_mean"], 3),
                             _number(var["image_var_of_mean"], 3), fraction))
    if rows:
        lines += _table(("method", "metric", "images", "diff", "95% CI (2-level bootstrap)", "McNemar b/c per seed",
                         "var from seeds", "var from test sample", "seeds"), rows)
    if flagged:
        lines += ["", "† fewer than 5 seeds in an arm: the seed level of this bootstrap has few distinct resamples, "
                      "so the CI understates the seed-to-seed spread (the t CIs of the differences above do not); "
                      "the McNemar tests speak for these seeds' models only, not for the method."]
    return lines + ([""] + notes if notes else [])


def write_report(summary, path):
    """report.md; the plot paths in summary['plots'] are taken as relative to the report's own folder."""
    baseline = summary["baseline"]
    keys = ", ".join(summary["group_by"]) or "nothing"
    lines = [f"# Many-seed comparison by `{keys}`", ""] + _setting_lines(summary) + ["", "## Groups", ""]
    lines += [f"- {method}: {group['n_runs']} run(s), seeds {group['seeds']}"
              for method, group in summary["groups"].items()]
    failed, missing = summary.get("failed", []), summary.get("missing", [])
    if failed:
        lines.append(f"- {len(failed)} failed run(s) (training diverged), left out of every statistic: "
                     "see Failed runs")
    if missing:
        lines.append(f"- {len(missing)} metric value(s) recorded as null or NaN, left out of their statistics: "
                     "see Missing values")
    lines += ["", "Accuracies (and ECE) in percent; NLL in nats; for ECE and NLL lower is better. 95% CI (t): "
              "Student t interval of the mean over seeds; 95% CI (bootstrap): percentile bootstrap of the mean "
              "(10000 resamples, fixed seed), given only from 5 seeds on (with fewer, the few distinct resamples "
              "make it far too narrow). CIs are clipped to [0, 100] (differences to [-100, 100]). n/a: undefined "
              "(a single run, or too few seeds)."]
    if summary["warnings"]:
        lines += ["", "**Warnings**", ""] + [f"- {warning}" for warning in summary["warnings"]]

    for row, title in ROW_TITLES.items():
        metrics = [metric for metric in summary["metrics"] if metric.startswith(f"{row}.")]
        if metrics or row in ("best", "final"):
            lines += ["", f"## {title}", ""] + _summary_table(summary, metrics)
    gap_metrics = [metric for metric in summary["metrics"] if "." not in metric]
    lines += ["", "## Gaps", ""] + _summary_table(summary, gap_metrics)

    lines += ["", f"## Differences vs baseline `{baseline}`", ""]
    if summary["comparisons"]:
        lines += ["diff = method - baseline. Welch's t-test always; the paired t-test (pairs = same training.seed) "
                  "only when both groups ran the same seeds with the GPU loader (same seed = same data order). "
                  "Effect size: Cohen's d (pooled SD); dz for the paired differences. Multiplicity: each "
                  "comparison tests every metric listed, so Holm p is Holm's adjustment over the metrics of that "
                  "one comparison (per test); read the raw p of a single pre-chosen metric only.", ""]
        lines += _difference_table(summary) + _seeds_needed_lines(summary)
    else:
        lines.append("Only one group: nothing to compare.")
    if summary["comparisons"]:
        lines += _per_example_lines(summary)

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
