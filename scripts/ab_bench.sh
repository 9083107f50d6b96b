# A/B on one lent GPU machine, same call: the tree at REV ("old", unpacked to _old/) and the working tree ("new").
#   source scripts/device_env.sh && source scripts/device_fa4.sh && REV=<commit> RANKS=1 bash scripts/ab_bench.sh
# Writes $OUT/{old,new}.json and prints the latents' relative difference (0 = the same numbers).
set -e
REV=${REV:?set REV to the old commit}; RANKS=${RANKS:-1}; CHUNKS=${CHUNKS:-14}
rm -rf _old && mkdir _old && git archive "$REV" worker | tar -x -C _old
args="bench --model lingbot-world-fast --device cuda --chunks $CHUNKS --warmup-chunks 0 --ranks $RANKS"
(cd _old && PYTHONPATH=$PWD:$PYTHONPATH python3 -m worker $args --save-latents /tmp/lat_old.pt --json $OUT/old.json)
python3 -m worker $args --save-latents /tmp/lat_new.pt --json $OUT/new.json
python3 -c "
import torch; a, b = torch.load('/tmp/lat_old.pt'), torch.load('/tmp/lat_new.pt')
print('latents new vs old: relative L2 %.3e, bit-identical %s' % (((a - b).norm() / a.norm()).item(), torch.equal(a, b)))"
