#!/usr/bin/env bash
# Measures `finetune tune` on the demo folder as docs/recipes.md#hyperparameter-search-finetune-tune reports:
# 6 trials, the first run SIGKILLed during its third trial, the second continuing the study, then the refit.
# Needs the demo folder (bash scripts/demo.sh builds it); logs go to $OUT (default /tmp/exp).
set -u
cd "$(dirname "$0")/.." && source .venv/bin/activate
OUT=${OUT:-/tmp/exp}; mkdir -p "$OUT"
rm -rf /tmp/tune-demo /tmp/tune-refit
grep -q avx512_bf16 /proc/cpuinfo && echo "machine: avx512_bf16" || echo "machine: avx2 only"
t0=$(date +%s.%N)
setsid finetune tune data/fashion-mnist --trials 6 --budget-minutes 10 --out /tmp/tune-demo --seed 0 > "$OUT"/tune1.log 2>&1 &
pid=$!
while [ ! -d /tmp/tune-demo/trials/002 ] && kill -0 $pid 2>/dev/null; do sleep 0.5; done
sleep 8
kill -9 -- -$pid; wait $pid; echo "first run rc=$? killed after $(python -c "import time;print(round(time.time()-$t0,1))") s"
t1=$(date +%s.%N)
finetune tune data/fashion-mnist --trials 6 --budget-minutes 10 --out /tmp/tune-demo --seed 0 > "$OUT"/tune2.log 2>&1
echo "second run rc=$? $(python -c "import time;print(round(time.time()-$t1,1))") s; total $(python -c "import time;print(round(time.time()-$t0,1))") s"
t2=$(date +%s.%N)
finetune fit data/fashion-mnist --recipe /tmp/tune-demo/best.toml --seed 0 --out /tmp/tune-refit > "$OUT"/refit.log 2>&1
echo "refit rc=$? $(python -c "import time;print(round(time.time()-$t2,1))") s"
