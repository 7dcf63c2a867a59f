#!/usr/bin/env bash
# The README's main job: set up (first run only), materialise 1,000 + 1,000 Fashion-MNIST images as an image
# folder, fine-tune the default backbone (tf_efficientnet_lite0, embedded ImageNet weights) with
# --recipe auto, and print the validation accuracy. Extra arguments go to `finetune fit`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/make_fashion_mnist.py --out data/fashion-mnist --per-class 100 --val-per-class 100
exec .venv/bin/finetune fit data/fashion-mnist "$@"
