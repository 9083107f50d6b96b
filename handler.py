"""RunPod Serverless entry: `python -u handler.py` (the Dockerfile's CMD).

The model loads once, at import (LINGBOT_MODEL, LINGBOT_DEVICE, LINGBOT_NUM_GPUS; see docs/PLATFORMS.md), then
every job streams JobRunner's items: chunks (or progress), then the video result, or one error item.

Worker replacement: runpod-python honours a *returned* {"refresh_worker": True} only for plain handlers; for
generator handlers it reads `config["refresh_worker"]` after the job (rp_job.handle_job sets "stopPod" on the
job result; rp_scale.JobScaler.handle_job then stops the worker loop). `start()` keeps using the very dict it
was given, so `request_refresh` sets the flag on CONFIG when the rank pool turns unhealthy: the failed job's
result asks RunPod to stop the pod, the process exits, and RunPod starts a fresh worker.
"""

from __future__ import annotations

import logging

from worker.parallel import early

# With LINGBOT_NUM_GPUS > 1 the follower ranks start now and import the worker beside this process, not after it.
early.start()

from worker.service import serve_from_env  # noqa: E402 - after the ranks are on their way

log = logging.getLogger("handler")

CONFIG: dict = {"return_aggregate_stream": True}


def request_refresh(reason: str) -> None:
    """Have RunPod replace this worker once the current job has reported."""
    if not CONFIG.get("refresh_worker"):
        log.error("worker must be replaced: %s", reason)
    CONFIG["refresh_worker"] = True


# The rank processes of a multi-GPU pool are started with multiprocessing "spawn", which re-runs this file under
# the name "__mp_main__": only the real entry process loads the model (the ranks load their own shard of work).
RUNNER = None
if __name__ != "__mp_main__":
    RUNNER = serve_from_env()
    RUNNER.on_fatal = request_refresh


def handler(job: dict):
    """Generator function: RunPod streams what it yields (/stream) and aggregates it (/status, webhooks)."""
    yield from RUNNER.run(job.get("input"), job_id=job.get("id"))


CONFIG["handler"] = handler

if __name__ == "__main__":
    import runpod

    runpod.serverless.start(CONFIG)
