# Sourced after scripts/device_env.sh on a lent GPU machine to add FlashAttention-4 (docs/PERFORMANCE.md, v14).
# Its CUDA 13 compiler library (92 MB as a wheel) is over what one call may carry with the rest, so a first call
# carries it as .fa_big/cu13.tar.xz and unpacks it to /tmp/fa13 (kept while the machine stays warm); the calls
# after it carry the small wheels in .fa_whl. pip --target skips .pth files, so the DSL's path is set here.
[ -d /tmp/fa13/nvidia_cutlass_dsl ] || { echo "no /tmp/fa13: run the staging call first (fresh machine?)"; return 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fa_site .fa_whl/*.whl || return 1
cp -r /tmp/fa13/. /tmp/fa_site/
export PYTHONPATH=/tmp/fa_site:/tmp/fa_site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
python3 -c 'import flash_attn.cute, cutlass; print("flash-attn-4 importable")' || return 1
