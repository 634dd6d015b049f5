"""writers.plots on hand-made curves: the Figure objects build_figures returns are inspected before saving (epoch
ticks, titles, SGLS marker, gradient-norm axis, band clipping, train vs test styles), and write_plots still writes
every PNG from a summary that lacks the setting and the groups' params (an old summary)."""
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection

from engine.stats import column_mean_ci95
from writers import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EPOCHS = 5
SGLS_START = 3
EVAL_TEXT = "PGD-20, L-inf eps 8/255, n = 10000"
# Per seed: accuracies near 100 with one outlier seed, and a gradient norm near 0 with one large one, so the 95% t
# interval of 3 runs passes 100% and 0 (checked in the test) and only the clipping keeps the bands in range.
HIGH_ACC = (99.5, 100.0, 91.0)
SMALL_NORM = (0.01, 0.02, 1.5)


def _runs(offset):
    """Three runs' metrics.jsonl records; epoch 3 has no evaluation (no test keys), as the epoch loop writes it."""
    runs = []
    for seed in range(3):
        records = []
        for epoch in range(1, EPOCHS + 1):
            record = {"epoch": epoch, "train_robust_acc": 40 + 4 * epoch + 3 * seed + offset,
                      "train_clean_acc": HIGH_ACC[seed], "grad_norm": SMALL_NORM[seed]}
            if epoch != 3:
                record.update(test_pgd_acc=30 + 3 * epoch + 4 * seed + offset, test_clean_acc=HIGH_ACC[seed])
            records.append(record)
        runs.append(records)
    return runs


def _params(method):
    params = {"method.name": method, "evaluation.pgd_steps": 10, "evaluation.subset": 1000,
              "evaluation.final_n": 0, "attack.norm": "linf", "attack.eps": 8.0, "attack.steps": 7}
    if method.startswith("sgls"):
        params["method.sgls_start_epoch"] = SGLS_START
    return params


def _summary(groups, *, setting=True, params=True, test_size=10000):
    metrics = ["best.clean", "best.pgd", "final.clean", "final.pgd"]
    summary = {"metrics": metrics, "groups": {
        group: {"metrics": {metric: {"mean": 50.0 + index, "ci95_t": [48.0 + index, 52.0 + index]}
                            for index, metric in enumerate(metrics)}} for group in groups}}
    if params:
        for group in groups:
            summary["groups"][group]["params"] = _params(group)
    if setting:
        summary["setting"] = {"dataset": "cifar10", "arch": "resnet18",
                              "train_attack": {"norm": "linf", "eps": 8 / 255, "steps": 7},
                              "eval": {"pgd_steps": 20, "cw_steps": 30, "n": test_size, "text": EVAL_TEXT}}
    return summary


CURVES = {"at": _runs(0.0), "sgls": _runs(2.0)}
CURVE_FIGURES = ("robust_acc.png", "clean_acc.png", "grad_norm.png")
FIRST_KEY = {"robust_acc.png": "test_pgd_acc", "clean_acc.png": "test_clean_acc", "grad_norm.png": "grad_norm"}


@pytest.fixture
def figures():
    return plots.build_figures(CURVES, _summary(CURVES))


def _artist(axes, gid):
    found = [a for a in [*axes.get_lines(), *axes.collections] if a.get_gid() == gid]
    assert len(found) == 1, (gid, [a.get_gid() for a in [*axes.get_lines(), *axes.collections]])
    return found[0]


def _vertical_lines(axes):
    """x of each axvline: a Line2D from y 0 to 1 in axes coordinates at one x."""
    return [line.get_xdata()[0] for line in axes.get_lines()
            if list(line.get_ydata()) == [0, 1] and line.get_xdata()[0] == line.get_xdata()[1]]


def test_epoch_ticks_are_integers(figures):
    for name in CURVE_FIGURES:
        axes = figures[name].axes[0]
        FigureCanvasAgg(figures[name]).draw()  # tick labels are only set when drawn
        low, high = axes.get_xlim()
        ticks = [tick for tick in axes.get_xticks() if low <= tick <= high]
        labels = [label.get_text() for label in axes.get_xticklabels() if label.get_text()]
        # Matplotlib's default locator puts ticks at 1.5, 2.5, ... over 5 epochs; epochs are whole numbers.
        assert ticks and all(float(tick).is_integer() for tick in ticks), (name, ticks)
        assert labels and all(label.lstrip("−-").isdigit() for label in labels), (name, labels)


def test_titles_name_the_evaluation_attack_and_n(figures):
    robust = figures["robust_acc.png"].axes[0].get_title()
    assert "PGD-10 on 1000 test images, L-inf eps 8/255" in robust and "cifar10 resnet18" in robust
    assert "1000 test images" in figures["clean_acc.png"].axes[0].get_title()
    final = figures["final_metrics.png"].get_suptitle()
    assert EVAL_TEXT in final and "n = 10000" in final
    # The final table's columns carry their attack's settings.
    labels = [label.get_text() for label in figures["final_metrics.png"].axes[0].get_xticklabels()]
    assert labels == ["clean", "PGD-20"]


def test_per_epoch_image_count_is_capped_by_the_test_set():
    # A 500-image test set (final table on all of it, n = 500) with evaluation.subset 1000 evaluates 500.
    title = plots.build_figures(CURVES, _summary(CURVES, test_size=500))["robust_acc.png"].axes[0].get_title()
    assert "PGD-10 on 500 test images" in title
    params = {**_params("at"), "evaluation.subset": 0}
    assert plots.epoch_attack_text(params, {}) == "PGD-10 on all test images, L-inf eps 8/255"
    assert plots.epoch_attack_text({**params, "attack.norm": "l2", "attack.eps": 0.5}, {"eval": {"n": 500}}) \
        == "PGD-10 on 500 test images, L2 eps 0.5"


def test_sgls_start_epoch_is_marked_only_for_sgls_groups(figures):
    for name in CURVE_FIGURES:
        axes = figures[name].axes[0]
        assert _vertical_lines(axes) == [SGLS_START], name
        marker = _artist(axes, "sgls/sgls_start")
        assert marker.get_color() == _artist(axes, f"sgls/{FIRST_KEY[name]}").get_color()  # the group's colour
        assert any(f"SGLS from epoch {SGLS_START}" in text.get_text() for text in axes.get_legend().get_texts())
    at_only = {"at": CURVES["at"]}
    for name, figure in plots.build_figures(at_only, _summary(at_only)).items():
        if name in CURVE_FIGURES:
            assert _vertical_lines(figure.axes[0]) == [], name
    # A start after the last epoch: SGLS never ran, and no marker stretches the axis past the data.
    late = _summary(CURVES)
    late["groups"]["sgls"]["params"]["method.sgls_start_epoch"] = EPOCHS + 1
    assert _vertical_lines(plots.build_figures(CURVES, late)["robust_acc.png"].axes[0]) == []


def test_gradient_norm_axis_states_its_definition(figures):
    label = figures["grad_norm.png"].axes[0].get_ylabel()
    for part in ("L2 norm", "gradient", "all", "parameters", "per step", "weight decay", "mean over the epoch"):
        assert part in label, (part, label)


def test_bands_stay_within_their_range(figures):
    # The unclipped intervals do pass the limits: otherwise this test could not fail.
    matrix = np.array([[value] * EPOCHS for value in HIGH_ACC])
    assert column_mean_ci95(matrix)[3].max() > 100
    assert column_mean_ci95(np.array([[value] * EPOCHS for value in SMALL_NORM]))[2].min() < 0
    for name, (low, high) in (("clean_acc.png", (0, 100)), ("robust_acc.png", (0, 100)),
                              ("grad_norm.png", (0, np.inf))):
        bands = [c for c in figures[name].axes[0].collections if isinstance(c, PolyCollection)]
        assert bands, name
        y = np.concatenate([path.vertices[:, 1] for band in bands for path in band.get_paths()])
        assert y.min() >= low and y.max() <= high, (name, y.min(), y.max())
    clean_y = np.concatenate([path.vertices[:, 1] for path in
                              _artist(figures["clean_acc.png"].axes[0], "at/test_clean_acc/band").get_paths()])
    assert clean_y.max() == 100  # clipped at the limit, not dropped


def test_train_and_test_curves_can_be_told_apart(figures):
    for name, test_key, train_key in (("robust_acc.png", "test_pgd_acc", "train_robust_acc"),
                                      ("clean_acc.png", "test_clean_acc", "train_clean_acc")):
        axes = figures[name].axes[0]
        for group in CURVES:
            test_line, train_line = _artist(axes, f"{group}/{test_key}"), _artist(axes, f"{group}/{train_key}")
            assert test_line.get_linestyle() != train_line.get_linestyle()
            assert test_line.get_color() == train_line.get_color()  # one colour per group; the style tells apart
            test_band = _artist(axes, f"{group}/{test_key}/band")
            train_band = _artist(axes, f"{group}/{train_key}/band")
            assert test_band.get_hatch() != train_band.get_hatch() and train_band.get_hatch()
            assert test_band.get_alpha() != train_band.get_alpha()
    legend = [text.get_text() for text in figures["robust_acc.png"].axes[0].get_legend().get_texts()]
    assert "at train (robust, PGD-7 of the training attack) (n=3 runs)" in legend
    assert "at test (PGD-10) (n=3 runs)" in legend


def test_plots_written_without_setting_or_params(tmp_path):
    summary = _summary(CURVES, setting=False, params=False)
    paths = plots.write_plots(CURVES, summary, str(tmp_path))
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == sorted([*CURVE_FIGURES, "final_metrics.png"])
    for path in paths:
        data = open(path, "rb").read()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    figures = plots.build_figures(CURVES, summary)
    assert figures["robust_acc.png"].axes[0].get_title() == "robust accuracy per epoch"
    assert _vertical_lines(figures["robust_acc.png"].axes[0]) == []  # no params: no SGLS start known
    assert figures["final_metrics.png"].get_suptitle() == "final table"


def test_final_metrics_put_calibration_on_its_own_axes_and_show_the_ema_rows():
    summary = _summary(CURVES)
    extra = ["best.ece_clean", "best.nll_clean", "final.ece_clean", "ema_best.pgd", "ema_final.pgd"]
    summary["metrics"] += extra
    for group in summary["groups"].values():
        for metric in extra:
            value = 2.0 if "nll" in metric else 7.0 if "ece" in metric else 45.0
            group["metrics"][metric] = {"mean": value, "ci95_t": None}
    figure = plots.build_figures(CURVES, summary)["final_metrics.png"]
    grid = figure.axes[0].get_subplotspec().get_gridspec()
    assert (grid.nrows, grid.ncols) == (3, 4)  # accuracy / ECE / NLL  x  best / final / ema_best / ema_final

    def panel(row, col):
        return next(axes for axes in figure.axes if axes.get_subplotspec().rowspan.start == row
                    and axes.get_subplotspec().colspan.start == col)

    def ticks(axes):
        return [label.get_text() for label in axes.get_xticklabels()]

    assert ticks(panel(0, 0)) == ["clean", "PGD-20"] and ticks(panel(0, 2)) == ["PGD-20"]
    assert ticks(panel(1, 0)) == ["ece_clean"] and ticks(panel(2, 0)) == ["nll_clean"] and ticks(panel(2, 1)) == []
    assert [panel(k, 0).get_ylabel() for k in range(3)] == ["accuracy (%)", "ECE (%, 15 bins)", "NLL (nats)"]
    assert "ema_final row" in panel(0, 3).get_title()
    # No accuracy panel holds a calibration point, and the ECE and NLL panels hold only theirs.
    def ys(axes):
        return {float(y) for line in axes.get_lines() for y in line.get_ydata()}
    assert all(not ys(panel(0, col)) & {2.0, 7.0} for col in range(4)) and 45.0 in ys(panel(0, 3))
    assert ys(panel(1, 0)) == {7.0} and ys(panel(2, 0)) == {2.0}
