"""engine.compare end to end on fabricated run folders: numbers vs numpy/scipy, CSV rows, report, PNGs, errors."""
import csv
import json
import os

import numpy as np
import pytest
import scipy.stats

from engine import compare
from engine.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EPOCHS = 6
# Known per-seed row values. sgls lacks cw (a column can be off); folder order != seed order, to test pairing.
AT = {0: {"clean": 82.1, "pgd": 50.2, "cw": 48.9, "autoattack": 47.0, "final_pgd": 44.1},
      1: {"clean": 81.7, "pgd": 49.6, "cw": 48.1, "autoattack": 46.5, "final_pgd": 43.0},
      2: {"clean": 82.6, "pgd": 50.9, "cw": 49.2, "autoattack": 47.6, "final_pgd": 45.2},
      3: {"clean": 81.9, "pgd": 50.0, "cw": 48.5, "autoattack": 46.9, "final_pgd": 44.0}}
SGLS = {2: {"clean": 83.0, "pgd": 52.4, "autoattack": 48.9, "final_pgd": 51.0},
        0: {"clean": 82.4, "pgd": 51.8, "autoattack": 48.1, "final_pgd": 50.2},
        3: {"clean": 83.3, "pgd": 52.0, "autoattack": 48.4, "final_pgd": 51.1},
        1: {"clean": 82.9, "pgd": 51.1, "autoattack": 47.7, "final_pgd": 49.9}}


def _row(values, pgd):
    row = {"epoch": EPOCHS, "clean": values["clean"], "pgd": pgd, "autoattack": values["autoattack"],
           "worst": values["autoattack"] - 0.5}
    if "cw" in values:
        row["cw"] = values["cw"]
    return row


def _curve(seed, offset):
    """Per-epoch records; epoch 3 has no evaluation (its test/val keys are absent, as the epoch loop writes them)."""
    records = []
    for epoch in range(1, EPOCHS + 1):
        record = {"epoch": epoch, "lr": 0.1, "train_loss": 2.0 / epoch, "train_clean_acc": 50 + 5 * epoch,
                  "train_robust_acc": 30 + 4 * epoch + offset, "grad_norm": 3.0 / epoch + 0.1 * seed}
        if epoch != 3:
            record.update(test_clean_acc=45 + 5 * epoch + seed, test_pgd_acc=25 + 3 * epoch + seed + offset)
            record["robust_gap"] = record["train_robust_acc"] - record["test_pgd_acc"]
        records.append(record)
    return records


def make_run(folder, method, seed, values, *, loader="gpu", complete=True, offset=0.0):
    os.makedirs(folder)
    params = {"method.name": method, "training.seed": seed, "data.dataset": "cifar10", "data.loader": loader,
              "training.epochs": EPOCHS}
    with open(os.path.join(folder, "params.json"), "w") as handle:
        json.dump(params, handle)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as handle:
        for record in _curve(seed, offset):
            handle.write(json.dumps(record) + "\n")
    if complete:
        final = {"rows": {"best": _row(values, values["pgd"]), "final": _row(values, values["final_pgd"])},
                 "settings": {"eps": 8 / 255, "pgd_steps": 10, "n": 10000}, "method": method, "seed": seed}
        with open(os.path.join(folder, "final.json"), "w") as handle:
            json.dump(final, handle)
    return folder


def make_sweep(root, *, at_loader="gpu", sgls_seeds=(2, 0, 3, 1)):
    for seed, values in AT.items():
        make_run(os.path.join(root, "at", f"seed{seed}"), "at", seed, values, loader=at_loader)
    for letter, values, seed in zip("abcd", SGLS.values(), sgls_seeds):
        make_run(os.path.join(root, "sgls", f"run_{letter}"), "sgls", seed, values, offset=2.0)
    return make_run(os.path.join(root, "sgls", "run_crashed"), "sgls", 7, SGLS[0], complete=False)


def _values(table, key, seeds=(0, 1, 2, 3)):
    return np.array([table[seed][key] for seed in seeds])


def test_compare_end_to_end(tmp_path):
    crashed = make_sweep(tmp_path / "sweep")
    out = tmp_path / "out"
    summary = compare.compare([tmp_path / "sweep"], out)

    assert summary["baseline"] == "at"
    assert {name: group["n_runs"] for name, group in summary["groups"].items()} == {"at": 4, "sgls": 4}
    assert [item["path"] for item in summary["skipped"]] == [os.path.realpath(crashed)]

    # Summary statistics against numpy/scipy, for a row column, a derived gap and the curve-based gap.
    at_pgd = _values(AT, "pgd")
    stat = summary["groups"]["at"]["metrics"]["best.pgd"]
    assert stat["mean"] == pytest.approx(at_pgd.mean())
    assert stat["std"] == pytest.approx(at_pgd.std(ddof=1))
    assert stat["ci95_t"] == pytest.approx(scipy.stats.t.interval(0.95, 3, loc=at_pgd.mean(),
                                                                  scale=scipy.stats.sem(at_pgd)))
    at_overfit = at_pgd - _values(AT, "final_pgd")
    assert summary["groups"]["at"]["metrics"]["robust_overfit_gap"]["mean"] == pytest.approx(at_overfit.mean())
    last_gap = [_curve(seed, 2.0)[-1]["robust_gap"] for seed in (0, 1, 2, 3)]
    assert summary["groups"]["sgls"]["metrics"]["train_test_robust_gap"]["mean"] == pytest.approx(np.mean(last_gap))
    assert "best.cw" not in summary["groups"]["sgls"]["metrics"]
    assert "best.cw" not in summary["comparisons"]["sgls"]

    # Tests against the baseline: Welch on all runs, paired by seed (folder order differs from seed order).
    sgls_pgd = _values(SGLS, "pgd")
    test = summary["comparisons"]["sgls"]["best.pgd"]
    welch = scipy.stats.ttest_ind(sgls_pgd, at_pgd, equal_var=False)
    assert test["welch"]["t"] == pytest.approx(welch.statistic)
    assert test["welch"]["p"] == pytest.approx(welch.pvalue)
    assert test["welch"]["diff"] == pytest.approx(sgls_pgd.mean() - at_pgd.mean())
    paired = scipy.stats.ttest_rel(sgls_pgd, at_pgd)
    assert test["paired"]["t"] == pytest.approx(paired.statistic)
    assert test["paired"]["p"] == pytest.approx(paired.pvalue)
    assert test["dz"] == pytest.approx((sgls_pgd - at_pgd).mean() / (sgls_pgd - at_pgd).std(ddof=1))
    assert test["note"] is None

    # summary.json holds what compare returned.
    with open(out / "summary.json") as handle:
        assert handle.read() == json.dumps(summary, indent=2) + "\n"

    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected_rows = {(name, metric) for name, group in summary["groups"].items() for metric in group["metrics"]}
    assert {(row["method"], row["metric"]) for row in rows} == expected_rows and len(rows) == len(expected_rows)
    assert len(rows) == 12 + 10  # at: 10 row columns + 2 gaps; sgls: no cw in either row
    sgls_row = next(row for row in rows if (row["method"], row["metric"]) == ("sgls", "best.pgd"))
    assert float(sgls_row["p_paired"]) == pytest.approx(paired.pvalue)
    at_row = next(row for row in rows if (row["method"], row["metric"]) == ("at", "best.pgd"))
    assert at_row["p_welch"] == "" and float(at_row["mean"]) == pytest.approx(at_pgd.mean())

    report = (out / "report.md").read_text()
    for text in ("- at: 4 run(s), seeds [0, 1, 2, 3]", "- sgls: 4 run(s)", "run_crashed", "no final.json",
                 "![robust_acc](robust_acc.png)", "p (paired)"):
        assert text in report, text
    # The report shows the statistics checked above against numpy/scipy (formatted from the summary, whose
    # means can differ from numpy's in the last bit: 51.825 rounds either way).
    best = report.split("## Best checkpoint")[1].split("## Final epoch")[0]
    for method, values in (("at", at_pgd), ("sgls", sgls_pgd)):
        stat = summary["groups"][method]["metrics"]["best.pgd"]
        assert stat["std"] == pytest.approx(values.std(ddof=1)) and stat["ci95_t"][0] < stat["mean"] < stat["ci95_t"][1]
        low, high = stat["ci95_t"]
        assert f"| PGD | {method} | 4 | {stat['mean']:.2f} ± {stat['std']:.2f} | [{low:.2f}, {high:.2f}] |" in best
    p_welch = "<0.001" if welch.pvalue < 0.001 else f"{welch.pvalue:.3f}"
    p_paired = "<0.001" if paired.pvalue < 0.001 else f"{paired.pvalue:.3f}"
    assert f"| sgls | best.pgd | {test['welch']['diff']:.2f} |" in report
    row = next(line for line in report.splitlines() if line.startswith("| sgls | best.pgd |"))
    assert f"| {p_welch} |" in row and f"| {p_paired} |" in row, row

    assert sorted(summary["plots"]) == ["clean_acc.png", "final_metrics.png", "grad_norm.png", "robust_acc.png"]
    for name in summary["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000


@pytest.mark.parametrize("variant, reason", [
    ({"at_loader": "cpu"}, "data.loader"),
    ({"sgls_seeds": (2, 0, 3, 5)}, "different seeds"),
])
def test_paired_only_for_same_seeds_on_gpu_loader(tmp_path, variant, reason):
    make_sweep(tmp_path / "sweep", **variant)
    # A different data.loader would make its own groups (it changes the data order); pooled here on purpose.
    summary = compare.compare([tmp_path / "sweep"], tmp_path / "out", pool=["data.loader"] * ("at_loader" in variant))
    test = summary["comparisons"]["sgls"]["best.pgd"]
    assert test["paired"] is None and test["dz"] is None and reason in test["note"]
    assert test["welch"]["p"] is not None and test["cohens_d"] is not None
    assert "p (paired)" in (tmp_path / "out" / "report.md").read_text()


def test_single_seed_groups_report_no_spread(tmp_path):
    make_run(tmp_path / "runs" / "a", "trades", 0, AT[0])
    make_run(tmp_path / "runs" / "b", "sgls", 0, SGLS[0])
    summary = compare.compare([tmp_path / "runs"], tmp_path / "out")
    assert summary["baseline"] == "sgls"  # no 'at': first alphabetically
    stat = summary["groups"]["trades"]["metrics"]["best.pgd"]
    assert stat["n"] == 1 and stat["std"] is None and stat["ci95_t"] is None and stat["ci95_boot"] is None
    assert summary["comparisons"]["trades"]["best.pgd"]["welch"] is None
    assert "n/a" in (tmp_path / "out" / "report.md").read_text()
    assert len(summary["plots"]) == 4


def test_malformed_final_json_names_the_file(tmp_path):
    run = make_run(tmp_path / "runs" / "r0", "at", 0, AT[0])
    (run / "final.json").write_text('{"rows": {"best": ')
    with pytest.raises(UserError, match=r"final\.json.*malformed"):
        compare.compare([tmp_path / "runs"], tmp_path / "out")
    (run / "final.json").write_text('[1, 2]')
    with pytest.raises(UserError, match=r"final\.json.*'rows'"):
        compare.load_run(run)


def test_malformed_metrics_line_names_file_and_line(tmp_path):
    run = make_run(tmp_path / "r0", "at", 0, AT[0])
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 7, "lr"\n')
    with pytest.raises(UserError, match=rf"metrics\.jsonl: line {EPOCHS + 1} is malformed"):
        compare.load_run(run)


def test_main_finds_nested_runs_and_reports_where(tmp_path, capsys):
    make_sweep(tmp_path / "sweeps" / "cifar")
    out = tmp_path / "report"
    assert compare.main([str(tmp_path / "sweeps"), "--out", str(out), "--baseline", "sgls"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed and "8 runs" in printed and "1 skipped" in printed
    assert list(json.loads((out / "summary.json").read_text())["comparisons"]) == ["at"]


def test_main_default_out_is_next_to_the_runs(tmp_path):
    make_sweep(tmp_path / "sweep")
    compare.main([str(tmp_path / "sweep")])
    report = (tmp_path / "sweep" / "compare" / "report.md").read_text()
    assert "- at: 4 run(s)" in report and "- sgls: 4 run(s)" in report and "Differences vs baseline `at`" in report


@pytest.mark.parametrize("argv, message", [
    (["missing_folder"], "no such folder"),
    (["{empty}"], "no run folders"),
    (["{sweep}", "--baseline", "mart"], "baseline 'mart'"),
    (["{sweep}", "--group-by", "model.arch"], "no key 'model.arch'"),
])
def test_main_user_errors(tmp_path, argv, message):
    (tmp_path / "empty").mkdir()
    make_sweep(tmp_path / "sweep")
    argv = [arg.format(empty=tmp_path / "empty", sweep=tmp_path / "sweep") for arg in argv]
    with pytest.raises(UserError, match=message):
        compare.main(argv + ["--out", str(tmp_path / "out")])


def _fail(folder, epoch=3, value="nan"):
    with open(os.path.join(folder, "failed.json"), "w") as handle:
        json.dump({"epoch": epoch, "reason": "training loss is not finite", "value": value,
                   "time": "2026-12-02T01:00:00"}, handle)
    return folder


def test_failed_runs_are_listed_and_left_out(tmp_path):
    crashed = make_sweep(tmp_path / "sweep")
    diverged = _fail(make_run(tmp_path / "sweep" / "sgls" / "run_diverged", "sgls", 9, SGLS[0], complete=False))
    # A failed.json beside a final.json (a run whose last epoch diverged after the table): still failed, not counted.
    late = _fail(make_run(tmp_path / "sweep" / "at" / "seed9", "at", 9, {**AT[0], "pgd": 0.0}), epoch=EPOCHS,
                 value="inf")
    summary = compare.compare([tmp_path / "sweep"], tmp_path / "out")
    assert {name: group["n_runs"] for name, group in summary["groups"].items()} == {"at": 4, "sgls": 4}
    assert summary["groups"]["at"]["metrics"]["best.pgd"]["mean"] == pytest.approx(_values(AT, "pgd").mean())
    assert summary["failed"] == [
        {"path": os.path.realpath(late), "epoch": EPOCHS, "reason": "training loss is not finite", "value": "inf",
         "time": "2026-12-02T01:00:00"},
        {"path": os.path.realpath(diverged), "epoch": 3, "reason": "training loss is not finite", "value": "nan",
         "time": "2026-12-02T01:00:00"}]
    assert [item["path"] for item in summary["skipped"]] == [os.path.realpath(crashed)]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["failed"] == summary["failed"]
    report = (tmp_path / "out" / "report.md").read_text()
    failed_section = report.split("## Failed runs")[1].split("## Skipped runs")[0]
    assert (f"- `{os.path.realpath(diverged)}`: failed at epoch 3: training loss is not finite (value nan)"
            in failed_section)
    assert f"`{os.path.realpath(late)}`: failed at epoch {EPOCHS}" in failed_section
    assert "2 failed run(s) (training diverged), left out of every statistic" in report


def test_only_failed_runs_is_a_user_error(tmp_path):
    _fail(make_run(tmp_path / "runs" / "r0", "at", 0, AT[0], complete=False))
    (tmp_path / "runs" / "r0" / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": Na')  # cut off mid-write
    with pytest.raises(UserError, match=r"no finished run to compare: 0 unfinished \(no final.json\), 1 failed; .*r0: "
                                       r"failed at epoch 3"):
        compare.compare([tmp_path / "runs"], tmp_path / "out")


def test_null_and_nan_metrics_are_missing_not_numbers(tmp_path):
    make_sweep(tmp_path / "sweep")
    for folder, value in (("seed1", "null"), ("seed2", "NaN")):  # json_safe writes null; a hand-made file NaN
        final_path = tmp_path / "sweep" / "at" / folder / "final.json"
        final_path.write_text(final_path.read_text().replace(f'"pgd": {AT[int(folder[-1])]["pgd"]}', f'"pgd": {value}'))
    metrics_path = tmp_path / "sweep" / "sgls" / "run_a" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    records[-1]["robust_gap"] = None
    metrics_path.write_text("".join(json.dumps(record) + "\n" for record in records))

    summary = compare.compare([tmp_path / "sweep"], tmp_path / "out")
    at = summary["groups"]["at"]["metrics"]
    assert at["best.pgd"]["n"] == 2 and at["best.pgd"]["values"] == [AT[0]["pgd"], AT[3]["pgd"]]
    assert at["best.pgd"]["mean"] == pytest.approx((AT[0]["pgd"] + AT[3]["pgd"]) / 2)
    assert at["robust_overfit_gap"]["n"] == 2 and at["final.pgd"]["n"] == 4
    assert summary["groups"]["sgls"]["metrics"]["train_test_robust_gap"]["n"] == 3
    assert summary["comparisons"]["sgls"]["best.pgd"]["note"] == "this metric is missing for some seeds"
    root = os.path.realpath(tmp_path / "sweep")
    assert summary["missing"] == [
        {"path": f"{root}/at/seed1", "metric": "best.pgd", "file": "final.json", "value": "null"},
        {"path": f"{root}/at/seed2", "metric": "best.pgd", "file": "final.json", "value": "NaN"},
        {"path": f"{root}/sgls/run_a", "metric": "train_test_robust_gap", "file": "metrics.jsonl", "value": "null"}]
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"- `{root}/at/seed2`: best.pgd is NaN in final.json" in report.split("## Missing values")[1]
    statistics = report.split("## Best checkpoint")[1].split("## Failed runs")[0]
    assert "nan" not in statistics.lower() and "| PGD | at | 2 |" in statistics
    json.loads((tmp_path / "out" / "summary.json").read_text())  # still valid JSON: no NaN slipped in
