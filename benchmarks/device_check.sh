#!/usr/bin/env bash
# Issue 15's GPU check, in one call: the aggregation routes, the full mode and the scale mode of run.py, with
# the JSON written under $OUT (default benchmarks/results/device). Sized to finish in under 8 minutes on one
# H100; run it with a timeout that leaves room for a second try.
#
# Two steps:
#   1. Here (a machine with pip and the network), once: `benchmarks/device_check.sh prepare` downloads into .whl/
#      the wheels of the packages that the device image lacks (dp-accounting, jax-privacy and what they need;
#      `echo /.whl/ >> .git/info/exclude` keeps them out of git).
#   2. On the device machine: `benchmarks/device_check.sh` (carry .whl). It installs the wheels into /tmp/site,
#      checks that JAX sees the GPU, then runs the benchmarks one after the other, each under its own timeout, so
#      that one failure still leaves the others' JSON.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "prepare" ]]; then
  # The device image has jax, flax, optax, orbax, chex, transformers (its pip list); these it lacks.
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "dp-accounting>=0.4.4" "jax-privacy>=2.0.0" "mpmath" "attrs" "dm-tree" "immutabledict" "datasets" \
    "dill" "multiprocess" "pyarrow" "xxhash"
  exit $?
fi

OUT="${OUT:-benchmarks/results/device}"
mkdir -p "$OUT"
PY=python3
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
$PY -c "import jax, fedask_jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$OUT/env.txt" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv 2>&1 | tee -a "$OUT/env.txt"
# H100 SXM dense peaks (benchmarks/gpu.md): TF32 for the float32 rounds, BF16 for the scale mode's bf16 model.
PEAK_TF32=494.7
PEAK_BF16=989.4

step() {  # step NAME SECONDS COMMAND...: one benchmark under a timeout, its log beside the JSON.
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
  tail -n 6 "$OUT/$name.log"
}

# 1. Both sketch routes against the dense products (4096 x 4096, K = 10; the goal: >= 10x) and the default route.
step aggregate 90 $PY benchmarks/aggregate.py --out "$OUT/aggregate.json"
# 2. Full mode at K = 16 (round_over_limit <= 1.15), without the PyTorch peer (measured before: gpu.md).
step full 150 $PY benchmarks/run.py --no-torch --scaling 16 64 --peak-tflops $PEAK_TF32 --out "$OUT/run_full.json"
# 3. Scale mode, 110M parameters in bfloat16: K = 64 (round_over_limit <= 1.05, MFU of the round >= 0.9x the
#    limit's) and K = 1024 (one compiled call on one GPU; compile time not growing with K). The 256 row is left
#    out to fit the lease; add it when time allows.
step scale 240 $PY benchmarks/run.py --scale --scaling 8 64 1024 --peak-tflops $PEAK_BF16 --out "$OUT/run_scale.json"
cat "$OUT/steps.txt"
