#!/usr/bin/env bash
# The accelerator check, in under 8 minutes on one GPU: `pytest -m gpu` (tests/test_gpu.py: the demo fit, every
# recipe, export parity and predict on the accelerator), then a short `finetune fit --recipe large-similar` on
# the accelerator from the command line (Fashion-MNIST when its IDX files are installed, else a generated colour
# folder). Prints one line per check: name, pass/fail, seconds; the logs stay in the folder it names.
# Exit status: 0 every check passed; 1 a check failed; 2 no accelerator (CUDA or MPS) is visible to torch.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
PY=.venv/bin/python
accelerator=$($PY -c 'from finetune.device import resolve_device; print(resolve_device().accelerator)') || exit 1
if [ "$accelerator" = cpu ]; then
  echo "gpu_check: needs an accelerator (CUDA or MPS); torch sees none on this machine"
  exit 2
fi
work=$(mktemp -d -t finetune-gpu-check-XXXXXX)
status=0

check() {  # check NAME SECONDS COMMAND...: one line, the command's output in $work/NAME.log
  local name=$1 limit=$2 start result
  shift 2
  start=$(date +%s%N)
  if timeout "$limit" "$@" >"$work/$name.log" 2>&1; then result=pass; else result=fail; status=1; fi
  awk -v n="$name" -v r="$result" -v ns="$(($(date +%s%N) - start))" 'BEGIN { printf "%-22s %s %7.1f s\n", n, r, ns / 1e9 }'
}

fit_large_similar() {
  local data=$work/data
  if [ -d /usr/share/datasets/fashion-mnist ]; then
    $PY scripts/make_fashion_mnist.py --out "$data" --per-class 30 --val-per-class 10 --test-per-class 10 || return 1
  else
    PYTHONPATH=tests $PY -c "import sys; from imagefolders import make_image_folder as m
root = m(__import__('pathlib').Path(sys.argv[1]), classes=4, per_class=24, size=64, split=True)
m(root / 'test', classes=4, per_class=6, size=64, seed=7)" "$data" || return 1
  fi
  .venv/bin/finetune fit "$data" --recipe large-similar --accelerator "$accelerator" --epochs 2 \
    --out "$work/large-similar" --no-progress | tee "$work/fit.out" || return 1
  # the headline, "test accuracy (held out): 0.8400", must be well above chance (0.1 or 0.25)
  tail -n 1 "$work/fit.out" | awk '{ exit !($NF > 0.5) }'
}

check "pytest -m gpu" 330 $PY -m pytest -m gpu -q -rs tests/test_gpu.py
check "fit large-similar" 150 bash -c "$(declare -f fit_large_similar); PY=$PY work=$work accelerator=$accelerator \
  fit_large_similar"
echo "gpu_check: logs in $work"
exit $status
