"""Camera path -> the DiT's camera condition.

A job describes the camera either as keyboard-like actions (one set of keys per LATENT frame, SGLang's realtime
semantics) or as camera-to-world poses per PIXEL frame plus intrinsics (the official LingBot-World Fast semantics).
Both end up the same way:

    absolute c2w per latent frame  ->  relative pose to the previous latent frame (frame 0 = I, translations
    divided by the largest step of the whole trajectory)  ->  Pluecker rays [origin, direction] per pixel
    ->  8x8 pixel pack to 384 channels per latent cell: a tensor [1, 384, n_latent, H/8, W/8].

The DiT does the remaining 2x2 patch (384 -> 1536 per token) itself.

Facts and worked numbers: ../shared/reference/camera_and_actions.md (sections a.1-a.5, b.1-b.2). Poses are in
OpenCV camera axes (x right, y down, z forward); intrinsics are [fx, fy, cx, cy] in pixels.

Pose math is float64 numpy (tiny arrays; float64 keeps long action paths from drifting). The per-pixel field is
rounded to float32 at the end, which is the precision the official code computes it in.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from worker.config import (
    ACTION_FOCAL,
    ACTION_KEYS,
    ACTION_MOVE_STEP,
    ACTION_PITCH_LIMIT_DEG,
    ACTION_PITCH_STEP_DEG,
    ACTION_YAW_STEP_DEG,
    CHUNK_LATENT_FRAMES,
    VAE_STRIDE,
    DiTConfig,
    total_pixel_frames,
)

__all__ = [
    "CameraError",
    "parse_actions",
    "validate_actions",
    "actions_to_c2ws",
    "validate_poses",
    "interpolate_poses",
    "select_latent_poses",
    "scale_intrinsics",
    "relative_poses",
    "plucker_field",
    "pack_latent_grid",
    "chunks_for_path",
    "iter_camera_condition",
    "camera_condition",
]

# The official Fast pipeline assumes every intrinsics.npy was written for a 480x832 (HxW) video (a.1).
INTRINSICS_SOURCE_HEIGHT = 480
INTRINSICS_SOURCE_WIDTH = 832

# Tolerance on |R^T R - I| for user poses: float32 files are off by ~1e-7; anything past 1e-3 is not a rotation.
ROTATION_TOLERANCE = 1e-3
POSE_DECIMALS = 9  # relative poses are rounded to this many decimals (relative_poses says why)

_SORTED_KEYS = "".join(sorted(ACTION_KEYS))
_RAY_CHANNELS = DiTConfig.control_dim  # [origin xyz, direction xyz]


class CameraError(ValueError):
    """A camera input the worker cannot use. `field` names the request field (e.g. "camera_actions[4]")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


# --------------------------------------------------------------------------------------------------------------
# 1. Actions: parse and validate
# --------------------------------------------------------------------------------------------------------------


def parse_actions(spec: str) -> list[list[str]]:
    """CLI form "w,w,wd,,l" -> [["w"], ["w"], ["w", "d"], [], ["l"]].

    One comma-separated entry per latent frame; every letter of an entry is one key; whitespace is ignored; an
    empty entry holds the camera still. A blank spec is no actions at all.
    """
    if not spec.strip():
        return []
    entries = [[ch for ch in part if not ch.isspace()] for part in spec.split(",")]
    return validate_actions(entries)


def validate_actions(actions: Any) -> list[list[str]]:
    """Check a request's camera_actions and return a clean copy as list[list[str]].

    The contract is strict: a list with one entry per latent frame, each entry a list of single-letter keys from
    ACTION_KEYS. A bare string entry such as "wd" is rejected rather than guessed at (is it one key or two?), so a
    client bug shows up as an error naming the entry instead of as a silently different camera path.
    Repeated or opposing keys are allowed: each key counts once and opposing keys cancel (SGLang sums them).
    """
    if isinstance(actions, (str, bytes)) or not isinstance(actions, Sequence):
        raise CameraError("camera_actions", f"expected a list of key lists, got {type(actions).__name__}")
    out: list[list[str]] = []
    for i, entry in enumerate(actions):
        field = f"camera_actions[{i}]"
        if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence):
            raise CameraError(
                field,
                f"expected a list of single-letter keys from {_SORTED_KEYS!r} (e.g. [\"w\", \"d\"]), "
                f"got {entry!r}",
            )
        keys: list[str] = []
        for token in entry:
            if not isinstance(token, str) or token not in ACTION_KEYS:
                raise CameraError(
                    field,
                    f"unknown key {token!r}; allowed keys are single letters from {_SORTED_KEYS!r} "
                    "(w/s forward/back, a/d strafe, i/k pitch up/down, j/l yaw left/right)",
                )
            keys.append(token)
        out.append(keys)
    return out


# --------------------------------------------------------------------------------------------------------------
# 2. Actions -> absolute camera-to-world poses (SGLang `_actions_to_c2ws`, reference b.1)
# --------------------------------------------------------------------------------------------------------------


def _rot_x(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rot_y(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _flat_unit(v: np.ndarray) -> np.ndarray:
    # Heading flattened to the ground (xz) plane. The 1e-6 is SGLang's; it keeps a straight-down camera finite
    # and makes a single-key step 0.05/(1+1e-6) long, which is what the model saw.
    h = np.array([v[0], 0.0, v[2]])
    return h / (np.linalg.norm(h) + 1e-6)


def actions_to_c2ws(actions: Sequence[Sequence[str]]) -> np.ndarray:
    """Absolute c2w pose AFTER each action: float64 [len(actions), 4, 4], starting from the identity camera.

    Per action (one latent frame): rotate first, then move along the NEW heading.
    - Yaw (j/l, -/+ACTION_YAW_STEP_DEG) turns about the WORLD y axis (left-multiplied), so the horizon stays level.
    - Pitch (i/k, +/-ACTION_PITCH_STEP_DEG) turns about the CAMERA x axis (right-multiplied). A step that would
      take |pitch| past ACTION_PITCH_LIMIT_DEG is dropped whole (not clamped to the limit), as SGLang does.
    - w/s/d/a move ACTION_MOVE_STEP along the heading / right vector flattened to xz: walking, not flying, so a
      pitched camera still moves horizontally.
    The leading identity of SGLang's list is dropped: entry m is the pose after action m.
    """
    actions = validate_actions(actions)
    rot = np.eye(3)
    pos = np.zeros(3)
    pitch_deg = 0.0  # tracked in degrees so that the limit test is exact for the integer step sizes
    out = np.empty((len(actions), 4, 4))
    for m, keys in enumerate(actions):
        pd = (ACTION_PITCH_STEP_DEG if "i" in keys else 0.0) - (ACTION_PITCH_STEP_DEG if "k" in keys else 0.0)
        if abs(pitch_deg + pd) <= ACTION_PITCH_LIMIT_DEG:
            pitch_deg += pd
        else:
            pd = 0.0
        yd = (ACTION_YAW_STEP_DEG if "l" in keys else 0.0) - (ACTION_YAW_STEP_DEG if "j" in keys else 0.0)
        rot = _rot_y(yd) @ rot @ _rot_x(pd)

        fwd = _flat_unit(rot[:, 2])
        right = _flat_unit(rot[:, 0])
        move = np.zeros(3)
        if "w" in keys:
            move += fwd
        if "s" in keys:
            move -= fwd
        if "d" in keys:
            move += right
        if "a" in keys:
            move -= right
        pos = pos + ACTION_MOVE_STEP * move

        out[m] = np.eye(4)
        out[m, :3, :3] = rot
        out[m, :3, 3] = pos
    return out


# --------------------------------------------------------------------------------------------------------------
# 3. Official pose input: validate, then pick one pose per latent frame (official interpolate_camera_poses, a.2)
# --------------------------------------------------------------------------------------------------------------


def validate_poses(poses: Any) -> np.ndarray:
    """float64 [N, 4, 4] camera-to-world poses, or CameraError("poses", ...)."""
    try:
        arr = np.asarray(poses, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise CameraError("poses", f"expected numbers shaped [N, 4, 4] ({e})") from None
    if arr.ndim != 3 or arr.shape[1:] != (4, 4) or arr.shape[0] == 0:
        raise CameraError("poses", f"expected shape [N, 4, 4] with N >= 1, got {list(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.argwhere(~np.isfinite(arr))[0][0])
        raise CameraError("poses", f"pose {bad} has a non-finite value")
    last = np.abs(arr[:, 3, :] - np.array([0.0, 0.0, 0.0, 1.0])).max(axis=1)
    if np.any(last > 1e-6):
        bad = int(np.argmax(last > 1e-6))
        raise CameraError("poses", f"pose {bad}: last row must be [0, 0, 0, 1], got {arr[bad, 3].tolist()}")
    rot = arr[:, :3, :3]
    err = np.abs(np.swapaxes(rot, 1, 2) @ rot - np.eye(3)).max(axis=(1, 2))
    det = np.linalg.det(rot)
    bad_rot = (err > ROTATION_TOLERANCE) | (det <= 0)
    if np.any(bad_rot):
        bad = int(np.argmax(bad_rot))
        raise CameraError(
            "poses",
            f"pose {bad}: the 3x3 block must be a rotation (orthonormal, det +1, tolerance {ROTATION_TOLERANCE}); "
            f"max |R^T R - I| = {err[bad]:.3g}, det = {det[bad]:.6g}",
        )
    return arr


def _matrix_to_quat(rot: np.ndarray) -> np.ndarray:
    """Unit quaternions (w, x, y, z) of rotations [N,3,3] (Shepperd: divide by the largest component)."""
    q = np.empty((rot.shape[0], 4))
    for n, r in enumerate(rot):
        tr = r[0, 0] + r[1, 1] + r[2, 2]
        cand = [tr, r[0, 0], r[1, 1], r[2, 2]]
        k = int(np.argmax(cand))
        if k == 0:
            s = 2.0 * math.sqrt(max(1.0 + tr, 0.0))
            q[n] = [0.25 * s, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s]
        elif k == 1:
            s = 2.0 * math.sqrt(max(1.0 + r[0, 0] - r[1, 1] - r[2, 2], 0.0))
            q[n] = [(r[2, 1] - r[1, 2]) / s, 0.25 * s, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s]
        elif k == 2:
            s = 2.0 * math.sqrt(max(1.0 - r[0, 0] + r[1, 1] - r[2, 2], 0.0))
            q[n] = [(r[0, 2] - r[2, 0]) / s, (r[0, 1] + r[1, 0]) / s, 0.25 * s, (r[1, 2] + r[2, 1]) / s]
        else:
            s = 2.0 * math.sqrt(max(1.0 - r[0, 0] - r[1, 1] + r[2, 2], 0.0))
            q[n] = [(r[1, 0] - r[0, 1]) / s, (r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, 0.25 * s]
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _quat_to_matrix(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def _slerp(q0: np.ndarray, q1: np.ndarray, t: float) -> np.ndarray:
    dot = float(np.clip(np.dot(q0, q1), -1.0, 1.0))
    theta = math.acos(dot)
    if theta < 1e-8:  # (nearly) the same rotation: the sin() form would divide by ~0
        q = (1.0 - t) * q0 + t * q1
    else:
        q = (math.sin((1.0 - t) * theta) * q0 + math.sin(t * theta) * q1) / math.sin(theta)
    return q / np.linalg.norm(q)


def interpolate_poses(poses: np.ndarray, targets: Sequence[float] | np.ndarray) -> np.ndarray:
    """Poses at fractional indices `targets` in [0, N-1] of `poses` [N,4,4] (float64 [len(targets),4,4]).

    Official interpolate_camera_poses: translation linearly, rotation by quaternion slerp. Before slerping, each
    quaternion is sign-flipped into the hemisphere of its predecessor (q and -q are the same rotation; without the
    flip a slerp between them would take the long way round). An integral target copies its pose exactly.
    """
    poses = np.asarray(poses, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    n = poses.shape[0]
    if targets.size and (targets.min() < -1e-9 or targets.max() > n - 1 + 1e-9):
        raise ValueError(f"targets must lie in [0, {n - 1}]")
    quats = _matrix_to_quat(poses[:, :3, :3])
    for i in range(1, n):
        if np.dot(quats[i], quats[i - 1]) < 0:
            quats[i] = -quats[i]
    out = np.empty((targets.size, 4, 4))
    for k, t in enumerate(targets):
        nearest = round(float(t))
        if abs(t - nearest) < 1e-9:
            out[k] = poses[nearest]
            out[k, 3] = [0.0, 0.0, 0.0, 1.0]
            continue
        i = min(int(math.floor(t)), n - 2)
        frac = float(t) - i
        out[k] = np.eye(4)
        out[k, :3, :3] = _quat_to_matrix(_slerp(quats[i], quats[i + 1], frac))
        out[k, :3, 3] = (1.0 - frac) * poses[i, :3, 3] + frac * poses[i + 1, :3, 3]
    return out


def select_latent_poses(poses: Any, num_latent_frames: int) -> np.ndarray:
    """One c2w per latent frame from per-pixel-frame poses: float64 [num_latent_frames, 4, 4].

    Official Fast preprocessing with frame_num = (num_latent_frames - 1) * 4 + 1 (the pixel frames those latent
    frames decode to): keep the first frame_num poses (`c2ws[:frame_num]`), then interpolate at
    linspace(0, frame_num - 1, num_latent_frames). That grid is exactly 0, 4, 8, ...: latent frame m takes pixel
    frame 4m, the last pixel frame of its VAE group (latent 0 takes frame 0). Fewer poses than frame_num is an
    error: the official code would silently shorten the video, but here the caller has fixed the length.
    """
    arr = validate_poses(poses)
    if num_latent_frames < 1:
        raise CameraError("num_chunks", f"need at least 1 latent frame, got {num_latent_frames}")
    frame_num = (num_latent_frames - 1) * VAE_STRIDE[0] + 1
    if arr.shape[0] < frame_num:
        raise CameraError(
            "poses",
            f"got {arr.shape[0]} poses, but {num_latent_frames} latent frames need at least {frame_num} "
            f"(one camera-to-world pose per pixel frame); pass more poses or fewer num_chunks",
        )
    used = arr[:frame_num]
    return interpolate_poses(used, np.linspace(0.0, frame_num - 1, num_latent_frames))


# --------------------------------------------------------------------------------------------------------------
# 4. Intrinsics (official get_Ks_transformed, a.1)
# --------------------------------------------------------------------------------------------------------------


def _check_size(width: int, height: int) -> None:
    sh, sw = VAE_STRIDE[1], VAE_STRIDE[2]
    if width <= 0 or height <= 0 or height % sh or width % sw:
        raise CameraError("size", f"width and height must be positive multiples of {sw}, got {width}x{height}")


def scale_intrinsics(intrinsics: Any, width: int, height: int) -> np.ndarray:
    """[fx, fy, cx, cy] for a width x height video, float64 [4].

    Official semantics: the file's intrinsics are taken to be for 480x832 (hard-coded in the Fast pipeline) and
    scaled per axis to the generation size; resize == final size, so there is no crop offset. For a per-frame
    [N, 4] input only row 0 is used, as in the official Fast code (`Ks = Ks[0]`): one K for every frame.
    """
    try:
        k = np.asarray(intrinsics, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise CameraError("intrinsics", f"expected [fx, fy, cx, cy] numbers ({e})") from None
    if k.ndim == 2 and k.shape[0] >= 1 and k.shape[1] == 4:
        k = k[0]
    if k.shape != (4,):
        raise CameraError("intrinsics", f"expected shape [4] or [N, 4] as [fx, fy, cx, cy], got {list(k.shape)}")
    if not np.all(np.isfinite(k)) or k[0] <= 0 or k[1] <= 0:
        raise CameraError("intrinsics", f"fx, fy must be positive and all values finite, got {k.tolist()}")
    _check_size(width, height)
    sx = width / INTRINSICS_SOURCE_WIDTH
    sy = height / INTRINSICS_SOURCE_HEIGHT
    return np.array([k[0] * sx, k[1] * sy, k[2] * sx, k[3] * sy])


# --------------------------------------------------------------------------------------------------------------
# 5. Relative poses (official compute_relative_poses(framewise=True, normalize_trans=True), a.3)
# --------------------------------------------------------------------------------------------------------------


def _se3_inverse(p: np.ndarray) -> np.ndarray:
    # Exact for rigid motions and cheaper/stabler than a general 4x4 inverse: [R^T, -R^T t].
    inv = np.eye(4)
    inv[:3, :3] = p[:3, :3].T
    inv[:3, 3] = -p[:3, :3].T @ p[:3, 3]
    return inv


def relative_poses(c2ws: np.ndarray) -> np.ndarray:
    """Motion of each latent frame relative to the previous one: float64 [n, 4, 4].

    Frame 0 is the identity (the input image's own view). rel_i = inv(P_{i-1}) @ P_i, the step expressed in the
    previous camera's frame. All translations are then divided by the largest step length of the WHOLE trajectory
    (if it is > 0): the model was trained on unit-scale steps, and a constant-speed path gives unit steps.
    Rotations are not normalised. Because the normaliser is global, a chunk's condition depends on the rest of the
    path: build it once per job, from the whole trajectory.
    """
    c2ws = np.asarray(c2ws, dtype=np.float64)
    n = c2ws.shape[0]
    rel = np.empty((n, 4, 4))
    if n == 0:
        return rel
    rel[0] = np.eye(4)
    for i in range(1, n):
        rel[i] = _se3_inverse(c2ws[i - 1]) @ c2ws[i]
    norms = np.linalg.norm(rel[:, :3, 3], axis=1)
    max_norm = float(norms.max())
    if max_norm > 0:  # official test: a still camera keeps all-zero translations
        rel[:, :3, 3] /= max_norm
    # The chain of poses leaves round-off (~1e-16) that differs from frame to frame, so a repeated motion (a held
    # key) would give conditions that differ in their last bits, tiny values such as 1e-17 included, which bf16
    # keeps. Rounded, equal motions give equal conditions, whose camera modulation the DiT then computes once
    # (worker/models/camera_memo.py). A change of at most 5e-10 is far below what the bf16 condition resolves (2^-9
    # of its values' size; the values are rotations and unit steps); + 0.0 turns a rounded -0.0 into 0.0.
    return np.round(rel, POSE_DECIMALS) + 0.0


# --------------------------------------------------------------------------------------------------------------
# 6. Pluecker field and the 8x8 latent-grid pack (official get_plucker_embeddings a.4; pack a.5 stage 1)
# --------------------------------------------------------------------------------------------------------------


def _camera_rays(k: np.ndarray, height: int, width: int) -> np.ndarray:
    """Unit ray directions in camera axes at pixel centres, float64 [H, W, 3]."""
    fx, fy, cx, cy = (float(v) for v in k)
    u = (np.arange(width, dtype=np.float64) + 0.5 - cx) / fx  # pixel centre (x + 0.5), as create_meshgrid(bias=.5)
    v = (np.arange(height, dtype=np.float64) + 0.5 - cy) / fy
    d = np.empty((height, width, 3))
    d[..., 0] = u[None, :]
    d[..., 1] = v[:, None]
    d[..., 2] = 1.0
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


def plucker_field(rel: np.ndarray, intrinsics: np.ndarray, height: int, width: int) -> np.ndarray:
    """Per-pixel rays of each (relative) pose: float32 numpy [n, H, W, 6] = [origin xyz, direction xyz].

    intrinsics: one [fx, fy, cx, cy] for all frames, or [n, 4] per frame. The direction is the camera-axis ray
    normalised first and then rotated by R (official order); the origin is the pose's translation, the same for
    every pixel. This is the [o, d] form the model was trained on, not the o x d moment form.
    """
    rel = np.asarray(rel, dtype=np.float64)
    k = np.asarray(intrinsics, dtype=np.float64)
    n = rel.shape[0]
    per_frame = k.ndim == 2
    shared = None if per_frame else _camera_rays(k, height, width)
    out = np.empty((n, height, width, _RAY_CHANNELS), dtype=np.float32)
    for f in range(n):
        d_cam = _camera_rays(k[f], height, width) if per_frame else shared
        out[f, ..., :3] = rel[f, :3, 3]
        out[f, ..., 3:] = d_cam @ rel[f, :3, :3].T  # row-vector form of R @ d
    return out


def pack_latent_grid(field: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[n, H, W, 6] -> [384, n, H/8, W/8]: each latent cell gets its 8x8 pixels, channel-major.

    Official 'f (h c1) (w c2) c -> (c c1 c2) f h w' with c1 = c2 = 8: channel = p*64 + dy*8 + dx for ray
    component p, pixel (8*h + dy, 8*w + dx). Keeps the input's dtype.
    """
    t = torch.as_tensor(field)
    n, height, width, c = t.shape
    sh, sw = VAE_STRIDE[1], VAE_STRIDE[2]
    if height % sh or width % sw:
        raise CameraError("size", f"field {height}x{width} is not a multiple of the {sh}x{sw} VAE stride")
    t = t.reshape(n, height // sh, sh, width // sw, sw, c)
    # (f, h, dy, w, dx, p) -> (p, dy, dx, f, h, w)
    return t.permute(5, 2, 4, 0, 1, 3).reshape(c * sh * sw, n, height // sh, width // sw)


# --------------------------------------------------------------------------------------------------------------
# 7. Entry points used by the rollout
# --------------------------------------------------------------------------------------------------------------


def chunks_for_path(actions: Sequence[Sequence[str]] | None = None, poses: Any = None) -> int:
    """Default num_chunks implied by a camera path.

    Actions: ceil(len / 3) (the last chunk is padded with idle entries), at least 1. Poses: as many latent frames
    as the poses cover, (N - 1) // 4 + 1, rounded down to whole chunks (official); fewer than 9 poses is an error.
    No path at all: 1 chunk of a still camera.
    """
    if actions is not None and poses is not None:
        raise CameraError("poses", "give either camera_actions or poses, not both")
    if poses is not None:
        n = validate_poses(poses).shape[0]
        n_lat = (n - 1) // VAE_STRIDE[0] + 1
        chunks = n_lat // CHUNK_LATENT_FRAMES
        if chunks == 0:
            raise CameraError(
                "poses", f"got {n} poses; one chunk needs at least {total_pixel_frames(1)} (one per pixel frame)"
            )
        return chunks
    n = len(validate_actions(actions)) if actions is not None else 0
    return max(1, -(-n // CHUNK_LATENT_FRAMES))


def _relative_path(
    *, width: int, height: int, num_chunks: int, actions: Any, poses: Any, intrinsics: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Relative poses [3*num_chunks, 4, 4] of the whole trajectory and the intrinsics [4] for this size."""
    _check_size(width, height)
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise CameraError("num_chunks", f"must be an integer >= 1, got {num_chunks!r}")
    n_lat = CHUNK_LATENT_FRAMES * num_chunks
    if poses is not None:
        if actions is not None:
            raise CameraError("poses", "give either camera_actions or poses, not both")
        if intrinsics is None:
            raise CameraError("intrinsics", "required with poses: [fx, fy, cx, cy] for a 480x832 image")
        k = scale_intrinsics(intrinsics, width, height)
        c2ws = select_latent_poses(poses, n_lat)
    else:
        if intrinsics is not None:
            # Actions always use SGLang's fixed K; silently ignoring a given K would hide a client mistake.
            raise CameraError("intrinsics", "only used with poses; camera_actions use a fixed focal length")
        acts = validate_actions(actions) if actions is not None else []
        # The caller fixes the length: idle-pad a short path, cut a long one.
        acts = (acts + [[] for _ in range(n_lat)])[:n_lat]
        c2ws = actions_to_c2ws(acts)
        k = np.array([ACTION_FOCAL, ACTION_FOCAL, width / 2.0, height / 2.0])
    # Normalise over the WHOLE trajectory before any chunking (the normaliser is global, see relative_poses).
    return relative_poses(c2ws), k


class CameraChunk(NamedTuple):
    field: torch.Tensor  # [1, 384, 3, H/8, W/8] float32
    # One key per latent frame: the relative pose, intrinsics and size its field is made from. Equal keys, equal
    # fields (the field is a function of them alone), which lets the DiT reuse a frame's camera modulation
    # (worker/models/camera_memo.py) without reading the field.
    frame_keys: tuple[bytes, ...]


def iter_camera_condition(
    *,
    width: int,
    height: int,
    num_chunks: int,
    actions: Sequence[Sequence[str]] | None = None,
    poses: Any = None,
    intrinsics: Any = None,
) -> Iterator[CameraChunk]:
    """The camera condition one chunk at a time: num_chunks CameraChunks, fields [1, 384, 3, H/8, W/8] float32.

    Same values as camera_condition(), but only one chunk's field (3 x H x W x 6 floats) is ever alive, so a
    rollout of hundreds of latent frames does not hold the whole condition in memory. All validation happens
    before the first chunk is yielded.
    """
    rel, k = _relative_path(
        width=width, height=height, num_chunks=num_chunks, actions=actions, poses=poses, intrinsics=intrinsics
    )
    return _iter_chunks(rel, k, height, width)


def _packed_camera_rays(k: np.ndarray, height: int, width: int) -> np.ndarray:
    """Camera-axis rays already in pack order: float64 [3, 64 * H/8 * W/8] (component, then dy*8+dx, then cell)."""
    sh, sw = VAE_STRIDE[1], VAE_STRIDE[2]
    rays = _camera_rays(k, height, width).reshape(height // sh, sh, width // sw, sw, 3)
    return np.ascontiguousarray(rays.transpose(4, 1, 3, 0, 2)).reshape(3, -1)


def _frame_key(rel: np.ndarray, k: np.ndarray, height: int, width: int) -> bytes:
    return np.ascontiguousarray(rel, dtype=np.float64).tobytes() + k.astype(np.float64).tobytes() \
        + np.array([height, width], dtype=np.int64).tobytes()


def _iter_chunks(rel: np.ndarray, k: np.ndarray, height: int, width: int) -> Iterator[CameraChunk]:
    # Same values as pack_latent_grid(plucker_field(...)), computed in the packed layout: the rotation acts on each
    # pixel's ray alone and the pack is a permutation, so packing the camera-axis rays once and rotating them per
    # frame (one 3x3 @ 3xM product) gives the same numbers about 10x faster than building and permuting the
    # [H, W, 6] field (measured ~7 ms instead of ~75 ms per latent frame at 832x480 on a 2-thread CPU), which keeps
    # the condition well inside a chunk's real-time budget even at 1280x720.
    sh, sw = VAE_STRIDE[1], VAE_STRIDE[2]
    h, w, cells = height // sh, width // sw, sh * sw
    rays = _packed_camera_rays(k, height, width)
    for start in range(0, rel.shape[0], CHUNK_LATENT_FRAMES):
        block = rel[start : start + CHUNK_LATENT_FRAMES]
        out = np.empty((_RAY_CHANNELS * cells, block.shape[0], h, w), dtype=np.float32)
        for j, p in enumerate(block):
            out[: 3 * cells, j] = np.repeat(p[:3, 3], cells)[:, None, None]  # origin: the same at every pixel
            out[3 * cells :, j] = (p[:3, :3] @ rays).reshape(3 * cells, h, w)  # direction: R @ d_cam
        yield CameraChunk(torch.from_numpy(out).unsqueeze(0), tuple(_frame_key(p, k, height, width) for p in block))


def camera_condition(
    *,
    width: int,
    height: int,
    num_chunks: int,
    actions: Sequence[Sequence[str]] | None = None,
    poses: Any = None,
    intrinsics: Any = None,
) -> torch.Tensor:
    """The DiT's camera condition for a whole rollout: float32 [1, 384, 3*num_chunks, H/8, W/8].

    actions: one key list per latent frame (SGLang semantics, K = [ACTION_FOCAL, ACTION_FOCAL, W/2, H/2]); padded
      with [] (hold still) or truncated to 3*num_chunks. The first entry never moves the camera: latent frame 0
      is the input image's view and always gets the identity.
    poses + intrinsics: official semantics, one c2w per pixel frame and [fx, fy, cx, cy] for 480x832 (row 0 of a
      per-frame array), at least (3*num_chunks - 1)*4 + 1 poses.
    Neither: a still camera. Chunk c is [:, :, 3c:3c+3]. Filled chunk by chunk, so the only large allocation is
    the result itself (see iter_camera_condition to avoid even that).
    """
    chunks = iter_camera_condition(
        width=width, height=height, num_chunks=num_chunks, actions=actions, poses=poses, intrinsics=intrinsics
    )
    sh, sw = VAE_STRIDE[1], VAE_STRIDE[2]
    n_lat = CHUNK_LATENT_FRAMES * num_chunks
    out = torch.empty((1, _RAY_CHANNELS * sh * sw, n_lat, height // sh, width // sw), dtype=torch.float32)
    for c, chunk in enumerate(chunks):
        out[:, :, c * CHUNK_LATENT_FRAMES : (c + 1) * CHUNK_LATENT_FRAMES] = chunk.field
    return out
