"""writers.board.write_final_board: the run's hparams and final table, read back from the event files with
TensorBoard's own reader, equal params.json and final.json; a rewrite replaces them; no-op when switched off or
when the tensorboard package is missing."""
import json
import math
import os
import sys

import pytest

from engine import config
from writers import board
from writers.run_files import MetricsLog, write_final, write_params

EPOCHS = 4
# As engine/train/final.py writes them: best at its checkpoint's epoch, final at the last; an EMA row and a
# preset column only some runs have; a column that was not measured (null) and a text column are no scalars.
ROWS = {"best": {"epoch": 3, "clean": 81.25, "fgsm": 55.5, "pgd": 47.125, "cw": 46.0, "worst": 45.5, "n": 1000},
        "final": {"epoch": EPOCHS, "clean": 82.0, "fgsm": 54.0, "pgd": 45.75, "cw": None, "worst": 44.0, "n": 1000,
                  "preset_x": 44.5, "note": "text"},
        "ema_final": {"clean": 83.5, "pgd": 48.0, "n": 1000}}


def _params(**overrides):
    """A real resolved config, through JSON as params.json holds it (lists, booleans, empty strings)."""
    cfg = config.load(advise=False, overrides={"training.epochs": EPOCHS, "method.name": "sgls", **overrides})
    return json.loads(json.dumps(config.flat(cfg)))


def _make_run(run_dir, params):
    """params.json, a few epochs of MetricsLog scalars and final.json, as a finished run has them."""
    write_params(str(run_dir), params)
    log = MetricsLog(str(run_dir))
    log.truncate_after(0)
    for epoch in range(1, EPOCHS + 1):
        log.append({"epoch": epoch, "lr": 0.1, "train_loss": 2.0 / epoch})
    log.close()
    write_final(str(run_dir), ROWS, {"eps": 8 / 255, "pgd_steps": 20, "n": 1000}, method="sgls", seed=0)


def _read_back(run_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    hparams = {tag: plugin_data_pb2.HParamsPluginData.FromString(content)
               for tag, content in events.PluginTagToContent("hparams").items()}
    return events, hparams


def _hparam(value):
    kind = value.WhichOneof("kind")
    return getattr(value, kind)


def test_hparams_and_final_table_equal_params_and_final_json(tmp_path):
    pytest.importorskip("tensorboard")
    _make_run(tmp_path, _params())
    params = json.loads((tmp_path / "params.json").read_text())
    rows = json.loads((tmp_path / "final.json").read_text())["rows"]
    path = board.write_final_board(str(tmp_path), params, rows)
    assert path is not None and os.path.dirname(path) == str(tmp_path / "tensorboard")  # the run's own folder

    events, hparams = _read_back(tmp_path)
    # Session start and end only (writers/board.py says why no experiment summary).
    assert sorted(hparams) == ["_hparams_/session_end_info", "_hparams_/session_start_info"]
    assert hparams["_hparams_/session_end_info"].session_end_info.status == 1  # STATUS_SUCCESS
    stored = {key: _hparam(value) for key, value in hparams["_hparams_/session_start_info"]
              .session_start_info.hparams.items()}
    assert set(stored) == set(params)
    for key, value in params.items():
        if isinstance(value, bool):
            assert stored[key] == ("true" if value else "false"), key
        elif isinstance(value, (int, float)):
            assert stored[key] == float(value), key
        elif isinstance(value, str):
            assert stored[key] == value, key
        else:  # lists: their JSON text
            assert json.loads(stored[key]) == value, key
    assert stored["schedule.milestones"] == "[100, 150]" and stored["method.name"] == "sgls"

    expected = {f"final_table/{row}/{column}": (values.get("epoch", EPOCHS), value)
                for row, values in rows.items() for column, value in values.items()
                if column != "epoch" and isinstance(value, (int, float)) and math.isfinite(value)}
    assert "final_table/final/cw" not in expected and "final_table/final/note" not in expected
    assert "final_table/ema_final/pgd" in expected and "final_table/final/preset_x" in expected
    tags = events.Tags()["scalars"]
    assert sorted(tag for tag in tags if tag.startswith("final_table/")) == sorted(expected)
    for tag, (step, value) in expected.items():
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [(step, pytest.approx(value))], tag
    # MetricsLog's per-epoch scalars are still there beside them.
    assert [e.step for e in events.Scalars("train_loss")] == list(range(1, EPOCHS + 1))


def test_rewritten_final_table_replaces_the_earlier_one(tmp_path):
    pytest.importorskip("tensorboard")
    params = _params()
    _make_run(tmp_path, params)
    board.write_final_board(str(tmp_path), params, ROWS)
    changed = {**ROWS, "final": {**ROWS["final"], "pgd": 40.0}}
    board.write_final_board(str(tmp_path), {**params, "method.sgls_alpha": 0.5}, changed)
    assert len([name for name in os.listdir(tmp_path / "tensorboard") if name.endswith(board.FINAL_SUFFIX)]) == 1
    events, hparams = _read_back(tmp_path)
    assert [(e.step, e.value) for e in events.Scalars("final_table/final/pgd")] == [(EPOCHS, 40.0)]
    start = hparams["_hparams_/session_start_info"].session_start_info
    assert start.hparams["method.sgls_alpha"].number_value == 0.5
    assert len(events.Scalars("lr")) == EPOCHS  # MetricsLog's file untouched


def test_no_op_when_output_tensorboard_is_false(tmp_path):
    assert board.write_final_board(str(tmp_path), _params(**{"output.tensorboard": False}), ROWS) is None
    assert not (tmp_path / "tensorboard").exists()


def test_no_op_without_the_tensorboard_package(tmp_path, monkeypatch):
    # None in sys.modules makes `import` raise ImportError, as when the package is not installed; the submodules
    # too, since an already imported submodule would otherwise be found without its parent.
    for name in ("torch.utils.tensorboard", "torch.utils.tensorboard.summary", "torch.utils.tensorboard.writer"):
        monkeypatch.setitem(sys.modules, name, None)
    assert board.write_final_board(str(tmp_path), _params(), ROWS) is None
    assert not (tmp_path / "tensorboard").exists()


def test_hparam_values_and_final_scalars():
    assert board.hparam_values({"a.b": True, "a.c": [1, 2], "a.d": "x", "a.e": 0.5, "a.f": [], "a.g": None}) == {
        "a.b": "true", "a.c": "[1, 2]", "a.d": "x", "a.e": 0.5, "a.f": "[]", "a.g": "null"}
    assert board.final_scalars({"best": {"epoch": 2, "pgd": 50, "worst": math.nan, "flag": True}, "bad": None}, 9) \
        == {"final_table/best/pgd": (50.0, 2)}
