#!/usr/bin/env bash
# Build, on this (CPU) machine, what a lent GPU machine needs to run FlashAttention-4 (docs/PERFORMANCE.md, v14):
#   .fa_big/cu13.tar.xz  the CuTe DSL's CUDA 13 compiler library (a 92 MB wheel, 61 MiB as xz: carried alone in a
#                        first call, which unpacks it to /tmp/fa13 on the machine)
#   .fa_whl/             the small wheels (10 MB), carried with .whl in the calls after it
# Then on the GPU machine: source scripts/device_env.sh && source scripts/device_fa4.sh
# The GPU image's Python is 3.12 with torch+cu130, cuda-bindings and einops already installed. xz -9e takes ~3 min.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root: .fa_big and .fa_whl are made here
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
         --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
         --platform manylinux2014_x86_64 -d "$1" "${@:2}"; }
rm -rf .fa_whl .fa_big && mkdir -p .fa_whl .fa_big
dl .fa_whl flash-attn-4==4.0.0b36 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5 \
   nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1
tmp=$(mktemp -d)
dl "$tmp" nvidia-cutlass-dsl-libs-cu13==4.8.1
mkdir "$tmp/x" && python3 -m zipfile -e "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl "$tmp/x"
tar -C "$tmp/x" -cf - . | xz -9e -T2 > .fa_big/cu13.tar.xz
rm -rf "$tmp"
du -sh .fa_whl .fa_big
