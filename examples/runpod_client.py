"""Run one job on a RunPod Serverless endpoint and follow its stream.

    RUNPOD_API_KEY=... RUNPOD_ENDPOINT_ID=... python examples/runpod_client.py [first_frame.jpg] [out_dir]

Frames arrive per chunk on /stream while the model generates (JPEG, base64); they are saved as
out_dir/frame_00000.jpg ...; the last item holds the presigned URL of the finished MP4.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import runpod


def main() -> int:
    runpod.api_key = os.environ["RUNPOD_API_KEY"]
    endpoint = runpod.Endpoint(os.environ["RUNPOD_ENDPOINT_ID"])
    image = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("first_frame.jpg"))
    out_dir = Path(sys.argv[2] if len(sys.argv) > 2 else "frames")
    out_dir.mkdir(parents=True, exist_ok=True)

    job = endpoint.run({
        "prompt": "a first-person walk through a quiet forest path, soft morning light",
        "image": "data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode(),
        "size": "832x480",
        # one action set per latent frame (3 per chunk): w/s forward/back, a/d strafe, i/k pitch, j/l yaw
        "camera_actions": [[], ["w"], ["w"], ["w"], ["w", "d"], ["d"], [], ["l"], ["l"]],
        "seed": 7,
        "stream": {"format": "jpeg", "quality": 85},
    })
    print(f"job {job.job_id} queued", file=sys.stderr)

    final = None
    for item in job.stream():  # polls /stream/<id>; each item is one dict the worker yielded
        if "error" in item:
            print(f"job failed: {item['error']}", file=sys.stderr)
            return 1
        if item.get("type") == "chunk":
            for i, frame in enumerate(item["frames"]):
                (out_dir / f"frame_{item['frame_start'] + i:05d}.jpg").write_bytes(base64.b64decode(frame))
            print(f"chunk {item['chunk_index']} part {item.get('part', 0)}: frames {item['frame_start']}.."
                  f"{item['frame_start'] + item['num_frames'] - 1} ({item['stats']['chunk_ms']:.0f} ms)", file=sys.stderr)
        elif item.get("type") == "video":
            final = item

    if final is None:  # an error ends the stream without an item: the job's status carries it
        status = job.status()
        print(f"job ended with status {status}: {json.dumps(job.output())[:500]}", file=sys.stderr)
        return 1
    print(json.dumps({k: final[k] for k in ("url", "s3_uri", "path", "num_frames", "sha256", "upload_error")}, indent=2))
    print(final["url"] or final["path"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
