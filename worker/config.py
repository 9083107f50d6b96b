"""Model and sampling facts: the one place every number about LingBot-World Fast lives.

Everything else imports from here; nothing re-types a dimension, a timestep or a stride.
Sources: ../shared/reference/official_fast_keys.txt (shapes) and fast_rollout.md (schedule).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DiTConfig:
    """WanModelFast (official names) hyper-parameters."""

    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 36  # 16 noisy latent + 4 mask + 16 image latent
    out_dim: int = 16
    num_heads: int = 40
    num_layers: int = 40
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    control_dim: int = 6  # Pluecker [origin, direction]
    rope_theta: float = 10000.0
    rope_max_positions: int = 1024  # official RoPE table length; bounds the latent frames of a rollout

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Channels of the head dim rotated by (t, h, w) positions: [44, 42, 42] at full size."""
        d = self.head_dim
        hw = 2 * (d // 6)
        return (d - 2 * hw, hw, hw)

    @property
    def camera_in_features(self) -> int:
        """Pluecker channels per token: 6 x (8x8 pixel pack) x (1x2x2 patch) = 1536."""
        pt, ph, pw = self.patch_size
        return self.control_dim * VAE_STRIDE[1] * VAE_STRIDE[2] * pt * ph * pw

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d


# --- VAE (Wan2.1, causal): fixed by the latent space the DiT was trained in ---------------------------
VAE_Z_DIM = 16
VAE_STRIDE = (4, 8, 8)  # (t, h, w)
MASK_CHANNELS = 4  # = VAE_STRIDE[0]: the first-frame mask is folded 4 pixel frames per latent frame

# --- Rollout / sampling (official Fast semantics) -------------------------------------------------------
CHUNK_LATENT_FRAMES = 3  # latent frames per chunk; 9 pixel frames for chunk 0, 12 afterwards
NUM_TRAIN_TIMESTEPS = 1000
SAMPLE_SHIFT = 10.0
DENOISING_STEP_INDICES = (0, 179, 358, 679)  # -> t = [999, 978, 947, 825] at shift 10
FPS = 16
DEFAULT_KV_WINDOW = 15  # latent frames, including the chunk being generated
DEFAULT_KV_SINK = 3
DEFAULT_SIZE = (832, 480)  # (width, height)

# Official intrinsics (example 00) are for 480x832; actions use SGLang's fixed K = [500, 500, W/2, H/2].
ACTION_FOCAL = 500.0


def pixel_frames_for_chunk(chunk_index: int) -> int:
    """Causal VAE: latent frame 0 decodes to 1 pixel frame, every later latent frame to 4."""
    n = CHUNK_LATENT_FRAMES * VAE_STRIDE[0]
    return n - (VAE_STRIDE[0] - 1) if chunk_index == 0 else n


def total_pixel_frames(num_chunks: int) -> int:
    return (CHUNK_LATENT_FRAMES * num_chunks - 1) * VAE_STRIDE[0] + 1


def chunk_tokens(cfg: DiTConfig, lat_h: int, lat_w: int) -> int:
    """The DiT's tokens for one chunk at this latent size: the patch grid of CHUNK_LATENT_FRAMES latent frames."""
    pt, ph, pw = cfg.patch_size
    return CHUNK_LATENT_FRAMES // pt * (lat_h // ph) * (lat_w // pw)


def max_chunks(cfg: DiTConfig) -> int:
    return cfg.rope_max_positions // CHUNK_LATENT_FRAMES


@dataclass(frozen=True)
class ModelPreset:
    """A named model: DiT config plus the configs of the tiny companions (None = load from disk)."""

    name: str
    dit: DiTConfig
    vae: dict[str, Any] | None = None  # diffusers.AutoencoderKLWan kwargs for random init
    text_encoder: dict[str, Any] | None = None  # transformers.UMT5Config kwargs for random init
    max_size: tuple[int, int] = (1280, 1280)  # (width, height) caps of a request
    extra: dict[str, Any] = field(default_factory=dict)


FULL = ModelPreset(
    name="lingbot-world-fast",
    dit=DiTConfig(),
    vae=dict(
        base_dim=96, z_dim=VAE_Z_DIM, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
        temperal_downsample=[False, True, True], dropout=0.0,
    ),
    text_encoder=dict(
        vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
        is_encoder_decoder=False, tie_word_embeddings=False,
    ),
)

TINY = ModelPreset(
    name="tiny",
    dit=DiTConfig(
        dim=64, ffn_dim=128, freq_dim=32, text_dim=32, text_len=512, num_heads=4, num_layers=2,
    ),
    vae=dict(
        base_dim=8, z_dim=VAE_Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], dropout=0.0,
    ),
    text_encoder=dict(
        vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
        is_encoder_decoder=False, tie_word_embeddings=False,
    ),
)

PRESETS: dict[str, ModelPreset] = {p.name: p for p in (FULL, TINY)}

# Camera action tokens (one set per latent frame): w/s forward/back, a/d strafe, i/k pitch up/down, j/l yaw.
ACTION_KEYS = frozenset("wasdijkl")
ACTION_MOVE_STEP = 0.05  # world units per latent frame (SGLang realtime)
ACTION_PITCH_STEP_DEG = 4.0
ACTION_YAW_STEP_DEG = 6.0
ACTION_PITCH_LIMIT_DEG = 85.0
