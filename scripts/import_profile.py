"""Where a worker's imports spend their time, by top-level package, from a cold or a warm page cache.

    python3 scripts/import_profile.py [--drop-caches] [--modules worker.parallel.pool,worker.engine]

Runs a fresh `python -X importtime -c "import ..."` for the modules a worker imports at start-up (after dropping
the page cache when asked: root only), and prints the wall time and the self time summed per top-level package.
"""
import argparse
import collections
import subprocess
import sys
import time
from pathlib import Path

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--drop-caches", action="store_true")
ap.add_argument("--modules", default="worker.parallel.pool,worker.engine,worker.models.prewarm")
ap.add_argument("--top", type=int, default=15)
a = ap.parse_args()
if a.drop_caches:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
t = time.perf_counter()
out = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {a.modules.replace(',', ', ')}"],
                     capture_output=True, text=True)
wall = time.perf_counter() - t
if out.returncode:
    sys.exit(out.stderr[-3000:])
self_us: collections.Counter = collections.Counter()
for line in out.stderr.splitlines():
    if not line.startswith("import time:") or "|" not in line or "self [us]" in line:
        continue
    own, _cumulative, name = (x.strip() for x in line.removeprefix("import time:").split("|"))
    self_us[name.split(".")[0]] += int(own)
total = sum(self_us.values())
print(f"imports of {a.modules}: wall {wall:.1f} s ({'page cache dropped' if a.drop_caches else 'warm'}), "
      f"self times sum to {total / 1e6:.1f} s")
for pkg, us in self_us.most_common(a.top):
    print(f"  {us / 1e6:7.2f} s  {pkg}")
