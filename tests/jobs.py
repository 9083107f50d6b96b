"""Small job requests for tests that run the tiny model end to end (64x48, one chunk, progress-only stream)."""

from __future__ import annotations

import base64
import io

from PIL import Image


def small_request(**overrides) -> dict:
    buf = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").resize((64, 48)).save(buf, "PNG")
    base = {"prompt": "a stone corridor", "image": base64.b64encode(buf.getvalue()).decode(), "size": "64x48",
            "num_chunks": 1, "seed": 5, "camera_actions": [[], ["w"]], "stream": {"format": "none"}}
    return {**base, **overrides}
