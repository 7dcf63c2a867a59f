#!/usr/bin/env bash
# The README's main job: set up (first run only), materialise 1,000 training + 1,000 validation Fashion-MNIST
# images and 1,000 held-out test images (from the IDX t10k files) as an image folder, fine-tune the default
# backbone (tf_efficientnet_lite0, embedded ImageNet weights) with --recipe auto, and print the held-out test
# accuracy. Extra arguments go to `finetune fit`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/make_fashion_mnist.py --out data/fashion-mnist --per-class 100 --val-per-class 100 --test-per-class 100
exec .venv/bin/finetune fit data/fashion-mnist "$@"
