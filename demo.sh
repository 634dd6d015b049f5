#!/usr/bin/env bash
# The main job in small: where PGD-AT robust-overfits, does SGLS help, by how much, how sure are we? On real
# Fashion-MNIST (configs/fashion_mnist_demo.yaml), 3 seeds per method, then the many-seed comparison
# (runs/demo/compare/report.md, summary.csv, plots), with the methods paired image by image on all 10,000 test
# images. The 6 runs are shared by two torchrun ranks, one CPU core and one thread each (torchrun sets
# OMP_NUM_THREADS=1); rank 0 writes the comparison once both are done. Packing seeds (--pack) is for a GPU: on
# this 2-core CPU a packed model was slower (683 s vs 616 s for the earlier demo sweep on 2026-11-25).
# Rerunning skips finished runs and resumes killed ones; delete runs/demo to start over.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # OpenMP threads that wait passively leave the 2 cores to the work
bash setup.sh
.venv/bin/torchrun --standalone --nproc_per_node=2 run.py sweep -C configs/fashion_mnist_demo.yaml \
  --methods at,sgls --seeds 0-2 --out runs/demo --compare "$@"
cat runs/demo/compare/report.md
