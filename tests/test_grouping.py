"""engine.compare grouping, the setting block and per-example statistics, on run folders built by hand."""
import json
import os

import numpy as np
import pytest
import scipy.stats

from engine import compare, grouping
from engine.errors import UserError

N_IMAGES = 120
HEADER = ["index", "label", "clean_margin", "clean_confidence", "clean_nll", "pgd_confidence", "pgd_nll", "clean",
          "pgd", "autoattack", "worst"]


def _params(method, seed, **changes):
    params = {"method.name": method, "training.seed": seed, "data.dataset": "cifar10", "data.loader": "gpu",
              "data.dir": "/data", "model.arch": "resnet18", "training.epochs": 6, "attack.norm": "linf",
              "attack.eps": 8.0, "attack.step_size": 2.0, "attack.steps": 10, "training.engine": "eager",
              "training.precision": "fp32", "optimizer.lr": 0.1, "evaluation.final_n": 0,
              "output.name": f"{method}-s{seed}",
              "training.device": "cpu", "method.sgls_start_epoch": 3}
    params.update(changes)
    return params


def _correct(seed, method, lr, column):
    """Deterministic 0/1 correctness per image: a shared difficulty plus a method / lr / seed effect."""
    rng = np.random.default_rng([seed, len(method), int(lr * 1000), len(column)])
    difficulty = np.random.default_rng(42).normal(size=N_IMAGES)
    shift = {"clean": 1.0, "pgd": 0.0, "autoattack": -0.1, "worst": -0.2}[column]
    shift += 0.25 * (method == "sgls") + 0.3 * (lr == 0.1)
    return (difficulty + 0.5 * rng.normal(size=N_IMAGES) < shift).astype(int)


def make_run(root, method, seed, *, examples=True, final_rows=("best", "final"), **changes):
    params = _params(method, seed, **changes)
    folder = os.path.join(root, f"{method}-lr{params['optimizer.lr']}-s{seed}{changes.get('suffix', '')}")
    params.pop("suffix", None)
    os.makedirs(folder)
    with open(os.path.join(folder, "params.json"), "w") as handle:
        json.dump(params, handle)
    lr = params["optimizer.lr"]
    rows, tables = {}, {}
    for row in final_rows:
        columns = {column: _correct(seed + 10 * (row != "best"), method, lr, column) for column in HEADER[7:]}
        columns["autoattack"] = columns["autoattack"].astype(object)
        columns["autoattack"][N_IMAGES // 2:] = ""  # AutoAttack on a subset: empty cells
        tables[row] = columns
        rows[row] = {"epoch": 6, **{column: 100.0 * np.mean([v for v in values if v != ""])
                                    for column, values in columns.items()},
                     "ece_clean": 3.0 + seed, "nll_clean": 0.5 + 0.01 * seed}
    final = {"rows": rows, "settings": {"eps": 8 / 255, "step_size": 2 / 255, "pgd_steps": 20, "cw_steps": 30,
                                        "n": params.get("evaluation.final_n") or N_IMAGES,
                                        "autoattack_version": "standard", "autoattack_n": N_IMAGES // 2},
             "method": method, "seed": seed}
    with open(os.path.join(folder, "final.json"), "w") as handle:
        json.dump(final, handle)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as handle:
        handle.write(json.dumps({"epoch": 6, "test_pgd_acc": 40.0 + seed, "robust_gap": 5.0}) + "\n")
    with open(os.path.join(folder, "provenance.json"), "w") as handle:
        json.dump([{"git_commit": "abc123", "git_dirty": False, "torch": "2.14.1", "device_name": "cpu"}], handle)
    if examples:
        os.makedirs(os.path.join(folder, "examples"))
        order = np.random.default_rng(seed).permutation(N_IMAGES)  # line order need not be index order
        for row, columns in tables.items():
            with open(os.path.join(folder, "examples", f"{row}.csv"), "w") as handle:
                handle.write(",".join(HEADER) + "\n")
                for i in order:
                    cells = [i, i % 10, 0.5, 0.9, 0.3, 0.6, 1.1] + [columns[c][i] for c in HEADER[7:]]
                    handle.write(",".join(map(str, cells)) + "\n")
    return folder


def make_grid(root, methods=("at", "sgls"), lrs=(0.01, 0.1), seeds=(0, 1, 2), **kwargs):
    return [make_run(root, method, seed, **{"optimizer.lr": lr}, **kwargs)
            for method in methods for lr in lrs for seed in seeds]


def test_a_grid_sweep_keeps_its_grid_points_apart(tmp_path):
    make_grid(tmp_path / "sweep")
    summary = compare.compare([tmp_path / "sweep"], tmp_path / "out")
    assert summary["group_by"] == ["method.name", "optimizer.lr"]
    names = ["method.name=at, optimizer.lr=0.01", "method.name=at, optimizer.lr=0.1",
             "method.name=sgls, optimizer.lr=0.01", "method.name=sgls, optimizer.lr=0.1"]
    assert list(summary["groups"]) == names
    assert all(group["n_runs"] == 3 and group["seeds"] == [0, 1, 2] for group in summary["groups"].values())
    # Default baseline: the first group of method 'at'; every other group is tested against it.
    assert summary["baseline"] == names[0] and list(summary["comparisons"]) == names[1:]
    assert summary["groups"][names[3]]["params"]["optimizer.lr"] == 0.1
    assert summary["groups"][names[3]]["params"]["method.sgls_start_epoch"] == 3
    assert "training.seed" not in summary["groups"][names[3]]["params"]
    assert summary["setting"]["differs"] == {"method.name": ["at", "sgls"], "optimizer.lr": [0.01, 0.1]}
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"- {names[1]}: 3 run(s), seeds [0, 1, 2]" in report
    assert "grouped by: `method.name`, `optimizer.lr`" in report


def test_baseline_by_method_name_and_ambiguity(tmp_path):
    make_grid(tmp_path / "sweep", seeds=(0, 1))
    summary = compare.compare([tmp_path / "sweep"], tmp_path / "out", baseline="method.name=sgls, optimizer.lr=0.1")
    assert summary["baseline"] == "method.name=sgls, optimizer.lr=0.1"
    with pytest.raises(UserError, match="is the method of 2 groups"):
        compare.compare([tmp_path / "sweep"], tmp_path / "out", baseline="sgls")
    only_lr = tmp_path / "one_lr"
    make_grid(only_lr, lrs=(0.1,), seeds=(0, 1))
    assert compare.compare([only_lr], tmp_path / "out2", baseline="sgls")["baseline"] == "sgls"


def test_runs_with_other_settings_are_refused_unless_pooled(tmp_path):
    make_grid(tmp_path / "sweep", seeds=(0, 1))
    with pytest.raises(UserError, match=r"grouped by method.name also differ in optimizer.lr: 0.01 \| 0.1.*--pool"):
        compare.main([str(tmp_path / "sweep"), "--group-by", "method.name", "--out", str(tmp_path / "out")])
    summary = compare.compare([tmp_path / "sweep"], tmp_path / "out", group_by="method.name", pool=["optimizer.lr"])
    assert {name: group["n_runs"] for name, group in summary["groups"].items()} == {"at": 4, "sgls": 4}
    assert summary["pooled"] == {"optimizer.lr": [0.01, 0.1]}
    assert "pooled over `optimizer.lr` (--pool): 0.01 | 0.1" in (tmp_path / "out" / "report.md").read_text()
    # Several --group-by keys; and a final-table key (final_n) separates groups too, by default.
    by_both = compare.compare([tmp_path / "sweep"], tmp_path / "o3", group_by="method.name,optimizer.lr")
    assert len(by_both["groups"]) == 4
    make_run(tmp_path / "sweep", "at", 5, **{"optimizer.lr": 0.1, "evaluation.final_n": 60})
    with pytest.raises(UserError, match="evaluation.final_n"):
        compare.compare([tmp_path / "sweep"], tmp_path / "o4", group_by="method.name,optimizer.lr")
    assert len(compare.compare([tmp_path / "sweep"], tmp_path / "o5")["groups"]) == 5
    # Keys that do not change what a run computes never separate runs (output.name, data.dir, device here).
    assert not any(grouping.ignored_key(key) for key in ("evaluation.final_n", "evaluation.presets", "attack.eps"))
    assert all(grouping.ignored_key(key) for key in ("output.name", "data.dir", "training.device",
                                                     "evaluation.batch_size"))


def test_setting_block_carries_the_params(tmp_path):
    make_grid(tmp_path / "sweep", lrs=(0.1,), seeds=(0, 1))
    make_run(tmp_path / "sweep", "at", 7, **{"attack.steps": 7, "suffix": "x"})
    summary = compare.compare([tmp_path / "sweep"], tmp_path / "out", pool=["attack.steps"])
    setting = summary["setting"]
    assert list(summary)[0] == "setting"
    params = _params("at", 0)
    assert (setting["dataset"], setting["arch"], setting["epochs"]) == (params["data.dataset"], params["model.arch"],
                                                                      params["training.epochs"])
    attack = setting["train_attack"]
    assert (attack["norm"], attack["eps"], attack["step_size"]) == ("linf", 8.0, 2.0)
    assert attack["steps"] == [10, 7] and attack["text"] == ("PGD-10, L-inf eps 8/255, step 2/255 | "
                                                             "PGD-7, L-inf eps 8/255, step 2/255")
    assert setting["eval"]["pgd_steps"] == 20 and setting["eval"]["n"] == N_IMAGES
    assert setting["eval"]["text"] == (f"PGD-20, CW-30, AutoAttack standard (n = {N_IMAGES // 2}), L-inf eps 8/255, "
                                       f"n = {N_IMAGES}")
    assert (setting["engine"], setting["precision"]) == ("eager", "fp32")
    assert (setting["git_commit"], setting["torch"], setting["differs"]) == ("abc123", "2.14.1",
                                                                            {"attack.steps": [10, 7],
                                                                             "method.name": ["at", "sgls"]})
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.index("## Setting") < report.index("## Groups")
    assert "- training attack: PGD-10, L-inf eps 8/255, step 2/255 | PGD-7" in report and "git abc123" in report


def test_per_example_statistics_from_the_examples_files(tmp_path):
    runs = make_grid(tmp_path / "sweep", lrs=(0.1,), seeds=(0, 1, 2))
    summary = compare.compare([tmp_path / "sweep"], tmp_path / "out")
    result = summary["paired_examples"]["sgls"]["best"]
    assert result["n_images"] == N_IMAGES and sorted(result["columns"]) == ["autoattack", "clean", "pgd", "worst"]
    pgd = result["columns"]["pgd"]
    for seed in (0, 1, 2):
        base, other = _correct(seed, "at", 0.1, "pgd"), _correct(seed, "sgls", 0.1, "pgd")
        b, c = int(np.sum((other == 1) & (base == 0))), int(np.sum((other == 0) & (base == 1)))
        mcnemar = pgd["mcnemar"][str(seed)]
        assert (mcnemar["b"], mcnemar["c"]) == (b, c)
        assert mcnemar["p"] == pytest.approx(scipy.stats.binomtest(b, b + c, 0.5).pvalue)
    assert pgd["paired_seeds"] is True
    assert pgd["bootstrap"]["diff"] == pytest.approx(summary["comparisons"]["sgls"]["best.pgd"]["welch"]["diff"])
    assert result["columns"]["autoattack"]["n_images"] == N_IMAGES // 2  # only the images AutoAttack ran on
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Per-example (paired image by image) statistics" in report and "| sgls | best.pgd | 120 |" in report
    # 3 seeds per arm: the two-level bootstrap's seed level is too coarse, so its CI is flagged, not silent.
    assert pgd["bootstrap"]["few_seeds"] is True and "† fewer than 5 seeds in an arm" in report
    line = next(line for line in report.splitlines() if line.startswith("| sgls | best.pgd | 120 |"))
    assert "] †" in line
    make_grid(tmp_path / "five", lrs=(0.1,), seeds=(0, 1, 2, 3, 4))
    five = compare.compare([tmp_path / "five"], tmp_path / "out5")
    assert five["paired_examples"]["sgls"]["best"]["columns"]["pgd"]["bootstrap"]["few_seeds"] is False
    assert "†" not in (tmp_path / "out5" / "report.md").read_text()

    # An old run without examples/: no per-example statistics for that comparison, and the report says why.
    os.rename(os.path.join(runs[0], "examples"), os.path.join(runs[0], "examples_old"))
    summary = compare.compare([tmp_path / "sweep"], tmp_path / "out")
    assert "no examples/best.csv" in summary["paired_examples"]["sgls"]["best"]["note"]


def test_examples_that_do_not_pair_are_noted_and_bad_cells_refused(tmp_path):
    runs = make_grid(tmp_path / "sweep", lrs=(0.1,), seeds=(0, 1))
    path = os.path.join(runs[-1], "examples", "final.csv")
    lines = open(path).read().splitlines()
    first = lines[1].split(",")
    lines[1] = ",".join([str(int(first[0]) + 1000)] + first[1:])  # another test image
    open(path, "w").write("\n".join(lines) + "\n")
    summary = compare.compare([tmp_path / "sweep"], tmp_path / "out")
    assert "other test images" in summary["paired_examples"]["sgls"]["final"]["note"]
    assert summary["paired_examples"]["sgls"]["best"]["note"] is None
    lines[1] = ",".join(first[:7] + ["2"] + first[8:])
    open(path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"final\.csv: line 2, column 'clean': expected 0, 1 or empty"):
        compare.compare([tmp_path / "sweep"], tmp_path / "out")


def test_ema_rows_same_as_calibration_holm_and_seeds_needed(tmp_path):
    runs = make_grid(tmp_path / "sweep", lrs=(0.1,), seeds=(0, 1, 2), final_rows=("best", "final", "ema_best",
                                                                                   "ema_final"))
    for folder in runs:  # final evaluated once with best: final.json marks it, its values are best's
        with open(os.path.join(folder, "final.json")) as handle:
            final = json.load(handle)
        final["rows"]["final"] = {"epoch": 6, "same_as": "best"}
        with open(os.path.join(folder, "final.json"), "w") as handle:
            json.dump(final, handle)
        os.remove(os.path.join(folder, "examples", "final.csv"))
    summary = compare.compare([tmp_path / "sweep"], tmp_path / "out", detect=2.0)
    at = summary["groups"]["at"]["metrics"]
    assert at["final.pgd"]["values"] == at["best.pgd"]["values"]
    assert at["robust_overfit_gap"]["values"] == [0.0, 0.0, 0.0]
    assert {"ema_best.pgd", "ema_final.worst", "final.ece_clean", "best.nll_clean"} <= set(summary["metrics"])
    assert summary["metric_info"]["final.ece_clean"]["lower_is_better"] is True
    assert summary["paired_examples"]["sgls"]["final"]["columns"]["pgd"] == \
        summary["paired_examples"]["sgls"]["best"]["columns"]["pgd"]
    tests = summary["comparisons"]["sgls"]
    tested = [metric for metric, test in tests.items() if test["welch"] and test["welch"]["p"] is not None]
    raw = [tests[metric]["welch"]["p"] for metric in tested]
    order = np.argsort(raw, kind="stable")
    expected, running = {}, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(raw) - rank) * raw[i]))
        expected[tested[i]] = running
    assert {metric: tests[metric]["welch"]["p_holm"] for metric in tested} == pytest.approx(expected)
    needed = tests["best.pgd"]["seeds_needed"]
    a = np.array(at["best.pgd"]["values"])
    s = np.array(summary["groups"]["sgls"]["metrics"]["best.pgd"]["values"])
    assert needed["sd"] == pytest.approx(np.sqrt((a.var(ddof=1) + s.var(ddof=1)) / 2))
    assert needed["detect"]["delta"] == 2.0
    report = (tmp_path / "out" / "report.md").read_text()
    for text in ("## Weight-EMA best checkpoint", "ECE clean (lower is better)", "Holm p (Welch)", "### Seeds needed"):
        assert text in report, text


def test_cis_are_clipped_and_small_samples_have_no_bootstrap(tmp_path):
    make_grid(tmp_path / "sweep", lrs=(0.1,), seeds=(0, 1))
    for folder, value in ((tmp_path / "sweep" / "at-lr0.1-s0", 99.9), (tmp_path / "sweep" / "at-lr0.1-s1", 90.0)):
        final = json.loads((folder / "final.json").read_text())
        final["rows"]["best"]["clean"] = value
        (folder / "final.json").write_text(json.dumps(final))
    summary = compare.compare([tmp_path / "sweep"], tmp_path / "out")
    stat = summary["groups"]["at"]["metrics"]["best.clean"]
    raw_high = scipy.stats.t.interval(0.95, 1, loc=94.95, scale=scipy.stats.sem([99.9, 90.0]))[1]
    assert raw_high > 100 and stat["ci95_t"][1] == 100.0 and stat["ci95_boot"] is None


def test_real_grid_sweep_compare_keeps_learning_rates_apart(tmp_path):
    from engine.sweep import main as sweep
    from tests.test_sweep import TINY
    out = tmp_path / "sweep"
    sweep([], TINY + [f"--data.dir={tmp_path / 'data'}", "--training.epochs=1", "--schedule.milestones=1",
                      "--methods=at", "--seeds=0-1", "--grid", "optimizer.lr=0.01,0.1", "--out", str(out),
                      "--compare"], log=lambda *_: None)
    summary = json.loads((out / "compare" / "summary.json").read_text())
    assert list(summary["groups"]) == ["optimizer.lr=0.01", "optimizer.lr=0.1"]
    assert all(group["seeds"] == [0, 1] for group in summary["groups"].values())
    assert summary["setting"]["dataset"] == "synthetic" and summary["setting"]["arch"] == "small_cnn"
    assert summary["setting"]["train_attack"]["steps"] == 2 and summary["setting"]["epochs"] == 1
    report = (out / "compare" / "report.md").read_text()
    assert "- optimizer.lr=0.01: 2 run(s), seeds [0, 1]" in report and "at: 4 run(s)" not in report


def test_setting_names_the_precision_auto_resolved_to():
    def run(engine, precision, device):
        provenance = [{"device": device}] if device else None
        return grouping.Run("r", {"training.engine": engine, "training.precision": precision}, provenance=provenance)
    assert grouping._precision(run("fast", "auto", "cuda:0")) == "bf16"
    assert grouping._precision(run("fast", "auto", "cpu")) == "fp32"
    assert grouping._precision(run("eager", "auto", None)) == "fp32"  # eager: fp32 unless fp64, wherever it ran
    assert grouping._precision(run("fast", "auto", None)) == "auto"  # no provenance: not guessed
    assert grouping._precision(run("fast", "fp16", "cuda")) == "fp16"


def test_setting_names_the_training_data_and_its_label_noise(tmp_path):
    noisy = grouping.Run("r", {"data.train_limit": 500, "data.val_size": 500, "method.label_noise": "sym",
                               "method.noise_rate": 0.4, "method.noise_seed": 0})
    assert grouping._training_data(noisy) == ("500 training images (500 held out for validation), sym label noise "
                                              "40% (noise seed 0)")
    make_grid(tmp_path / "sweep", lrs=(0.1,), seeds=(0, 1))
    compare.compare([tmp_path / "sweep"], tmp_path / "out")
    params = _params("at", 0)
    limit = params.get("data.train_limit") or "all"
    val = params.get("data.val_size", 1000)
    assert f"- training data: {limit} training images ({val} held out for validation)\n" in \
        (tmp_path / "out" / "report.md").read_text()
