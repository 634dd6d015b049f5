"""Many-seed comparison of finished runs: group them, summarize each metric, test each group against a baseline.

`python run.py compare RUN_DIRS... [--out DIR] [--baseline NAME] [--group-by K1,K2] [--pool KEY] [--detect D]`.
Runs are grouped by every config key that differs between them other than the seed (engine.grouping). A run
folder is one that holds params.json; it is complete once final.json exists. Incomplete runs are listed as
skipped, failed runs (those with a failed.json: training diverged) as failed, and neither is ever counted; a metric
a complete run recorded as null or NaN is listed as missing and left out of that metric's statistics. This module
only builds the summary dict; the files (summary.json, summary.csv, report.md, PNGs) are formatted by writers/.
"""
import argparse
import json
import math
import os

import numpy as np

from engine import grouping, paired_stats, stats
from engine.grouping import Run, find_run_dirs, load_run, read_failure  # noqa: F401 (the readers, re-exported)
from engine.errors import UserError
from writers import plots, report
from writers.atomic import write_json_atomic

# Rows of final.json; the ema_ rows exist in runs trained with training.weight_ema.
ROWS = ("best", "final", "ema_best", "ema_final")
ATTACK_COLUMNS = ("clean", "fgsm", "pgd", "cw", "autoattack", "worst")
# Calibration columns (ECE in percent, NLL in nats): lower is better.
CALIBRATION_COLUMNS = ("ece_clean", "nll_clean", "ece_pgd", "nll_pgd")
# Per-run quantities derived from the rows / curves rather than read off one column.
OVERFIT_GAP = "robust_overfit_gap"  # best.pgd - final.pgd: how much robust accuracy late training lost
TRAIN_TEST_GAP = "train_test_robust_gap"  # metrics.jsonl robust_gap at the last evaluated epoch
GAPS = (OVERFIT_GAP, TRAIN_TEST_GAP)
DEFAULT_DETECT = 1.0  # points: the difference the seeds-needed figure is also given for
# Final-json settings that must agree for accuracies to be comparable across runs (else a warning in the report).
COMPARABILITY_SETTINGS = ("eps", "pgd_steps", "n")
DEFAULT_BASELINE = "at"


def _is_number(value):
    """A measured value: json.load gives NaN for 'NaN' and None for null, and True is an int; none is a metric."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def row_values(final, row):
    """final.json row `row`, with the values of the row it is marked the same as ("same_as": "best": final was
    evaluated once with best, both being the same epoch) filled in; {} when the run has no such row."""
    rows = final["rows"]
    values = rows.get(row)
    if not isinstance(values, dict):
        return {}
    same_as = values.get("same_as")
    if isinstance(same_as, str) and isinstance(rows.get(same_as), dict):
        return {**rows[same_as], **{k: v for k, v in values.items() if k != "same_as"}}
    return values


def _row_columns(run):
    presets = run.final.get("settings", {}).get("presets") or {}
    return ATTACK_COLUMNS + tuple(sorted(presets)) + CALIBRATION_COLUMNS


def _recorded(run):
    """[(metric, file, raw value)] of every metric the run recorded, whether or not the value is a number."""
    entries = []
    for row in ROWS:
        values = row_values(run.final, row)
        entries += [(f"{row}.{column}", "final.json", values[column]) for column in _row_columns(run)
                    if column in values]
    # Epochs without evaluation carry no robust_gap, so take the last epoch that has one.
    evaluated = [record for record in run.metrics if "robust_gap" in record]
    if evaluated:
        entries.append((TRAIN_TEST_GAP, "metrics.jsonl", evaluated[-1]["robust_gap"]))
    return entries


def run_metric_values(run):
    """{metric name: value} for one complete run; metrics the run did not record, or recorded as null / NaN /
    not a number, are absent (the latter listed by missing_values)."""
    values = {metric: float(value) for metric, _, value in _recorded(run) if _is_number(value)}
    if "best.pgd" in values and "final.pgd" in values:
        values[OVERFIT_GAP] = values["best.pgd"] - values["final.pgd"]
    return values


def missing_values(run):
    """The 'missing' entries of one complete run: metrics it recorded without a finite number."""
    return [{"path": run.path, "metric": metric, "file": file, "value": json.dumps(value, default=str)}
            for metric, file, value in _recorded(run) if not _is_number(value)]


def metric_names(runs):
    """Every metric some run recorded, in a fixed order: rows, then columns (attacks, presets, calibration), then
    the gaps."""
    recorded = {metric for run in runs for metric in run_metric_values(run)}
    recorded |= {metric for run in runs for metric, _, _ in _recorded(run)}
    columns = list(dict.fromkeys(column for run in runs for column in _row_columns(run)))
    ordered = [f"{row}.{column}" for row in ROWS for column in columns] + list(GAPS)
    return [metric for metric in ordered if metric in recorded]


def metric_info(metric):
    """How a metric reads: lower_is_better, its limits (CIs are clipped to them) and those of a difference."""
    column = metric.split(".")[-1]
    if column.startswith("nll"):
        return {"lower_is_better": True, "limits": None, "diff_limits": None}
    if metric in GAPS:
        return {"lower_is_better": True, "limits": [-100.0, 100.0], "diff_limits": [-200.0, 200.0]}
    return {"lower_is_better": column.startswith("ece"), "limits": [0.0, 100.0], "diff_limits": [-100.0, 100.0]}


def _paired_blocker(base_runs, other_runs):
    """Why a paired test is not valid for these two groups, or None when it is.

    Pairing by seed is only meaningful when the same seed gives the same data order, which the GPU loader
    guarantees (the CPU loader's worker scheduling does not).
    """
    for runs in (base_runs, other_runs):
        seeds = [run.params.get("training.seed") for run in runs]
        if None in seeds:
            return "a run has no training.seed"
        if len(set(seeds)) != len(seeds):
            return "a seed appears twice in one group"
    if {run.params["training.seed"] for run in base_runs} != {run.params["training.seed"] for run in other_runs}:
        return "the two groups were run with different seeds"
    if any(run.params.get("data.loader") != "gpu" for run in base_runs + other_runs):
        return "data.loader is not 'gpu' for every run, so equal seeds need not mean equal data order"
    return None


def _seeds_needed(base_values, other_values, observed, detect):
    """Seeds per arm (two-sample t, 80% power, alpha 0.05) for the observed difference and for `detect`."""
    sd = stats.pooled_sd(other_values, base_values)
    return {"sd": sd, **{name: {"delta": delta, **(stats.seeds_needed(sd, delta) or {"n": None, "more_than": None})}
                         for name, delta in (("observed", observed), ("detect", detect))}}


def _compare_metric(base_seeded, other_seeded, paired_blocker, info, detect):
    """Welch test + Cohen's d always; paired test + d_z when pairing is valid and every seed has this metric.

    base_seeded / other_seeded: [(training.seed, value)] of the runs that recorded this metric.
    """
    base_values, other_values = [v for _, v in base_seeded], [v for _, v in other_seeded]
    if len(base_values) < 2 or len(other_values) < 2:
        return {"welch": None, "cohens_d": None, "paired": None, "dz": None, "seeds_needed": None,
                "note": "needs at least 2 runs per method"}
    welch = stats.welch(other_values, base_values)
    welch["ci95"] = stats.clip_interval(welch["ci95"], info["diff_limits"])
    result = {"welch": welch, "cohens_d": stats.cohens_d(other_values, base_values), "paired": None, "dz": None,
              # --detect is in accuracy points: no such figure for a metric in other units (NLL).
              "seeds_needed": _seeds_needed(base_values, other_values, welch["diff"],
                                            detect if info["diff_limits"] is not None else None),
              "note": paired_blocker}
    if paired_blocker is not None:
        return result
    # Seeds are unique within each group here (the blocker checks), so these dicts lose nothing.
    base_by_seed, other_by_seed = dict(base_seeded), dict(other_seeded)
    if set(base_by_seed) != set(other_by_seed):
        result["note"] = "this metric is missing for some seeds"
        return result
    seeds = sorted(base_by_seed)
    other_paired = [other_by_seed[seed] for seed in seeds]
    base_paired = [base_by_seed[seed] for seed in seeds]
    result["paired"] = stats.paired(other_paired, base_paired)
    result["paired"]["ci95"] = stats.clip_interval(result["paired"]["ci95"], info["diff_limits"])
    result["dz"] = stats.cohens_dz(other_paired, base_paired)
    return result


def _add_holm(by_metric):
    """p_holm beside each Welch and paired p: Holm over the metrics of this one comparison."""
    for test in ("welch", "paired"):
        tested = [metric for metric, result in by_metric.items() if (result.get(test) or {}).get("p") is not None]
        for metric, adjusted in zip(tested, stats.holm([by_metric[metric][test]["p"] for metric in tested])):
            by_metric[metric][test]["p_holm"] = adjusted


def _examples(run, row):
    """The run's examples/<row>.csv (or that of the row it is marked the same as), None when it has none."""
    if row not in run.examples:
        same_as = (run.final["rows"].get(row) or {}).get("same_as")
        paths = [os.path.join(run.path, "examples", f"{name}.csv") for name in (row, same_as) if name]
        path = next((path for path in paths if os.path.exists(path)), None)
        run.examples[row] = None if path is None else grouping.read_examples(path)
    return run.examples[row]


def _paired_examples(base_runs, other_runs, row, blocker):
    """Per-example statistics of one row for one comparison: {"note"} when they cannot be computed, else
    {"n_images", "columns": {attack: paired_stats.compare_examples(...)}}."""
    runs = base_runs + other_runs
    tables = [_examples(run, row) for run in runs]
    if all(table is None for table in tables):
        return None
    if any(table is None for table in tables):
        lacking = [run.path for run, table in zip(runs, tables) if table is None]
        return {"note": f"{len(lacking)} run(s) have no examples/{row}.csv (older runs): {', '.join(lacking[:3])}"}
    orders = [np.argsort(table["index"]) for table in tables]
    index, label = tables[0]["index"][orders[0]], tables[0]["label"][orders[0]]
    for run, table, order in zip(runs, tables, orders):
        if not np.array_equal(table["index"][order], index):
            return {"note": f"{run.path}/examples/{row}.csv holds other test images than {runs[0].path}'s: not paired"}
        if not np.array_equal(table["label"][order], label):
            return {"note": f"{run.path}/examples/{row}.csv gives other labels for the same images: not paired"}
    seeds = [run.params.get("training.seed") for run in runs]
    # Keyed by seed to pair seeds; by position when a seed repeats (then nothing is paired by seed).
    keys = seeds if blocker is None else list(range(len(runs)))
    columns = {}
    shared = [name for name in tables[0]["columns"] if all(name in table["columns"] for table in tables)]
    for name in shared:
        matrix = np.array([table["columns"][name][order] for table, order in zip(tables, orders)])
        present = np.all(np.isfinite(matrix), axis=0)  # images every run evaluated under this attack
        if not present.any():
            continue
        arms = [{key: matrix[i, present] for i, key in enumerate(keys) if (i < len(base_runs)) == is_base}
                for is_base in (True, False)]
        result = paired_stats.compare_examples(arms[1], arms[0], paired_seeds=blocker is None)
        result["bootstrap"]["ci95"] = stats.clip_interval(result["bootstrap"]["ci95"], (-100.0, 100.0))
        # As for the seed-level bootstrap CIs (omitted below MIN_BOOTSTRAP_N): with so few seeds the seed level has
        # few distinct resamples and the CI understates the seed-to-seed spread. Kept (the image level is sound),
        # but flagged in the report.
        result["bootstrap"]["few_seeds"] = min(len(base_runs), len(other_runs)) < stats.MIN_BOOTSTRAP_N
        columns[name] = result
    return {"n_images": int(index.size), "columns": columns, "note": None}


def _settings_warnings(runs):
    warnings = []
    for key in COMPARABILITY_SETTINGS:
        seen = {json.dumps(run.final.get("settings", {}).get(key)) for run in runs}
        if len(seen) > 1:
            warnings.append(f"final.json settings.{key} differs between runs: {', '.join(sorted(seen))}")
    return warnings


def _group_by_keys(group_by):
    if group_by is None or isinstance(group_by, (list, tuple)):
        return group_by
    return [key.strip() for key in str(group_by).split(",") if key.strip()]


def build_summary(runs, skipped, *, failed=(), baseline=None, group_by=None, pool=(), detect=DEFAULT_DETECT):
    """The summary dict for complete runs: the setting, per-group metric summaries and per-group tests against the
    baseline (seed level, and image by image where the runs wrote examples/); skipped (unfinished) and failed runs
    are only listed. group_by: None (every differing key), or keys (a list, or 'k1,k2'); pool: keys pooled over."""
    if not runs:
        raise UserError(f"no finished run to compare: {len(skipped)} unfinished (no final.json), {len(failed)} failed"
                        + "".join(f"; {item['path']}: failed at epoch {item['epoch']} ({item['reason']})"
                                  for item in list(failed)[:3]))
    groups, keys, pooled, differs = grouping.group_runs(runs, _group_by_keys(group_by), tuple(pool))
    baseline = grouping.resolve_baseline(groups, baseline, DEFAULT_BASELINE)
    metrics = metric_names(runs)

    # {group: {metric: [(seed, value)]}}: the seed lets the paired test line runs up.
    values_by_group = {}
    summary_groups = {}
    for name, group_runs in groups.items():
        by_metric = {}
        for run in group_runs:
            for metric, value in run_metric_values(run).items():
                by_metric.setdefault(metric, []).append((run.params.get("training.seed"), value))
        values_by_group[name] = by_metric
        group_metrics = {}
        for metric in (metric for metric in metrics if metric in by_metric):
            stat = stats.summary([v for _, v in by_metric[metric]])
            for ci in ("ci95_t", "ci95_boot"):
                stat[ci] = stats.clip_interval(stat[ci], metric_info(metric)["limits"])
            group_metrics[metric] = {**stat, "values": [v for _, v in by_metric[metric]]}
        summary_groups[name] = {
            "n_runs": len(group_runs),
            "seeds": [run.params.get("training.seed") for run in group_runs],
            "runs": [run.path for run in group_runs],
            "params": grouping.common_params(group_runs),
            "metrics": group_metrics,
        }

    comparisons, per_example = {}, {}
    for name, group_runs in groups.items():
        if name == baseline:
            continue
        blocker = _paired_blocker(groups[baseline], group_runs)
        comparisons[name] = {
            metric: _compare_metric(values_by_group[baseline][metric], values_by_group[name][metric], blocker,
                                    metric_info(metric), detect)
            for metric in metrics
            if metric in values_by_group[baseline] and metric in values_by_group[name]
        }
        _add_holm(comparisons[name])
        rows = {row: _paired_examples(groups[baseline], group_runs, row, blocker) for row in ROWS}
        per_example[name] = {row: result for row, result in rows.items() if result is not None}

    return {
        "setting": grouping.setting(runs, differs),
        "group_by": keys,
        "pooled": pooled,
        "baseline": baseline,
        "detect": detect,
        "metrics": metrics,
        "metric_info": {metric: metric_info(metric) for metric in metrics},
        "groups": summary_groups,
        "comparisons": comparisons,
        "paired_examples": per_example,
        "skipped": skipped,
        "failed": list(failed),
        "missing": [entry for run in runs for entry in missing_values(run)],
        "warnings": _settings_warnings(runs),
        "plots": [],
    }


def compare(run_dirs, out_dir, *, baseline=None, group_by=None, pool=(), detect=DEFAULT_DETECT):
    """Compare the complete runs in run_dirs (run or sweep folders) and write summary.json, summary.csv,
    report.md and PNG plots into out_dir. Returns the summary dict (as written to summary.json)."""
    runs, skipped, failed = [], [], []
    for path in find_run_dirs([os.fspath(path) for path in run_dirs]):
        # Checked before parsing: a failed or unfinished run may have a half-written metrics.jsonl that is no error.
        if os.path.exists(os.path.join(path, "failed.json")):
            failed.append(read_failure(path))
            continue
        if not os.path.exists(os.path.join(path, "final.json")):
            skipped.append({"path": path, "reason": "no final.json (run incomplete or crashed)"})
            continue
        runs.append(load_run(path))

    summary = build_summary(runs, skipped, failed=failed, baseline=baseline, group_by=group_by, pool=pool,
                            detect=detect)
    os.makedirs(out_dir, exist_ok=True)
    # {group: [per-epoch metric dicts of each run]}, the input the curve plots average over seeds.
    curves = {name: [run.metrics for run in runs if run.path in set(group["runs"])]
              for name, group in summary["groups"].items()}
    written_plots = plots.write_plots(curves, summary, out_dir)
    summary["plots"] = [os.path.relpath(path, out_dir) for path in written_plots]
    write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    report.write_summary_csv(summary, os.path.join(out_dir, "summary.csv"))
    report.write_report(summary, os.path.join(out_dir, "report.md"))
    return summary


def main(argv):
    parser = argparse.ArgumentParser(prog="run.py compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders or sweep folders holding runs")
    parser.add_argument("--out", help="output folder (default: <common parent of RUN_DIRs>/compare)")
    parser.add_argument("--baseline", help=f"group every other group is tested against: a group name, or a method "
                                           f"name that identifies one group (default: '{DEFAULT_BASELINE}' if "
                                           f"present, else the first group alphabetically)")
    parser.add_argument("--group-by", help="params.json keys that name a group, comma-separated (default: every key "
                                           "whose value differs between the runs, other than training.seed)")
    parser.add_argument("--pool", action="append", default=[], metavar="KEY",
                        help="pool runs that differ in this params.json key into one group (repeatable)")
    parser.add_argument("--detect", type=float, default=DEFAULT_DETECT, metavar="POINTS",
                        help=f"difference (accuracy points) the seeds-needed figure is given for, besides the "
                             f"observed one (default {DEFAULT_DETECT})")
    args = parser.parse_args(argv)
    out_dir = args.out or os.path.join(os.path.commonpath([os.path.abspath(p) for p in args.run_dirs]), "compare")
    summary = compare(args.run_dirs, out_dir, baseline=args.baseline, group_by=args.group_by, pool=args.pool,
                      detect=args.detect)
    counted = sum(group["n_runs"] for group in summary["groups"].values())
    print(f"compared {counted} runs in {len(summary['groups'])} groups ({len(summary['skipped'])} skipped, "
          f"{len(summary['failed'])} failed); "
          f"report: {os.path.join(out_dir, 'report.md')}")
    return 0
