"""Finding model weights on local storage and loading them without ever holding two copies.

Where a model can come from (`resolve_model`):
- a preset name of `worker.config.PRESETS` -> random weights (kind "random");
- a local folder in either layout;
- a hub id ("org/name"), resolved ONLY from local copies, in this order:
  1. `$LINGBOT_MODEL_DIR` (a mounted volume: the Modal app mounts its volume there), as `<dir>/<org>/<name>`,
     `<dir>/<name>`, or an HF cache inside it (`<dir>/models--org--name`, `<dir>/hub/models--org--name`);
  2. the Hugging Face cache (`$HF_HUB_CACHE`, `$HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub);
  3. RunPod's cached-model store, `/runpod-volume/huggingface-cache/hub` (RunPod "Cached models" docs: HF cache
     layout, `models--ORG--NAME/snapshots/HASH/`).
  Nothing is ever downloaded.

Layouts (`ModelSource.layout`):
- "diffusers" (robbyant/lingbot-world-fast-diffusers): model_index.json + transformer/ (config.json + sharded fp32
  safetensors with the OFFICIAL tensor names + index json) + vae/ + text_encoder/ + tokenizer/.
- "official" (robbyant/lingbot-world-fast): index json + shards + config.json (WanModelFast fields) at the top level or
  in `lingbot_world_fast/`. It ships only the DiT in this form (its VAE / T5 are Wan .pth files, which we do not
  convert), so the VAE, text encoder and tokenizer come from a diffusers-layout folder named by env
  `LINGBOT_COMPONENTS` (a folder or hub id, resolved like the model). A folder that itself holds vae/ text_encoder/
  tokenizer/ next to the official files needs no LINGBOT_COMPONENTS.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from worker.config import PRESETS, DiTConfig, ModelPreset

INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_NAME = "diffusion_pytorch_model.safetensors"
OFFICIAL_SUBFOLDER = "lingbot_world_fast"
COMPONENTS = ("vae", "text_encoder", "tokenizer")
RUNPOD_HF_CACHE = Path("/runpod-volume/huggingface-cache/hub")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

Layout = Literal["diffusers", "official"]


class WeightsError(RuntimeError):
    """Model weights could not be found or do not match the model (message names the file and tensor)."""


@dataclass(frozen=True)
class ModelSource:
    spec: str
    kind: Literal["random", "local"]
    preset: ModelPreset | None = None  # kind == "random"
    path: Path | None = None  # model root folder
    layout: Layout | None = None
    transformer_dir: Path | None = None  # folder holding the DiT shards (+ index json)
    components: Path | None = None  # diffusers-layout folder with vae/ text_encoder/ tokenizer/
    looked_in: tuple[str, ...] = field(default=())


# ---- resolving --------------------------------------------------------------------------------------------
def detect_layout(folder: Path) -> tuple[Layout, Path] | None:
    """(layout, transformer_dir) of a model folder, or None if it is neither layout."""
    if (folder / "model_index.json").is_file() and (folder / "transformer").is_dir():
        return "diffusers", folder / "transformer"
    for d in (folder, folder / OFFICIAL_SUBFOLDER):
        if (d / INDEX_NAME).is_file() or (d / SINGLE_NAME).is_file():
            return "official", d
    return None


def _has_components(folder: Path) -> bool:
    return all((folder / c).is_dir() for c in COMPONENTS)


def hf_cache_dirs(env: Mapping[str, str]) -> list[Path]:
    """HF hub caches named by the environment (HF_HUB_CACHE wins over HF_HOME, like huggingface_hub)."""
    out = []
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            out.append(Path(env[var]))
    home = env.get("HF_HOME") or str(Path(env.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface")
    out.append(Path(home) / "hub")
    return out


def _from_hf_cache(repo_id: str, cache: Path) -> Path | None:
    """Snapshot folder of `repo_id` in one HF cache, without network."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    if not repo_dir.is_dir():
        return None
    try:
        from huggingface_hub import snapshot_download

        p = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
        if detect_layout(p) or _has_components(p):
            return p
    except Exception:  # no refs/main, partial snapshot, ...: fall back to scanning the snapshots
        pass
    snaps = sorted((repo_dir / "snapshots").glob("*/"), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in snaps:
        if detect_layout(p) or _has_components(p):
            return p
    return None


def find_local_repo(repo_id: str, env: Mapping[str, str], runpod_cache: Path = RUNPOD_HF_CACHE) -> tuple[Path | None, list[str]]:
    """First local copy of a hub repo; also returns every place looked at (for the error message)."""
    looked: list[str] = []
    org, name = repo_id.split("/", 1)
    candidates: list[tuple[str, Path]] = []
    if env.get("LINGBOT_MODEL_DIR"):
        vol = Path(env["LINGBOT_MODEL_DIR"])
        candidates += [("dir", vol / org / name), ("dir", vol / name), ("cache", vol), ("cache", vol / "hub")]
    candidates += [("cache", c) for c in hf_cache_dirs(env)]
    candidates.append(("cache", Path(runpod_cache)))
    for kind, p in candidates:
        if kind == "dir":
            looked.append(str(p))
            if p.is_dir() and (detect_layout(p) or _has_components(p)):
                return p, looked
        else:
            looked.append(f"{p} (HF cache: models--{org}--{name})")
            hit = _from_hf_cache(repo_id, p)
            if hit is not None:
                return hit, looked
    return None, looked


def _resolve_folder(spec: str, env: Mapping[str, str], runpod_cache: Path) -> tuple[Path, list[str]]:
    p = Path(spec).expanduser()
    if p.is_dir():
        return p.resolve(), [str(p)]
    if not _HUB_ID.match(spec):
        raise WeightsError(
            f"model {spec!r} is not a preset ({', '.join(sorted(PRESETS))}), an existing folder, or a hub id 'org/name'"
        )
    hit, looked = find_local_repo(spec, env, runpod_cache)
    if hit is None:
        raise WeightsError(
            f"model {spec!r} not found locally (nothing is downloaded). Looked in:\n  " + "\n  ".join(looked)
            + "\nPre-download it into the HF cache, enable RunPod model caching, or set LINGBOT_MODEL_DIR."
        )
    return hit, looked


def resolve_model(spec: str, env: Mapping[str, str] = os.environ, runpod_cache: Path = RUNPOD_HF_CACHE) -> ModelSource:
    """Preset name -> random source; folder or hub id -> local source with its layout and component folder."""
    if spec in PRESETS:
        return ModelSource(spec=spec, kind="random", preset=PRESETS[spec])
    root, looked = _resolve_folder(spec, env, runpod_cache)
    det = detect_layout(root)
    if det is None:
        raise WeightsError(
            f"{root} (from {spec!r}) is neither a diffusers layout (model_index.json + transformer/) nor an official "
            f"layout ({INDEX_NAME} or {SINGLE_NAME} at the top or in {OFFICIAL_SUBFOLDER}/)"
        )
    layout, tdir = det
    if layout == "diffusers" or _has_components(root):
        components = root
    elif env.get("LINGBOT_COMPONENTS"):
        components, more = _resolve_folder(env["LINGBOT_COMPONENTS"], env, runpod_cache)
        looked += more
        if not _has_components(components):
            raise WeightsError(f"LINGBOT_COMPONENTS={env['LINGBOT_COMPONENTS']!r} -> {components} lacks {'/, '.join(COMPONENTS)}/")
    else:
        raise WeightsError(
            f"{root} is an official-layout checkpoint (DiT only). Set LINGBOT_COMPONENTS to a diffusers-layout folder or "
            "hub id (e.g. robbyant/lingbot-world-fast-diffusers) for the VAE, text encoder and tokenizer; the Wan .pth "
            "files of the official repo are not converted."
        )
    return ModelSource(spec=spec, kind="local", path=root, layout=layout, transformer_dir=tdir,
                       components=components, looked_in=tuple(looked))


# ---- config -----------------------------------------------------------------------------------------------
_CONTROL_DIMS = {"cam": 6, "act": 7}  # official control_type -> Pluecker channels (+1 for action-conditioned)


def _config_path(folder: Path) -> Path:
    for c in (folder / "transformer" / "config.json", folder / "config.json", folder / OFFICIAL_SUBFOLDER / "config.json"):
        if c.is_file():
            return c
    raise WeightsError(f"no DiT config.json under {folder} (looked in transformer/, ./, {OFFICIAL_SUBFOLDER}/)")


def dit_config_from_dict(d: Mapping) -> DiTConfig:
    """Map an official WanModelFast config or a diffusers transformer config to DiTConfig."""
    if "num_attention_heads" in d:  # diffusers naming
        kw = dict(
            dim=d["num_attention_heads"] * d["attention_head_dim"], num_heads=d["num_attention_heads"],
            in_dim=d["in_channels"], out_dim=d["out_channels"],
        )
        for k in ("ffn_dim", "freq_dim", "text_dim", "num_layers", "eps", "text_len"):
            if k in d:
                kw[k] = d[k]
        if d.get("rope_max_seq_len"):
            kw["rope_max_positions"] = d["rope_max_seq_len"]
    else:
        names = ("dim", "ffn_dim", "freq_dim", "text_dim", "text_len", "in_dim", "out_dim", "num_heads", "num_layers", "eps")
        kw = {k: d[k] for k in names if k in d}
        if d.get("control_type") in _CONTROL_DIMS:
            kw["control_dim"] = _CONTROL_DIMS[d["control_type"]]
    if "patch_size" in d:
        kw["patch_size"] = tuple(d["patch_size"])
    return DiTConfig(**kw)


def read_dit_config(folder: str | Path) -> DiTConfig:
    """DiTConfig of a model root (either layout) or of a transformer folder."""
    path = _config_path(Path(folder))
    try:
        d = json.loads(path.read_text())
        return dit_config_from_dict(d)
    except (KeyError, ValueError, TypeError) as e:
        raise WeightsError(f"cannot read DiT config {path}: {e!r}") from e


# ---- shards -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardSet:
    files: list[Path]
    weight_map: dict[str, str] | None = None  # tensor name -> shard file name (from the index json)
    index: Path | None = None


def find_shards(transformer_dir: str | Path, index_name: str = INDEX_NAME, single_name: str = SINGLE_NAME
                ) -> ShardSet:
    """Shard files of a transformer folder: from its index json, else the single safetensors file (diffusers'
    names by default; transformers' for a text encoder)."""
    d = Path(transformer_dir)
    idx = d / index_name
    if idx.is_file():
        try:
            weight_map = json.loads(idx.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"index {idx} is not a valid safetensors index ({e!r})") from e
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise WeightsError(f"index {idx} points to missing shard file(s): {', '.join(missing)}")
        return ShardSet([d / n for n in names], weight_map, idx)
    if (d / single_name).is_file():
        return ShardSet([d / single_name])
    raise WeightsError(f"no {index_name} or {single_name} in {d}")


def _slot(module: nn.Module, name: str) -> tuple[nn.Module, str, bool]:
    """(owner module, attribute, is_parameter) of a state-dict name."""
    prefix, _, attr = name.rpartition(".")
    owner = module.get_submodule(prefix) if prefix else module
    return owner, attr, attr in owner._parameters


def load_state_dict_streaming(
    module: nn.Module,
    shard_files: list[Path] | ShardSet,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    num_threads: int = 4,
) -> nn.Module:
    """Fill `module` (built on the meta device) from safetensors shards, one tensor at a time.

    Each tensor is read (mmap), cast to `dtype` (floating tensors only) and moved to `device` on its own, then
    assigned in place of the meta tensor: peak extra host memory is a few fp32 tensors, never a second model.
    Shards are read by `num_threads` threads. strict: every state-dict entry must be loaded exactly once with the
    right shape. Non-persistent buffers are left to the module.
    """
    from safetensors import safe_open

    shards = shard_files if isinstance(shard_files, ShardSet) else ShardSet(list(shard_files))
    device = torch.device(device)
    expected = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    loaded: dict[str, Path] = {}
    lock = threading.Lock()

    def where(name: str) -> str:
        if shards.weight_map is None:
            return f"expected in one of {', '.join(f.name for f in shards.files)}"
        if name in shards.weight_map:
            return f"index {shards.index} maps it to {shards.weight_map[name]}"
        return f"index {shards.index} has no entry for it"

    def load_one(path: Path) -> None:
        try:
            f = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:
            raise WeightsError(f"cannot open shard {path} (corrupt or truncated?): {e}") from e
        with f:
            for name in f.keys():
                if name not in expected:
                    raise WeightsError(f"unexpected tensor {name!r} in {path} (the model has no such parameter)")
                try:
                    got = tuple(f.get_slice(name).get_shape())
                except Exception as e:
                    raise WeightsError(f"cannot read tensor {name!r} header in {path}: {e}") from e
                if got != expected[name]:
                    raise WeightsError(f"shape mismatch for {name!r} in {path}: model expects {list(expected[name])}, file has {list(got)}")
                with lock:
                    if name in loaded:
                        raise WeightsError(f"tensor {name!r} appears twice: in {loaded[name]} and {path}")
                    loaded[name] = path
                try:
                    t = f.get_tensor(name)
                except Exception as e:
                    raise WeightsError(f"cannot read tensor {name!r} from {path} (corrupt or truncated?): {e}") from e
                # Cast where it is cheapest: on the GPU if the target is one, so the host only ever holds fp32 once.
                if device.type != "cpu":
                    t = t.to(device, non_blocking=False)
                if t.is_floating_point() and t.dtype != dtype:
                    t = t.to(dtype)
                owner, attr, is_param = _slot(module, name)
                old = getattr(owner, attr)
                if is_param:
                    owner._parameters[attr] = nn.Parameter(t, requires_grad=old.requires_grad)
                else:
                    owner._buffers[attr] = t
                del t

    with ThreadPoolExecutor(max_workers=max(1, min(num_threads, len(shards.files)))) as pool:
        for fut in [pool.submit(load_one, p) for p in shards.files]:
            fut.result()

    missing = [k for k in expected if k not in loaded]
    if missing:
        detail = "; ".join(f"{k!r} ({where(k)})" for k in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise WeightsError(f"{len(missing)} tensor(s) missing from the checkpoint: {detail}{more}")
    return module


# ---- whole components -------------------------------------------------------------------------------------
def load_dit(
    source: ModelSource,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    build: Callable[[DiTConfig], nn.Module] | None = None,
    seed: int = 0,
    num_threads: int = 4,
) -> nn.Module:
    """The DiT of a source: random (preset, seeded) or streamed from its shards into a meta-built model."""
    from worker.models import dit as dit_mod

    if source.kind == "random":
        return dit_mod.build_dit(source.preset.dit, device=device, dtype=dtype, seed=seed)
    cfg = read_dit_config(source.path)
    if build is None:
        model = dit_mod.build_dit(cfg, dtype=dtype, seed=None)
    else:
        with torch.device("meta"):
            model = build(cfg)
    load_state_dict_streaming(model, find_shards(source.transformer_dir), dtype, device, num_threads)
    return model.eval().requires_grad_(False)


def load_vae_for(source: ModelSource, dtype: torch.dtype, device: str | torch.device):
    from worker.models.vae import build_vae, load_vae

    if source.kind == "random":
        return build_vae(source.preset.vae, dtype, device)
    return load_vae(source.components, dtype, device)


def load_text_encoder_for(source: ModelSource, dtype: torch.dtype, device: str | torch.device, *,
                          build_lock: contextlib.AbstractContextManager | None = None, **enc_kw):
    """The text encoder; `build_lock` is held while the model is built (Engine.load passes prewarm.exclusive())."""
    from worker.models.text_encoder import build_text_encoder, load_text_encoder

    if source.kind == "random":
        return build_text_encoder(source.preset.text_encoder, dtype, device, build_lock=build_lock, **enc_kw)
    return load_text_encoder(source.components, dtype, device, build_lock=build_lock, **enc_kw)
