# A/B on one lent GPU machine, same call: the old tree in _old/ and the working tree ("new").
#   here:  rm -rf _old && mkdir _old && git archive <old commit> worker | tar -x -C _old   (then carry "_old":
#          the machine's copy of .git may not have the newest commits)
#   there: source scripts/device_env.sh && source scripts/device_fa4.sh && RANKS=1 bash scripts/ab_bench.sh
# Writes $OUT/{old,new}$TAG.json and prints the latents' relative difference (0 = the same numbers).
# A setting against another on one tree: unpack the same commit to _old and give each side its environment, e.g.
#   OLD_ENV="LINGBOT_SP_EXCHANGE=nccl" NEW_ENV="LINGBOT_SP_EXCHANGE=copy" RANKS=4 WARMUP=6 bash scripts/ab_bench.sh
set -e
RANKS=${RANKS:-1}; CHUNKS=${CHUNKS:-14}; LAT=${LAT:-/tmp}  # LAT: where the latents go (two A/Bs at once need two)
WARMUP=${WARMUP:-0}; TAG=${TAG:-}  # WARMUP: chunks of an untimed first job (6 on 4 ranks: kept graphs of every span)
[ -d _old/worker ] || { echo "no _old/worker: unpack the old tree and carry it"; exit 1; }
args="bench --model lingbot-world-fast --device cuda --chunks $CHUNKS --warmup-chunks $WARMUP --ranks $RANKS"
(cd _old && env $OLD_ENV PYTHONPATH=$PWD:$PYTHONPATH python3 -m worker $args --save-latents $LAT/lat_old.pt \
    --json $OUT/old$TAG.json)
env $NEW_ENV python3 -m worker $args --save-latents $LAT/lat_new.pt --json $OUT/new$TAG.json
python3 -c "
import torch; a, b = torch.load('$LAT/lat_old.pt'), torch.load('$LAT/lat_new.pt')
print('latents new vs old: relative L2 %.3e, bit-identical %s' % (((a - b).norm() / a.norm()).item(), torch.equal(a, b)))"
