#!/usr/bin/env bash
# How bench/results/cpu-2026-12-01/relayout-ab.* were made. Before: git worktree add /tmp/old 8b88c20
# (the engine before the re-layout, with the golden runs); the working tree is the re-laid engine.
set -u
PY=/work/main/.venv/bin/python
export OMP_WAIT_POLICY=PASSIVE
out=/tmp/ab; rm -rf $out; mkdir -p $out
common="-C configs/fashion_mnist_demo.yaml --data.dir=$out/data --data.train_limit=2560 --training.epochs=2 \
 --evaluation.subset=100 --evaluation.final_n=100 --evaluation.cw_steps=0 --evaluation.fgsm=false \
 --method.sgls_start_epoch=1 --training.progress=off --output.tensorboard=false"
for round in 1 2 3; do
  for side in old new; do
    dir=/tmp/old; [ $side = new ] && dir=/work/main
    for m in at sgls; do
      (cd $dir && $PY run.py train $common --method.name=$m --output.dir=$out/$side-r$round --output.name=$m > $out/$side-r$round-$m.log 2>&1)
    done
    (cd $dir && $PY run.py sweep $common --methods at --seeds 0,1 --pack 2 --out $out/$side-r$round-packed > $out/$side-r$round-packed.log 2>&1)
  done
done
