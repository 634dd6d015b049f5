"""The run folders of a comparison: reading them, which runs are pooled into one group, and their setting.

Runs are grouped by every resolved params.json key whose value differs between them, other than training.seed and
the keys that do not change what a run computes (where it runs and writes, how it shows progress: the
RESUMABLE_CHANGES of engine/train/run_state.py less the final-table keys). The final-table keys
(evaluation.final_n, .final_pgd_steps, .cw_steps, .fgsm, .autoattack*, .presets, .seed) are resumable because the
final table states its settings, but they change the numbers compared here, so they do separate groups. With
--group-by K1,K2 the runs are grouped by those keys only, and a run differing in any other such key is refused
unless that key is pooled (--pool KEY).
"""
import ast
import functools
import importlib.util
import json
import os
from dataclasses import dataclass, field

from engine.errors import UserError
from writers.examples import VALUE_COLUMNS

SEED_KEY = "training.seed"
METHOD_KEY = "method.name"
# Resumable keys that still change the compared numbers (what and on how many images the final table measured).
# evaluation.batch_size only changes how the evaluation is batched.
NUMBER_CHANGING = ("evaluation.",)
NUMBER_NEUTRAL = ("evaluation.batch_size",)


@dataclass
class Run:
    path: str
    params: dict
    metrics: list = field(default_factory=list)  # one dict per epoch, in file order
    final: dict | None = None  # None while the run is unfinished
    provenance: list | None = None  # provenance.json: one record per process that worked on the run
    examples: dict = field(default_factory=dict)  # row -> read_examples() result (or None: no file), read lazily


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
    provenance = None
    provenance_path = os.path.join(path, "provenance.json")
    if os.path.exists(provenance_path):
        # Only the setting block reads it; a damaged one (append_provenance tolerates those too) just leaves the
        # code version unknown there.
        try:
            provenance = _read_json(provenance_path)
        except UserError:
            provenance = None
        provenance = provenance if isinstance(provenance, list) else None
    return Run(path=path, params=params, metrics=metrics, final=final, provenance=provenance)


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



@functools.lru_cache(maxsize=1)
def resumable_changes():
    """RESUMABLE_CHANGES of engine/train/run_state.py, read from its source: importing that module pulls in torch
    and ffcv (15-30 s on the project's machine), far more than a comparison of JSON files should cost."""
    spec = importlib.util.find_spec("engine.train.run_state")
    with open(spec.origin, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), spec.origin)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "RESUMABLE_CHANGES" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise RuntimeError(f"{spec.origin}: no RESUMABLE_CHANGES tuple (engine.grouping reads it from there)")


@functools.lru_cache(maxsize=None)
def ignored_key(key):
    """True for keys that do not change what a run computes or what its final table reports."""
    neutral = [prefix for prefix in resumable_changes()
               if not prefix.startswith(NUMBER_CHANGING) or prefix in NUMBER_NEUTRAL]
    return key.startswith(tuple(neutral))


@functools.lru_cache(maxsize=None)
def _default(key):
    """The config default of a key an older run did not record (as refused_changes in run_state assumes); the
    import of engine.config is deferred to here, the first mixed comparison that needs it."""
    from engine import config
    param = config.KEYS.get(key)
    return None if param is None else json.loads(json.dumps(param.default))


def param(run, key):
    """run's params.json value of key, or the config default when the run predates the key."""
    return run.params[key] if key in run.params else _default(key)


def _text(value):
    return json.dumps(value) if not isinstance(value, str) else value


def _values(runs, key):
    """The distinct values of key over runs, in first-seen order (JSON-equal values counted once)."""
    seen = {}
    for run in runs:
        value = param(run, key)
        seen.setdefault(json.dumps(value, sort_keys=True), value)
    return list(seen.values())


def differing_keys(runs):
    """{key: [values]} of every params key (other than the seed and the ignored keys) that differs between runs."""
    keys = sorted({key for run in runs for key in run.params})
    differs = {}
    for key in keys:
        if key == SEED_KEY or ignored_key(key):
            continue
        values = _values(runs, key)
        if len(values) > 1:
            differs[key] = values
    return differs


def _ordered(keys):
    return sorted(keys, key=lambda key: (key != METHOD_KEY, key))


def group_runs(runs, group_by=None, pool=()):
    """({group name: [runs]} sorted by name, the grouping keys, {pooled key: [values]}, {differing key: [values]}).

    group_by None: every differing key except those in pool. Else exactly those keys; any other differing key not
    in pool is a UserError naming the keys and their values. A group's name is its value when the grouping key is
    method.name alone (or the one key given), else "key=value, key=value".
    """
    differs = differing_keys(runs)
    unknown_pool = [key for key in pool if not any(key in run.params for run in runs)]
    if unknown_pool:
        raise UserError(f"--pool: no run's params.json has {', '.join(unknown_pool)}")
    if group_by is None:
        keys = _ordered(key for key in differs if key not in pool)
        if not keys:
            keys = [METHOD_KEY] if any(METHOD_KEY in run.params for run in runs) else []
    else:
        keys = list(group_by)
        for key in keys:
            missing = [run.path for run in runs if key not in run.params]
            if missing:
                raise UserError(f"{missing[0]}/params.json has no key '{key}' to group by; "
                                f"use --group-by with one of: {', '.join(sorted(runs[0].params))}")
        unpooled = {key: values for key, values in differs.items() if key not in keys and key not in pool}
        if unpooled:
            detail = "; ".join(f"{key}: {' | '.join(map(_text, values))}" for key, values in unpooled.items())
            raise UserError(f"the runs grouped by {', '.join(keys)} also differ in {detail}; add those keys to "
                            f"--group-by, or pool over them with --pool KEY (one --pool per key)")
    bare = len(keys) == 1 and (keys[0] == METHOD_KEY or group_by is not None)
    groups = {}
    for run in runs:
        parts = [(key, param(run, key)) for key in keys]
        name = _text(parts[0][1]) if bare else ", ".join(f"{key}={_text(value)}" for key, value in parts) or "all"
        groups.setdefault(name, []).append(run)
    pooled = {key: differs[key] for key in pool if key in differs}
    return dict(sorted(groups.items())), keys, pooled, differs


def resolve_baseline(groups, baseline, default):
    """The group name baseline names: a group name, or a method.name that identifies exactly one group. Without
    --baseline: `default` (a method name) when it names a group (the first of its groups), else the first group."""
    def by_method(name):
        return [group for group, runs in groups.items() if all(param(run, METHOD_KEY) == name for run in runs)]
    if baseline is None:
        if default in groups:
            return default
        return (by_method(default) or list(groups))[0]
    if baseline in groups:
        return baseline
    matches = by_method(baseline)
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UserError(f"--baseline '{baseline}' is the method of {len(matches)} groups ({'; '.join(matches)}); "
                        "name one of them in full")
    raise UserError(f"baseline '{baseline}' is not among the groups: {'; '.join(groups)}")


def common_params(runs):
    """The params.json keys (with their values) that every run of the group has, with the same value."""
    first = runs[0].params
    return {key: value for key, value in sorted(first.items())
            if all(key in run.params and _same(run.params[key], value) for run in runs[1:])}


def _same(a, b):
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _distinct(values):
    """One value when all agree, else the list of distinct values (first-seen order): how the setting shows a
    value the runs disagree on."""
    unique = list({json.dumps(value, sort_keys=True): value for value in values}.values())
    return unique[0] if len(unique) == 1 else unique


def _joined(texts):
    return " | ".join(dict.fromkeys(texts))


def _budget_text(norm, eps, step_size=None, pixel_units=False):
    """'L-inf eps 8/255, step 2/255' (eps in 1/255, or in pixel units when pixel_units) or 'L2 eps 0.5, step 0.1'."""
    def amount(value):
        if value is None:
            return "?"
        return f"{value * 255 if pixel_units else value:.4g}/255" if norm == "linf" else f"{value:.4g}"
    text = f"{'L-inf' if norm == 'linf' else 'L2'} eps {amount(eps)}"
    return text if step_size is None else f"{text}, step {amount(step_size)}"


def _train_attack(run):
    norm = param(run, "attack.norm") or "linf"  # runs from before attack.norm were L-inf
    values = {"norm": norm, "eps": param(run, "attack.eps"), "step_size": param(run, "attack.step_size"),
              "steps": param(run, "attack.steps")}
    values["text"] = f"PGD-{values['steps']}, {_budget_text(norm, values['eps'], values['step_size'])}"
    return values


def _evaluation(run):
    settings = run.final.get("settings") or {}
    norm = settings.get("norm") or param(run, "attack.norm") or "linf"
    values = {key: settings.get(key) for key in ("pgd_steps", "cw_steps", "n", "autoattack_version", "autoattack_n")}
    values.update(norm=norm, eps=settings.get("eps"), presets=sorted(settings.get("presets") or {}))
    parts = [f"PGD-{values['pgd_steps']}"] + [f"CW-{values['cw_steps']}"] * bool(values["cw_steps"])
    if values["autoattack_version"]:
        parts.append(f"AutoAttack {values['autoattack_version']} (n = {values['autoattack_n']})")
    parts += [f"presets {', '.join(values['presets'])}"] * bool(values["presets"])
    parts += [_budget_text(norm, values["eps"], pixel_units=True), f"n = {values['n']}"]
    values["text"] = ", ".join(parts)
    return values


def _provenance(runs, key):
    values = [record.get(key) for run in runs for record in (run.provenance or []) if isinstance(record, dict)]
    return _distinct(values) if values else None


def _precision(run):
    """The precision the run computed in: training.precision with 'auto' resolved for its engine and device (as
    engine.precision does when it trains); 'auto' stays where provenance.json does not name the device."""
    from engine.precision import resolve_precision
    name, engine = param(run, "training.precision"), param(run, "training.engine")
    devices = [record.get("device") for record in (run.provenance or []) if isinstance(record, dict)]
    if not isinstance(name, str) or not isinstance(engine, str):
        return name
    if name == "auto" and engine != "eager" and not (devices and isinstance(devices[0], str)):
        return name
    try:
        return resolve_precision(name, devices[0] if devices else "cpu", engine)
    except (RuntimeError, ValueError):  # a device string torch does not know
        return name


def _training_data(run):
    """'N training images (V held out for validation)[, label noise K R%]': what a run trained on."""
    limit, val = param(run, "data.train_limit"), param(run, "data.val_size")
    text = f"{limit if limit else 'all'} training images ({val} held out for validation)"
    noise, rate = param(run, "method.label_noise"), param(run, "method.noise_rate")
    if isinstance(noise, str) and noise != "none" and isinstance(rate, (int, float)):
        text += f", {noise} label noise {100 * rate:g}% (noise seed {param(run, 'method.noise_seed')})"
    return text


def setting(runs, differs):
    """summary['setting']: what the runs were (dataset, arch, epochs, training attack, evaluation, engine,
    precision, code and torch version); a field the runs disagree on holds the list of values (its text 'a | b'),
    and differs {params key: [values]} names every params key that differs (a grouping key or a pooled one)."""
    train = [_train_attack(run) for run in runs]
    evaluation = [_evaluation(run) for run in runs]
    commits = _provenance(runs, "git_commit")
    dirty = [record.get("git_dirty") for run in runs for record in (run.provenance or []) if isinstance(record, dict)]
    return {
        "dataset": _distinct([param(run, "data.dataset") for run in runs]),
        "arch": _distinct([param(run, "model.arch") for run in runs]),
        "epochs": _distinct([param(run, "training.epochs") for run in runs]),
        "training_data": _joined(_training_data(run) for run in runs),
        "train_attack": {**{key: _distinct([t[key] for t in train]) for key in ("norm", "eps", "step_size", "steps")},
                         "text": _joined(t["text"] for t in train)},
        "eval": {**{key: _distinct([e[key] for e in evaluation])
                    for key in ("pgd_steps", "cw_steps", "n", "autoattack_version", "autoattack_n", "norm", "eps",
                                "presets")},
                 "text": _joined(e["text"] for e in evaluation)},
        "engine": _distinct([param(run, "training.engine") for run in runs]),
        "precision": _distinct([_precision(run) for run in runs]),
        "git_commit": commits,
        "git_dirty": any(d is True for d in dirty) if dirty else None,
        "torch": _provenance(runs, "torch"),
        "device": _provenance(runs, "device_name"),
        "runs_without_provenance": sum(not run.provenance for run in runs),
        "differs": differs,
    }


# Leading columns of examples/<row>.csv that are not 0/1 correctness under an attack.
# The value columns of examples/<row>.csv (defined where the file is written); every other column is 0/1.
EXAMPLE_INFO_COLUMNS = VALUE_COLUMNS


def read_examples(path):
    """examples/<row>.csv of a run: {"index": ints, "label": ints, "columns": {attack: floats 0/1, NaN where the
    cell is empty (that attack did not run on that image)}}. UserError naming the file, line and column for a
    cell that is not what the evaluation writes."""
    import csv
    import numpy as np
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            lines = list(csv.reader(handle))
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None
    if not lines or "index" not in lines[0] or "label" not in lines[0]:
        raise UserError(f"{path}: expected a header line with 'index' and 'label' columns")
    header = lines[0]
    attacks = [name for name in header if name not in EXAMPLE_INFO_COLUMNS]
    where = {name: header.index(name) for name in ["index", "label", *attacks]}
    values = {name: [] for name in where}
    for number, cells in enumerate(lines[1:], start=2):
        if len(cells) != len(header):
            raise UserError(f"{path}: line {number} has {len(cells)} cells, the header {len(header)}")
        for name, column in where.items():
            cell = cells[column].strip()
            if name in ("index", "label"):
                if not cell.lstrip("-").isdigit():
                    raise UserError(f"{path}: line {number}, column '{name}': expected an integer, got {cell!r}")
                values[name].append(int(cell))
            elif cell in ("", "0", "1"):
                values[name].append(float(cell) if cell else float("nan"))
            else:
                raise UserError(f"{path}: line {number}, column '{name}': expected 0, 1 or empty, got {cell!r}")
    index = np.array(values["index"], dtype=np.int64)
    if np.unique(index).size != index.size:
        raise UserError(f"{path}: an index appears twice (one line per test image expected)")
    return {"index": index, "label": np.array(values["label"], dtype=np.int64),
            "columns": {name: np.array(values[name], dtype=np.float64) for name in attacks}}
