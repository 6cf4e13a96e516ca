#!/usr/bin/env bash
# The GPU checks, in one call of a lent GPU machine (no registry there; TVM travels as .gpu/, which the
# call carries: make it with benchmarks/gpu_pack.sh, which trims ../shared/tools/gpu-bundle's pack to
# fit the 64 MiB a call may carry):
#   bash benchmarks/gpu_check.sh [all|final|tests|bench|profile]     (final: all but the A/B)
#
#  1. the CUDA tests: every test marked `gpu` (numerics of each CUDA rule, forward and backward, and the
#     random-config property test tests/lower/test_kernels_cuda_property.py), spread over the cores;
#  2. the CUDA kernel benchmark (benchmarks/bench_kernels.py --target cuda: the kernels against the
#     GPU's own device-to-device copy), then (all) A/B rounds of cuda_blocked's tunables, and (all,
#     final, profile) per-kernel GPU times from ncu.
# Logs and JSON go to $OUT (the device tool brings that folder back) or ./gpu-out.
set -u
what=${1:-all}
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
t0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }
if [ -d .gpu ]; then
  mkdir -p /tmp/site
  tar -C /tmp/site -xJf .gpu/tvm.tar.xz || exit 1
  # tvm-ffi: the wheel, or its files as an xz tarball (smaller: the call carries 64 MiB at most)
  if [ -f .gpu/ffi.tar.xz ]; then tar -C /tmp/site -xJf .gpu/ffi.tar.xz || exit 1
  else python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/*.whl || exit 1; fi
fi
# bncompile itself, built from this tree (bncompile.passes is the passes/ folder)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . >"$out/install.log" 2>&1 \
  || { stamp "install failed"; tail -5 "$out/install.log"; exit 1; }
export PYTHONPATH=/tmp/site TVM_CUDA_COMPILE_MODE=nvcc PYTHONUNBUFFERED=1 PATH=$PATH:/usr/local/cuda/bin
cd /tmp || exit 1        # import the installed bncompile, not the tree
stamp "set up"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import tvm, bncompile; d = tvm.cuda(0); print('tvm', tvm.__version__, 'cuda', d.exist, d.device_name, \
d.multi_processor_count, 'SMs', d.l2_cache_size_bytes >> 20, 'MB L2', 'compute', d.compute_version)" 2>&1 | tee -a "$out/gpu.txt"
tree=$OLDPWD
if [ "$what" = all ] || [ "$what" = final ] || [ "$what" = tests ]; then
  stamp "CUDA tests"
  par=""; python3 -c "import xdist" 2>/dev/null && par="-n 12"
  ( cd "$tree" && timeout 170 python3 -P -m pytest -q -m gpu $par -p no:cacheprovider --rootdir "$tree" \
      tests/lower/test_kernels_cuda.py tests/lower/test_kernels_backward_cuda.py \
      tests/lower/test_kernels_cuda_property.py tests/lower/test_compile.py ) > "$out/tests.log" 2>&1
  echo "pytest rc=$?" >> "$out/tests.log"
  grep -E "passed|failed|error|rc=" "$out/tests.log" | tail -3
  grep -E "^(FAILED|ERROR)" "$out/tests.log" | cut -c1-300 | head -20
  grep -E "^E  " "$out/tests.log" | cut -c1-240 | head -30
fi
if [ "$what" = all ] || [ "$what" = final ] || [ "$what" = bench ]; then
  stamp "CUDA benchmark"
  timeout 150 python3 "$tree/benchmarks/bench_kernels.py" --target cuda --repeat 15 --json "$out/cuda_bench.json" \
    > "$out/bench.log" 2>&1
  echo "bench rc=$?" >> "$out/bench.log"
  cat "$out/bench.log"
fi
if [ "$what" = all ]; then
  stamp "A/B of the forward: cuda_blocked's tunables"
  timeout 100 python3 - > "$out/ab.log" 2>&1 <<'PY'
from bncompile.bench.cuda import format_cuda_table, run_cuda_benchmark
from bncompile.bench.kernels import Case
from bncompile.lower.kernels import clear_cache
from bncompile.lower.kernels.schedules import cuda

cases = [Case("NCHW", (32, 64, 56, 56), 1), Case("NCHW", (64, 128, 28, 28), 1), Case("NHWC", (32, 56, 56, 64), -1),
         Case("NC", (256, 1024), 1), Case("NCHW", (128, 64, 112, 112), 1), Case("NC", (65536, 1024), 1)]
base = {k: getattr(cuda, k) for k in ("BLOCKED_THREADS", "CHANNEL_THREADS", "Y_VECTOR", "BLOCKED_ROWS", "BLOCKED_SAMPLES")}
variants = [("defaults", {}, None),
            ("BLOCKED_THREADS=128 BLOCKED_ROWS=64 BLOCKED_SAMPLES=64",
             {"BLOCKED_THREADS": 128, "BLOCKED_ROWS": 64, "BLOCKED_SAMPLES": 64}, None)]
for label, over, rule in variants:
    for k, v in {**base, **over}.items():
        setattr(cuda, k, v)
    clear_cache()
    print("==", label, flush=True)
    print(format_cuda_table(run_cuda_benchmark(cases, repeat=10, schedule=rule, parts=("fwd", "copy"))), flush=True)
PY
  echo "ab rc=$?" >> "$out/ab.log"
  cat "$out/ab.log"
fi
if [ "$what" = all ] || [ "$what" = final ] || [ "$what" = profile ]; then
  stamp "per-kernel GPU times (ncu) of one forward and one backward step, NCHW 32x64x56x56, NHWC 32x56x56x64, NC 256x1024"
  cat > /tmp/prof.py <<'PY'
import numpy as np
from bncompile.config import BatchNormConfig
from bncompile.kernels import compile_batchnorm
for shape, axis in (((32, 64, 56, 56), 1), ((32, 56, 56, 64), -1), ((256, 1024), -1)):
    k = compile_batchnorm(BatchNormConfig(axis=axis, fused=False), (None,) + shape[1:], target="cuda", gradients=True)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    k.run({"x": x, "dy": x})
PY
  timeout 120 ncu --clock-control none --metrics gpu__time_duration.sum --csv python3 /tmp/prof.py > "$out/ncu.csv" 2> "$out/ncu.err"
  echo "ncu rc=$?"; python3 - "$out/ncu.csv" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if rows:
    h = rows[0]; ki = h.index("Kernel Name"); vi = h.index("Metric Value"); gi = h.index("Grid Size"); bi = h.index("Block Size")
    for r in rows[1:]:
        print(f"{r[ki][:40]:<40} grid {r[gi]:<16} block {r[bi]:<14} {r[vi]:>10} ns")
PY
fi
stamp "done"
