"""Write tiny checkpoints in the real on-disk layouts (test helper, shared by other tests).

- "diffusers" (robbyant/lingbot-world-fast-diffusers): model_index.json, transformer/{config.json, sharded fp32
  safetensors, index json}, vae/, text_encoder/, tokenizer/ (save_pretrained of tiny random models).
- "official" (robbyant/lingbot-world-fast): sharded fp32 safetensors + index json + config.json (WanModelFast fields)
  at the top level, or in lingbot_world_fast/ with `official_subfolder=True`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from worker.config import PRESETS, DiTConfig
from worker.models.convert import ShardWriter
from worker.models.loading import OFFICIAL_SUBFOLDER, SINGLE_NAME

TINY = PRESETS["tiny"]

# model_index.json of the diffusers repo (reference/diffusers_fast_keys.txt, section B).
MODEL_INDEX = {
    "_class_name": "LingBotWorldCausalDMDPipeline",
    "_diffusers_version": "0.35.0.dev0",
    "boundary_ratio": 0.9,
    "image_encoder": [None, None],
    "image_processor": [None, None],
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "CausalLingBotWorldTransformer3DModel"],
    "transformer_2": [None, None],
    "vae": ["diffusers", "AutoencoderKLWan"],
}


def diffusers_transformer_config(cfg: DiTConfig) -> dict:
    """transformer/config.json with the field names of the diffusers repo (section A)."""
    return {
        "_class_name": "CausalLingBotWorldTransformer3DModel",
        "_diffusers_version": "0.35.0.dev0",
        "added_kv_proj_dim": None,
        "attention_head_dim": cfg.head_dim,
        "cross_attn_norm": True,
        "eps": cfg.eps,
        "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim,
        "image_dim": None,
        "in_channels": cfg.in_dim,
        "num_attention_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "out_channels": cfg.out_dim,
        "patch_size": list(cfg.patch_size),
        "pos_embed_seq_len": None,
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": cfg.rope_max_positions,
        "text_dim": cfg.text_dim,
        "local_attn_size": -1,
        "sink_size": 9,
        "num_frames_per_block": 3,
        "sliding_window_num_frames": 18,
    }


def official_config(cfg: DiTConfig) -> dict:
    """config.json of the official folder (WanModelFast register_to_config fields)."""
    return {
        "_class_name": "WanModelFast",
        "_diffusers_version": "0.31.0",
        "model_type": "i2v",
        "control_type": "cam",
        "patch_size": list(cfg.patch_size),
        "text_len": cfg.text_len,
        "in_dim": cfg.in_dim,
        "dim": cfg.dim,
        "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim,
        "text_dim": cfg.text_dim,
        "out_dim": cfg.out_dim,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "local_attn_size": -1,
        "sink_size": 0,
        "qk_norm": True,
        "cross_attn_norm": True,
        "eps": cfg.eps,
    }


def write_shards(dst: Path, state_dict: dict[str, torch.Tensor], max_shard_bytes: int) -> list[Path]:
    """fp32 safetensors shards in state-dict order + index json, by the converter's ShardWriter (a single file
    without index if it all fits)."""
    dst.mkdir(parents=True, exist_ok=True)
    fp32 = {name: t.detach().to("cpu", torch.float32).contiguous().clone() for name, t in state_dict.items()}
    if len(fp32) <= 1 or sum(t.numel() * t.element_size() for t in fp32.values()) <= max_shard_bytes:
        save_file(fp32, str(dst / SINGLE_NAME), metadata={"format": "pt"})
        return [dst / SINGLE_NAME]
    shards = ShardWriter(dst, max_shard_bytes)
    for name, t in fp32.items():
        shards.add(name, t)
    shards.close()
    return sorted(dst.glob("diffusion_pytorch_model-*-of-*.safetensors"))


def write_components(dst: Path, seed: int = 0) -> None:
    """vae/, text_encoder/, tokenizer/ of the tiny preset via save_pretrained."""
    from worker.models.text_encoder import build_text_encoder
    from worker.models.vae import build_vae

    build_vae(TINY.vae, seed=seed).save_pretrained(dst / "vae")
    te = build_text_encoder(TINY.text_encoder, seed=seed)
    te.model.save_pretrained(dst / "text_encoder")
    te.tokenizer.save_pretrained(dst / "tokenizer")


def write_tiny_checkpoint(
    dst: Path,
    layout: str,
    state_dict: dict[str, torch.Tensor],
    dit_cfg: DiTConfig,
    max_shard_bytes: int = 64 * 1024,
    components: bool = True,
    official_subfolder: bool = False,
) -> Path:
    """Write a checkpoint; returns the folder holding the DiT shards. `components=False` skips vae/ etc."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":
        (dst / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
        tdir = dst / "transformer"
        write_shards(tdir, state_dict, max_shard_bytes)
        (tdir / "config.json").write_text(json.dumps(diffusers_transformer_config(dit_cfg), indent=2))
        if components:
            write_components(dst)
    elif layout == "official":
        tdir = dst / OFFICIAL_SUBFOLDER if official_subfolder else dst
        write_shards(tdir, state_dict, max_shard_bytes)
        (tdir / "config.json").write_text(json.dumps(official_config(dit_cfg), indent=2))
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return tdir


def fake_hf_cache(cache_dir: Path, repo_id: str, revision: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """An HF hub cache entry (models--org--name/{refs/main, snapshots/<hash>/}); returns the snapshot folder."""
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "blobs").mkdir(exist_ok=True)
    return snap
