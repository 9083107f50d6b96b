# Settings against each other on one tree, one process each, in one call on a lent GPU machine (docs/PERFORMANCE.md
# v28: run each side twice, alternating, where the effect is the size of the run-to-run spread).
#   there: source scripts/device_env.sh && source scripts/device_fa4.sh && export LINGBOT_COMPILE_CACHE=/tmp/cc
#          RANKS=2 bash scripts/ab_settings.sh base:X=0 gated:LINGBOT_GATED_NORM=1 base2:X=0 gated2:LINGBOT_GATED_NORM=1
# Each argument is TAG:VAR=VALUE[,VAR=VALUE...]; an item that starts with -- is a bench option instead
# (memo:--camera=held). Writes $OUT/$TAG.json, prints each run's summary and every run's latents against the
# first's (0 = the same numbers).
set -e
RANKS=${RANKS:-1}; CHUNKS=${CHUNKS:-14}; WARMUP=${WARMUP:-1}; LAT=${LAT:-/tmp}
[ $# -ge 2 ] || { echo "usage: $0 TAG:VAR=VALUE[,VAR=VALUE...] TAG:... (two settings or more)"; exit 2; }
tags=()
for spec in "$@"; do
  tag=${spec%%:*}; vars=(); opts=()
  IFS=, read -ra items <<< "${spec#*:}"
  for item in "${items[@]}"; do case $item in --*) opts+=("$item");; *) vars+=("$item");; esac; done
  tags+=("$tag")
  echo "== $tag ${vars[*]} ${opts[*]}"
  env "${vars[@]}" python3 -m worker bench --model lingbot-world-fast --device cuda --chunks "$CHUNKS" \
      --warmup-chunks "$WARMUP" --ranks "$RANKS" --save-latents "$LAT/lat_$tag.pt" --json "$OUT/$tag.json" \
      "${opts[@]}" 2>&1 \
    | grep -E "^steady|^first|Error" || true
done
python3 - "$LAT" "${tags[@]}" <<'EOF'
import sys
import torch
lat, first, *rest = sys.argv[1:]
a = torch.load(f"{lat}/lat_{first}.pt")
for tag in rest:
    b = torch.load(f"{lat}/lat_{tag}.pt")
    print(f"latents {tag} vs {first}: relative L2 {((a - b).norm() / a.norm()).item():.3e}, bit-identical {torch.equal(a, b)}")
EOF
