#!/usr/bin/env bash
# Pack TVM for a lent GPU machine so that it fits one device call (64 MiB with the working tree), for
# benchmarks/gpu_check.sh:  bash benchmarks/gpu_pack.sh   (from the repository root; ~8 min on 2 cores)
#
# ../shared/tools/gpu-bundle writes .gpu/ (TVM's Python package as tvm.tar.xz, ~62 MB, and the tvm-ffi
# wheel, ~3.3 MB): with this repository's ~2 MB that is just over the limit. This repacks what a run does
# not need out of it: the tvm-ffi wheel as an xz tarball (2.1 MB; gpu_check.sh unpacks either form) and
# TVM's tflite and torch frontends and topi/testing (nothing imports them when bncompile runs). Measured
# 2026-11-29: .gpu/ 63.6 MB, the call carried it with this tree.
set -euo pipefail
bundle=${GPU_BUNDLE:-../shared/tools/gpu-bundle}
[ -s .gpu/tvm.tar.xz ] || bash "$bundle"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
if ls .gpu/apache_tvm_ffi-*.whl >/dev/null 2>&1; then
  mkdir "$tmp/ffi" && (cd "$tmp/ffi" && python3 -m zipfile -e "$OLDPWD"/.gpu/apache_tvm_ffi-*.whl .)
  tar -C "$tmp/ffi" -cf - . | xz -T2 -9e > .gpu/ffi.tar.xz
  mv .gpu/apache_tvm_ffi-*.whl "$tmp/"
fi
if [ ! -f .gpu/trimmed ]; then
  mkdir "$tmp/tvm" && tar -C "$tmp/tvm" -xJf .gpu/tvm.tar.xz
  rm -rf "$tmp/tvm/tvm/relax/frontend/tflite" "$tmp/tvm/tvm/relax/frontend/torch" "$tmp/tvm/tvm/topi/testing"
  tar -C "$tmp/tvm" -cf - tvm | xz -T2 -9e > "$tmp/tvm.tar.xz" && mv "$tmp/tvm.tar.xz" .gpu/tvm.tar.xz
  touch .gpu/trimmed
fi
echo "gpu_pack: .gpu/ is $(du -sh .gpu | cut -f1); carry \".gpu\" and run: bash benchmarks/gpu_check.sh final"
