#!/usr/bin/env bash
# Issue 14: the whole comparison on CIFAR-10 ResNet-18, every method with the same engine, attack and recipe (the
# SGLS recipe: 200 epochs, SGD 0.1 x0.1 at 100 and 150, wd 5e-4, batch 128, PGD-10 8/255 step 2/255), many seeds,
# into one sweep folder, then one report:
#
#     SEEDS=0-9 bash configs/comparison/cifar10_resnet18.sh      # from the repository root
#
# AT, AT+LS, TRADES, TRADES+SAT, TE, MART, SGLS, SGLS-TRADES, RSLAD; EMA as the 'ema' rows of the AT runs
# (training.weight_ema=true; the raw model trains exactly as without it: the EMA's evaluation noise comes from a
# fork of the random stream); AT-AWP and TRADES-AWP. Each method keeps its own keys in its own config (one config
# cannot hold SGLS's start epoch 90 and SGLS-TRADES' 70), so each is its own `run.py sweep` into the same folder: run names
# are <method>-s<seed>, so they do not collide, and rerunning the script skips finished runs and resumes killed
# ones. RSLAD needs its teacher first (a TRADES WRN-34-10, 76 epochs), named by method.teacher.
# Extra arguments go to every sweep (e.g. --training.device=cuda:0); PACK=K packs K seeds of every method that
# packs (not RSLAD, not AWP: they train unpacked).
set -euo pipefail
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-0-4}
OUT=${OUT:-runs/comparison-cifar10-resnet18}
TEACHER_RUN=${TEACHER_RUN:-runs/cifar10-wrn34_10-trades_teacher}  # output.name of the teacher config
PACK=${PACK:-1}
sweep() { "$PY" run.py sweep --seeds "$SEEDS" --out "$OUT" "$@"; }
packed() { sweep --pack "$PACK" "$@"; }

packed -C configs/cifar10/resnet18_at.yaml --methods at --training.weight_ema=true "${@}"
packed -C configs/baselines/cifar10/resnet18_at_ls.yaml --methods at_ls "${@}"
packed -C configs/cifar10/resnet18_trades.yaml --methods trades "${@}"
packed -C configs/baselines/cifar10/resnet18_trades_sat.yaml --methods trades_sat "${@}"
packed -C configs/baselines/cifar10/resnet18_te.yaml --methods te "${@}"
packed -C configs/baselines/cifar10/resnet18_mart.yaml --methods mart "${@}"
sweep -C configs/cifar10/resnet18_at.yaml --methods at_awp "${@}"      # AWP (engine/methods/awp.py); --pack refuses it
sweep -C configs/cifar10/resnet18_trades.yaml --methods trades_awp "${@}"
packed -C configs/cifar10/resnet18_sgls.yaml --methods sgls "${@}"
packed -C configs/cifar10/resnet18_sgls_trades.yaml --methods sgls_trades "${@}"
[ -f "$TEACHER_RUN/final.json" ] || "$PY" run.py train -C configs/distillation/cifar10/wrn34_10_trades_teacher.yaml \
    --output.name="$(basename "$TEACHER_RUN")" --training.resume=true
sweep -C configs/baselines/cifar10/resnet18_rslad.yaml --methods rslad \
    --method.teacher="$TEACHER_RUN/checkpoints/best.pt" "${@}"
"$PY" run.py compare "$OUT" --baseline at
