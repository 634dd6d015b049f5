#!/usr/bin/env bash
# The main job in small: PGD-AT and SGLS on real Fashion-MNIST, then each run's final table.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
for method in at sgls; do
  .venv/bin/python run.py train -C configs/fashion_mnist_demo.yaml --method.name=$method \
    --output.name=fashion-mnist-$method --output.overwrite=true "$@"
done
for method in at sgls; do echo "== $method"; cat runs/demo/fashion-mnist-$method/final.md; done
