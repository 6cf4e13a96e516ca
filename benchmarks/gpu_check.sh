#!/usr/bin/env bash
# The GPU checks, in one call of a lent GPU machine (no registry there; TVM travels as .gpu/, which the
# call carries: make it with benchmarks/gpu_pack.sh, which trims ../shared/tools/gpu-bundle's pack to
# fit the 64 MiB a call may carry):
#   bash benchmarks/gpu_check.sh [all|final|explore|ab|tests|bench|profile]
#   (final: all but the A/B; explore: all but the benchmark; ab: the tests and the A/B)
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
if [ "$what" = all ] || [ "$what" = final ] || [ "$what" = tests ] || [ "$what" = ab ] || [ "$what" = explore ]; then
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
if [ "$what" = all ] || [ "$what" = ab ] || [ "$what" = explore ]; then
  stamp "A/B of the forward: cuda_blocked's tunables"
  timeout 170 python3 - > "$out/ab.log" 2>&1 <<'PY'
from bncompile.bench.cuda import format_cuda_table, run_cuda_benchmark
from bncompile.bench.kernels import Case
from bncompile.lower.kernels import clear_cache
from bncompile.lower.kernels.schedules import cuda

cases = [Case("NCHW", (32, 64, 56, 56), 1), Case("NCHW", (64, 128, 28, 28), 1), Case("NHWC", (32, 56, 56, 64), -1),
         Case("NC", (256, 1024), 1), Case("NC", (65536, 1024), 1)]
names = ("MERGED_CHANNEL_KERNEL", "REGISTER_SUMS", "ROW_UNROLL", "VALUES_PER_THREAD", "BLOCKED_ROWS", "BLOCKED_SAMPLES")
base = {k: getattr(cuda, k) for k in names}
variants = [("defaults", {}, None),
            ("as the GPU run of 2026-11-29: MERGED_CHANNEL_KERNEL=0 REGISTER_SUMS=0 VALUES_PER_THREAD=0",
             {"MERGED_CHANNEL_KERNEL": False, "REGISTER_SUMS": False, "VALUES_PER_THREAD": 0}, None)]
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
if [ "$what" = all ] || [ "$what" = final ] || [ "$what" = profile ] || [ "$what" = explore ]; then
  stamp "per kernel (ncu): time, DRAM bytes, L2 bytes, SM and memory throughput, occupancy; fwd + bwd steps"
  cat > /tmp/prof.py <<'PY'
import numpy as np
from bncompile.config import BatchNormConfig
from bncompile.kernels import compile_batchnorm
for shape, axis, grads in (((32, 64, 56, 56), 1, True), ((64, 128, 28, 28), 1, False), ((32, 56, 56, 64), -1, True),
                           ((256, 1024), -1, False), ((65536, 1024), -1, False)):
    k = compile_batchnorm(BatchNormConfig(axis=axis, fused=False), (None,) + shape[1:], target="cuda", gradients=grads)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    k.run({"x": x, "dy": x} if grads else {"x": x})
PY
  m=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum
  m=$m,sm__throughput.avg.pct_of_peak_sustained_elapsed,gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed
  m=$m,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread
  timeout 150 ncu --clock-control none --print-units base --metrics "$m" --csv python3 /tmp/prof.py > "$out/ncu.csv" 2> "$out/ncu.err"
  echo "ncu rc=$?"; python3 - "$out/ncu.csv" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if rows:
    h = rows[0]; col = {n: h.index(n) for n in ("ID", "Kernel Name", "Grid Size", "Block Size", "Metric Name", "Metric Value")}
    kern = {}
    for r in rows[1:]:
        k = kern.setdefault(r[col["ID"]], {"name": r[col["Kernel Name"]][:14], "grid": r[col["Grid Size"]], "block": r[col["Block Size"]]})
        k[r[col["Metric Name"]]] = r[col["Metric Value"]].replace(",", "")
    short = [("gpu__time_duration.sum", "ns"), ("dram__bytes_read.sum", "dram rd"), ("dram__bytes_write.sum", "dram wr"),
             ("lts__t_bytes.sum", "L2 bytes"), ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "sm%"),
             ("gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed", "mem%"),
             ("sm__warps_active.avg.pct_of_peak_sustained_active", "occ%"), ("launch__registers_per_thread", "regs")]
    print(f"{'kernel':<14} {'grid':<16} {'block':<12} " + " ".join(f"{s:>10}" for _, s in short))
    for k in kern.values():
        print(f"{k['name']:<14} {k['grid']:<16} {k['block']:<12} " + " ".join(f"{k.get(m, '-'):>10}" for m, _ in short))
PY
  tail -3 "$out/ncu.err"
fi
stamp "done"
