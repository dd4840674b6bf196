#!/usr/bin/env bash
# Build a wheelhouse for a GPU machine without internet (the device machines, many clusters' GPU nodes):
# the peers cebench compares, as wheels for the target's Python and platform, downloaded here.
#
#   scripts/wheelhouse.sh [DIR] [first|quack|all]     (default: .whl, first)
#
# first: Liger-Kernel, Cut Cross-Entropy, Megatron-Core (small: a few MB).
# quack: QuACK and the CuTe DSL it needs. nvidia-cutlass-dsl-libs-cu13 alone is a 92 MB wheel: it is
#        unzipped and packed as cutlass-libs-cu13.tar.xz (52 MB with a 256 MiB dictionary; 60 MB with
#        the default one) to fit a 64 MiB transfer with the rest of the quack wheels (58.7 MiB in all on 2026-12-02;
#        the committed reports must stay behind then: scripts/travel_light.sh); unpack
#        it into the install target on the machine (scripts/gpu_session.sh does).
# On the target:  pip install --no-index --no-deps --target SITE DIR/*.whl  (or --find-links DIR), then
#                 PYTHONPATH=<checkout>:SITE python -m cebench ...   (cebench itself needs no install)
# torch, triton, numpy, pandas, scipy, matplotlib and jinja2 come with the GPU image and are not carried.
set -euo pipefail
DIR=${1:-.whl}
WHAT=${2:-first}
PY=${PY:-3.12}
mkdir -p "$DIR"
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$DIR" "$@"
}
if [[ $WHAT == first || $WHAT == all ]]; then
  get liger-kernel==0.8.5 cut-cross-entropy==25.1.1 megatron-core==0.16.1
fi
if [[ $WHAT == quack || $WHAT == all ]]; then
  get quack-kernels==0.6.5 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
      nvidia-cutlass-dsl-libs-core==4.8.1 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
  tmp=$(mktemp -d)
  get -d "$tmp" nvidia-cutlass-dsl-libs-cu13==4.8.1
  (cd "$tmp" && mkdir unpacked && cd unpacked && python3 -m zipfile -e ../nvidia_cutlass_dsl_libs_cu13-*.whl . \
     && tar cf - . | xz -T1 --x86 --lzma2=preset=9e,dict=256MiB > "$OLDPWD/cutlass-libs-cu13.tar.xz")
  mv "$tmp/cutlass-libs-cu13.tar.xz" "$DIR/"
  rm -rf "$tmp"
fi
ls -la "$DIR"
du -ch "$DIR"/* | tail -1
