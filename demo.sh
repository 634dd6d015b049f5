#!/usr/bin/env bash
# The main job in small: is SGLS better than PGD-AT, by how much, how sure are we? On real Fashion-MNIST,
# 3 seeds per method, then the many-seed comparison (runs/demo/compare/report.md, summary.csv, plots).
# The seeds run one after another: on a 2-core CPU a packed model (--pack 3) was slower (683 s vs 616 s for
# this sweep on 2026-11-25), as the grouped convolutions ran on one core; packing is for a GPU.
# Rerunning skips finished runs and resumes killed ones; delete runs/demo to start over.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # OpenMP threads that wait passively leave the 2 cores to the work
bash setup.sh
.venv/bin/python run.py sweep -C configs/fashion_mnist_demo.yaml --methods at,sgls --seeds 0-2 --out runs/demo \
  --compare "$@"
cat runs/demo/compare/report.md
