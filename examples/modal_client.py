"""Call the deployed Modal app (`modal deploy modal_app.py`) from Python.

    python examples/modal_client.py stream [first_frame.jpg]   # remote_gen: chunks as they are generated
    python examples/modal_client.py spawn  [first_frame.jpg]   # spawn: fire and forget, poll the call id later

Needs Modal credentials (`modal token new` or MODAL_TOKEN_ID / MODAL_TOKEN_SECRET).
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import modal

APP = os.environ.get("LINGBOT_MODAL_APP", "lingbot-worker")


def request(image: Path, stream_format: str) -> dict:
    return {
        "prompt": "a first-person walk through a quiet forest path, soft morning light",
        "image": image.read_bytes(),  # Modal passes bytes as they are
        "size": "832x480",
        "camera_actions": [[], ["w"], ["w"], ["w", "l"], ["l"], []],
        "seed": 7,
        "stream": {"format": stream_format},
    }


def main() -> int:
    mode = sys.argv[1] if len(sys.argv) > 1 else "stream"
    image = Path(sys.argv[2] if len(sys.argv) > 2 else Path(__file__).with_name("first_frame.jpg"))
    Worker = modal.Cls.from_name(APP, "Worker")

    if mode == "stream":
        out = Path("frames")
        out.mkdir(exist_ok=True)
        for item in Worker().generate.remote_gen(request(image, "jpeg")):
            if "error" in item:
                print(f"job failed: {item['error']}", file=sys.stderr)
                return 1
            if item["type"] == "chunk":
                for i, frame in enumerate(item["frames"]):
                    (out / f"frame_{item['frame_start'] + i:05d}.jpg").write_bytes(base64.b64decode(frame))
                print(f"chunk {item['chunk_index']}: {item['num_frames']} frames", file=sys.stderr)
            else:
                print(json.dumps(item, indent=2))
        return 0

    # spawn: returns at once; the result (video or error dict) is fetched by call id, now or much later.
    call = Worker().run.spawn(request(image, "none"))
    print(f"spawned {call.object_id}", file=sys.stderr)
    again = modal.FunctionCall.from_id(call.object_id)  # e.g. in another process
    result = again.get(timeout=3600)
    print(json.dumps(result, indent=2))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
