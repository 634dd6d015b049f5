"""Many-seed comparison of finished runs: group by method, summarize each metric, test each method against a baseline.

`python run.py compare RUN_DIRS... [--out DIR] [--baseline NAME] [--group-by KEY]`. A run folder is one that holds
params.json; it is complete once final.json exists. Incomplete runs are listed as skipped, failed runs (those with a
failed.json: training diverged) as failed, and neither is ever counted; a metric a complete run recorded as null or
NaN is listed as missing and left out of that metric's statistics. This module only builds the summary dict; the
files (summary.json, summary.csv, report.md, PNGs) are formatted by writers/.
"""
import argparse
import json
import math
import os
from dataclasses import dataclass, field

from engine import stats
from engine.errors import UserError
from writers import plots, report
from writers.atomic import write_json_atomic

ROWS = ("best", "final")
ROW_COLUMNS = ("clean", "pgd", "cw", "autoattack", "worst")
# Per-run quantities derived from the rows / curves rather than read off one column.
OVERFIT_GAP = "robust_overfit_gap"  # best.pgd - final.pgd: how much robust accuracy late training lost
TRAIN_TEST_GAP = "train_test_robust_gap"  # metrics.jsonl robust_gap at the last evaluated epoch
METRICS = tuple(f"{row}.{column}" for row in ROWS for column in ROW_COLUMNS) + (OVERFIT_GAP, TRAIN_TEST_GAP)
# Final-json settings that must agree for accuracies to be comparable across runs (else a warning in the report).
COMPARABILITY_SETTINGS = ("eps", "pgd_steps", "n")
DEFAULT_BASELINE = "at"


@dataclass
class Run:
    path: str
    params: dict
    metrics: list = field(default_factory=list)  # one dict per epoch, in file order
    final: dict | None = None  # None while the run is unfinished


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: malformed JSON ({error}); fix or delete the file, or re-run that training") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None


def _read_jsonl(path):
    records = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UserError(f"{path}: line {line_number} is malformed JSON ({error})") from None
                if not isinstance(record, dict):
                    raise UserError(f"{path}: line {line_number} is not a JSON object (one per epoch expected)")
                records.append(record)
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None
    return records


def load_run(path):
    """Read one run folder. params.json is required; metrics.jsonl and final.json are read when present.

    Raises UserError naming the file when one is malformed or a required key is missing.
    """
    params = _read_json(os.path.join(path, "params.json"))
    if not isinstance(params, dict):
        raise UserError(f"{os.path.join(path, 'params.json')}: expected a JSON object of flat config keys")
    metrics_path = os.path.join(path, "metrics.jsonl")
    metrics = _read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
    final_path = os.path.join(path, "final.json")
    final = None
    if os.path.exists(final_path):
        final = _read_json(final_path)
        if not isinstance(final, dict) or not isinstance(final.get("rows"), dict):
            raise UserError(f"{final_path}: expected an object with a 'rows' object (best/final accuracies)")
    return Run(path=path, params=params, metrics=metrics, final=final)


def find_run_dirs(paths):
    """Run folders (those with params.json) at or below each path, in sorted order, each listed once.

    A run folder is not searched further: its subfolders (checkpoints, plots) are part of that run.
    """
    found = []
    for top in paths:
        if not os.path.isdir(top):
            raise UserError(f"{top}: no such folder (expected a run folder or a sweep folder holding runs)")
        for folder, subfolders, files in os.walk(top):
            subfolders.sort()
            if "params.json" in files:
                found.append(folder)
                subfolders.clear()
    unique = list(dict.fromkeys(os.path.realpath(folder) for folder in found))
    if not unique:
        raise UserError(f"no run folders (folders with params.json) under: {', '.join(paths)}")
    return unique


def read_failure(path):
    """The 'failed' entry of a run folder holding failed.json (written by the training loop when the loss or the
    weights stopped being finite). A damaged failed.json still marks the run failed: it is left out either way."""
    try:
        record = _read_json(os.path.join(path, "failed.json"))
    except UserError as error:
        record = {"reason": f"unreadable failed.json ({error})"}
    if not isinstance(record, dict):
        record = {"reason": "failed.json is not a JSON object"}
    epoch = record.get("epoch")
    return {"path": path, "epoch": epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None,
            "reason": str(record.get("reason") or "training failed"),
            "value": None if record.get("value") is None else str(record["value"]),
            "time": None if record.get("time") is None else str(record["time"])}


def _is_number(value):
    """A measured value: json.load gives NaN for 'NaN' and None for null, and True is an int; none is a metric."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _recorded(run):
    """[(metric, file, raw value)] of every metric the run recorded, whether or not the value is a number."""
    entries = []
    for row in ROWS:
        row_values = run.final["rows"].get(row) or {}
        if isinstance(row_values, dict):
            entries += [(f"{row}.{column}", "final.json", row_values[column])
                        for column in ROW_COLUMNS if column in row_values]
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


def _group_runs(runs, group_by):
    groups = {}
    for run in runs:
        if group_by not in run.params:
            raise UserError(f"{run.path}/params.json has no key '{group_by}' to group by; "
                            f"use --group-by with one of: {', '.join(sorted(run.params))}")
        groups.setdefault(str(run.params[group_by]), []).append(run)
    return dict(sorted(groups.items()))


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


def _compare_metric(base_seeded, other_seeded, paired_blocker):
    """Welch test + Cohen's d always; paired test + d_z when pairing is valid and every seed has this metric.

    base_seeded / other_seeded: [(training.seed, value)] of the runs that recorded this metric.
    """
    base_values, other_values = [v for _, v in base_seeded], [v for _, v in other_seeded]
    if len(base_values) < 2 or len(other_values) < 2:
        return {"welch": None, "cohens_d": None, "paired": None, "dz": None,
                "note": "needs at least 2 runs per method"}
    result = {"welch": stats.welch(other_values, base_values), "cohens_d": stats.cohens_d(other_values, base_values),
              "paired": None, "dz": None, "note": paired_blocker}
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
    result["dz"] = stats.cohens_dz(other_paired, base_paired)
    return result


def _settings_warnings(runs):
    warnings = []
    for key in COMPARABILITY_SETTINGS:
        seen = {json.dumps(run.final.get("settings", {}).get(key)) for run in runs}
        if len(seen) > 1:
            warnings.append(f"final.json settings.{key} differs between runs: {', '.join(sorted(seen))}")
    return warnings


def build_summary(runs, skipped, *, failed=(), baseline=None, group_by="method.name"):
    """The summary dict for complete runs: per-group metric summaries and per-method tests against the baseline;
    skipped (unfinished) and failed runs are only listed."""
    if not runs:
        raise UserError(f"no finished run to compare: {len(skipped)} unfinished (no final.json), {len(failed)} failed"
                        + "".join(f"; {item['path']}: failed at epoch {item['epoch']} ({item['reason']})"
                                  for item in list(failed)[:3]))
    groups = _group_runs(runs, group_by)
    if baseline is None:
        baseline = DEFAULT_BASELINE if DEFAULT_BASELINE in groups else next(iter(groups))
    elif baseline not in groups:
        raise UserError(f"baseline '{baseline}' is not among the {group_by} values: {', '.join(groups)}")

    # {group: {metric: [(seed, value)]}}: the seed lets the paired test line runs up.
    values_by_group = {}
    summary_groups = {}
    for name, group_runs in groups.items():
        by_metric = {}
        for run in group_runs:
            for metric, value in run_metric_values(run).items():
                by_metric.setdefault(metric, []).append((run.params.get("training.seed"), value))
        values_by_group[name] = by_metric
        summary_groups[name] = {
            "n_runs": len(group_runs),
            "seeds": [run.params.get("training.seed") for run in group_runs],
            "runs": [run.path for run in group_runs],
            "metrics": {metric: {**stats.summary([v for _, v in by_metric[metric]]),
                                 "values": [v for _, v in by_metric[metric]]}
                        for metric in METRICS if metric in by_metric},
        }

    comparisons = {}
    for name, group_runs in groups.items():
        if name == baseline:
            continue
        blocker = _paired_blocker(groups[baseline], group_runs)
        comparisons[name] = {
            metric: _compare_metric(values_by_group[baseline][metric], values_by_group[name][metric], blocker)
            for metric in METRICS
            if metric in values_by_group[baseline] and metric in values_by_group[name]
        }

    return {
        "group_by": group_by,
        "baseline": baseline,
        "metrics": list(METRICS),
        "groups": summary_groups,
        "comparisons": comparisons,
        "skipped": skipped,
        "failed": list(failed),
        "missing": [entry for run in runs for entry in missing_values(run)],
        "warnings": _settings_warnings(runs),
        "plots": [],
    }


def _curves_by_group(runs, group_by):
    """{group: [per-epoch metric dicts of each run]}, the input the curve plots average over seeds."""
    curves = {}
    for run in runs:
        curves.setdefault(str(run.params[group_by]), []).append(run.metrics)
    return dict(sorted(curves.items()))


def compare(run_dirs, out_dir, *, baseline=None, group_by="method.name"):
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

    summary = build_summary(runs, skipped, failed=failed, baseline=baseline, group_by=group_by)
    os.makedirs(out_dir, exist_ok=True)
    written_plots = plots.write_plots(_curves_by_group(runs, group_by), summary, out_dir)
    summary["plots"] = [os.path.relpath(path, out_dir) for path in written_plots]
    write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    report.write_summary_csv(summary, os.path.join(out_dir, "summary.csv"))
    report.write_report(summary, os.path.join(out_dir, "report.md"))
    return summary


def main(argv):
    parser = argparse.ArgumentParser(prog="run.py compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders or sweep folders holding runs")
    parser.add_argument("--out", help="output folder (default: <common parent of RUN_DIRs>/compare)")
    parser.add_argument("--baseline", help=f"group every other method is tested against (default: "
                                           f"'{DEFAULT_BASELINE}' if present, else the first alphabetically)")
    parser.add_argument("--group-by", default="method.name", help="params.json key that names a group")
    args = parser.parse_args(argv)
    out_dir = args.out or os.path.join(os.path.commonpath([os.path.abspath(p) for p in args.run_dirs]), "compare")
    summary = compare(args.run_dirs, out_dir, baseline=args.baseline, group_by=args.group_by)
    counted = sum(group["n_runs"] for group in summary["groups"].values())
    print(f"compared {counted} runs in {len(summary['groups'])} groups ({len(summary['skipped'])} skipped, "
          f"{len(summary['failed'])} failed); "
          f"report: {os.path.join(out_dir, 'report.md')}")
    return 0
