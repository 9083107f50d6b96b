"""Weight resolution and streaming loading on tiny checkpoints written in the real layouts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import checkpoints
from worker.config import PRESETS
from worker.models.dit import LingBotDiT, build_dit
from worker.models.loading import (
    INDEX_NAME, WeightsError, find_shards, load_dit, load_state_dict_streaming, load_text_encoder_for, load_vae_for,
    read_dit_config, resolve_model,
)

TINY = PRESETS["tiny"]
REPO = "robbyant/lingbot-world-fast-diffusers"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def src_model() -> LingBotDiT:
    return build_dit(TINY.dit, device="cpu", dtype=torch.float32, seed=0)


@pytest.fixture(scope="module")
def src_sd(src_model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in src_model.state_dict().items()}


def _shard_bytes(sd) -> int:
    return sum(t.numel() * 4 for t in sd.values()) // 4  # -> 4-5 shards


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory, src_sd) -> Path:
    d = tmp_path_factory.mktemp("ckpt") / "lingbot-world-fast-diffusers"
    checkpoints.write_tiny_checkpoint(d, "diffusers", src_sd, TINY.dit, max_shard_bytes=_shard_bytes(src_sd))
    return d


def _official(tmp_path: Path, sd, subfolder: bool = False) -> Path:
    d = tmp_path / "lingbot-world-fast"
    checkpoints.write_tiny_checkpoint(d, "official", sd, TINY.dit, max_shard_bytes=_shard_bytes(sd),
                                      official_subfolder=subfolder)
    return d


def _assert_state_equal_bf16(model, src_sd) -> None:
    sd = model.state_dict()
    assert sd.keys() == src_sd.keys()
    for k, v in src_sd.items():
        assert sd[k].dtype == torch.bfloat16 and sd[k].device.type == "cpu", k
        assert torch.equal(sd[k], v.to(torch.bfloat16)), k


# ---- loading -------------------------------------------------------------------------------------------------
def test_diffusers_layout_loads_to_bf16(diffusers_dir, src_sd, src_model) -> None:
    src = resolve_model(str(diffusers_dir), env={})
    assert (src.kind, src.layout) == ("local", "diffusers")
    assert src.transformer_dir == diffusers_dir.resolve() / "transformer" and src.components == diffusers_dir.resolve()
    shards = find_shards(src.transformer_dir)
    assert len(shards.files) >= 3 and shards.files[0].name == "diffusion_pytorch_model-00001-of-%05d.safetensors" % len(shards.files)
    index = json.loads((src.transformer_dir / INDEX_NAME).read_text())
    assert set(index) == {"metadata", "weight_map"} and set(index["weight_map"]) == set(src_sd)
    model = load_dit(src, torch.bfloat16, "cpu")
    assert isinstance(model, LingBotDiT)
    _assert_state_equal_bf16(model, src_sd)
    # The loaded model computes exactly what the in-memory model cast to bf16 computes.
    ref = build_dit(TINY.dit, device="cpu", dtype=torch.bfloat16, seed=None).to_empty(device="cpu")
    ref.load_state_dict({k: v.to(torch.bfloat16) for k, v in src_sd.items()})
    assert torch.equal(_forward(model), _forward(ref))


def _forward(model: LingBotDiT) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    cfg = model.cfg
    f, h, w = 3, 4, 4
    x = torch.randn(1, cfg.out_dim, f, h, w, generator=g)
    y = torch.randn(1, cfg.in_dim - cfg.out_dim, f, h, w, generator=g)
    plucker = torch.randn(1, cfg.camera_in_features // 4, f, h, w, generator=g)
    text = torch.randn(1, 7, cfg.text_dim, generator=g)
    with torch.no_grad():
        ctx = model.prepare_chunk(plucker, 0, None)
        return model(x, y, 999.0, model.encode_text(text), ctx)


@pytest.mark.parametrize("subfolder", [False, True])
def test_official_layout_loads_to_bf16(tmp_path, src_sd, diffusers_dir, subfolder) -> None:
    d = _official(tmp_path, src_sd, subfolder)
    with pytest.raises(WeightsError, match="LINGBOT_COMPONENTS"):
        resolve_model(str(d), env={})
    src = resolve_model(str(d), env={"LINGBOT_COMPONENTS": str(diffusers_dir)})
    assert src.layout == "official" and src.components == diffusers_dir.resolve()
    assert src.transformer_dir == (d.resolve() / "lingbot_world_fast" if subfolder else d.resolve())
    assert read_dit_config(d) == TINY.dit
    _assert_state_equal_bf16(load_dit(src, torch.bfloat16, "cpu"), src_sd)


def test_streaming_loader_any_module(tmp_path) -> None:
    """The loader is model-agnostic: meta-built module, params + persistent buffers, int tensors keep dtype."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 4)
            self.register_buffer("steps", torch.arange(3))

    src = M()
    sd = src.state_dict()
    checkpoints.write_shards(tmp_path, {"lin.weight": sd["lin.weight"], "lin.bias": sd["lin.bias"]}, 1 << 20)
    from safetensors.torch import save_file
    save_file({"steps": sd["steps"]}, str(tmp_path / "extra.safetensors"))
    with torch.device("meta"):
        m = M()
    load_state_dict_streaming(m, [tmp_path / "diffusion_pytorch_model.safetensors", tmp_path / "extra.safetensors"],
                              torch.bfloat16, "cpu")
    assert m.lin.weight.dtype == torch.bfloat16 and torch.equal(m.lin.weight, sd["lin.weight"].bfloat16())
    assert m.steps.dtype == torch.int64 and torch.equal(m.steps, sd["steps"])


# ---- errors ------------------------------------------------------------------------------------------------
def _meta_dit():
    return build_dit(TINY.dit, dtype=torch.bfloat16, seed=None)


def test_missing_tensor_names_tensor_and_shard(tmp_path, src_sd) -> None:
    d = _official(tmp_path, src_sd)
    shards = find_shards(d)
    victim = "blocks.1.self_attn.q.weight"
    shard = d / shards.weight_map[victim]
    from safetensors.torch import load_file, save_file
    content = load_file(str(shard))
    del content[victim]
    save_file(content, str(shard))
    with pytest.raises(WeightsError) as e:
        load_state_dict_streaming(_meta_dit(), find_shards(d), torch.bfloat16, "cpu")
    assert victim in str(e.value) and shard.name in str(e.value)


def test_corrupt_shard_names_file(tmp_path, src_sd) -> None:
    d = _official(tmp_path, src_sd)
    shard = find_shards(d).files[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(WeightsError, match=shard.name):
        load_state_dict_streaming(_meta_dit(), find_shards(d), torch.bfloat16, "cpu")
    shard.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(WeightsError, match=shard.name):
        load_state_dict_streaming(_meta_dit(), find_shards(d), torch.bfloat16, "cpu")


def test_shape_mismatch_names_tensor_file_and_shapes(tmp_path, src_sd) -> None:
    sd = dict(src_sd)
    sd["head.head.weight"] = torch.zeros(3, 5)
    d = _official(tmp_path, sd)
    with pytest.raises(WeightsError) as e:
        load_state_dict_streaming(_meta_dit(), find_shards(d), torch.bfloat16, "cpu")
    msg = str(e.value)
    assert "head.head.weight" in msg and "[3, 5]" in msg and str(list(src_sd["head.head.weight"].shape)) in msg
    assert find_shards(d).weight_map["head.head.weight"] in msg


def test_unexpected_tensor(tmp_path, src_sd) -> None:
    d = _official(tmp_path, {**src_sd, "blocks.9.bogus": torch.zeros(2)})
    with pytest.raises(WeightsError, match="unexpected tensor 'blocks.9.bogus'"):
        load_state_dict_streaming(_meta_dit(), find_shards(d), torch.bfloat16, "cpu")


def test_missing_shard_file(tmp_path, src_sd) -> None:
    d = _official(tmp_path, src_sd)
    gone = find_shards(d).files[-1]
    gone.unlink()
    with pytest.raises(WeightsError) as e:
        find_shards(d)
    assert gone.name in str(e.value) and INDEX_NAME in str(e.value)


# ---- resolving -----------------------------------------------------------------------------------------------
def test_preset_resolves_to_random() -> None:
    src = resolve_model("tiny", env={})
    assert src.kind == "random" and src.preset is TINY and src.path is None
    m = load_dit(src, torch.float32, "cpu")
    assert isinstance(m, LingBotDiT) and m.cfg == TINY.dit
    assert load_vae_for(src, torch.float32, "cpu").config.base_dim == TINY.vae["base_dim"]
    assert load_text_encoder_for(src, torch.float32, "cpu").d_model == TINY.text_encoder["d_model"]


def _populate_cache(cache: Path, diffusers_dir: Path) -> Path:
    snap = checkpoints.fake_hf_cache(cache, REPO)
    shutil.copytree(diffusers_dir, snap, dirs_exist_ok=True)
    return snap


def test_hf_cache_via_hf_home(tmp_path, diffusers_dir, src_sd) -> None:
    snap = _populate_cache(tmp_path / "hf" / "hub", diffusers_dir)
    src = resolve_model(REPO, env={"HF_HOME": str(tmp_path / "hf")}, runpod_cache=tmp_path / "none")
    assert src.path == snap and src.layout == "diffusers"
    _assert_state_equal_bf16(load_dit(src, torch.bfloat16, "cpu"), src_sd)
    assert read_dit_config(src.path) == TINY.dit


def test_hf_cache_via_hub_cache_without_refs(tmp_path, diffusers_dir) -> None:
    snap = _populate_cache(tmp_path / "hubcache", diffusers_dir)
    (snap.parent.parent / "refs" / "main").unlink()  # scan fallback when refs/main is absent
    src = resolve_model(REPO, env={"HF_HUB_CACHE": str(tmp_path / "hubcache")}, runpod_cache=tmp_path / "none")
    assert src.path == snap


def test_runpod_cached_model_path(tmp_path, diffusers_dir) -> None:
    rp = tmp_path / "runpod-volume" / "huggingface-cache" / "hub"
    snap = _populate_cache(rp, diffusers_dir)
    src = resolve_model(REPO, env={"HF_HOME": str(tmp_path / "empty")}, runpod_cache=rp)
    assert src.path == snap and src.layout == "diffusers"
    vae = load_vae_for(src, torch.float32, "cpu")
    te = load_text_encoder_for(src, torch.float32, "cpu")
    assert vae.config.z_dim == 16 and te.encode("hi").shape[1] == TINY.text_encoder["d_model"]


def test_mounted_volume(tmp_path, diffusers_dir) -> None:
    vol = tmp_path / "vol"
    shutil.copytree(diffusers_dir, vol / "robbyant" / "lingbot-world-fast-diffusers")
    src = resolve_model(REPO, env={"LINGBOT_MODEL_DIR": str(vol), "HF_HOME": str(tmp_path / "e")}, runpod_cache=tmp_path / "n")
    assert src.path == vol / "robbyant" / "lingbot-world-fast-diffusers"


def test_official_with_hub_components(tmp_path, src_sd, diffusers_dir) -> None:
    d = _official(tmp_path, src_sd, subfolder=True)
    _populate_cache(tmp_path / "hf" / "hub", diffusers_dir)
    src = resolve_model(str(d), env={"HF_HOME": str(tmp_path / "hf"), "LINGBOT_COMPONENTS": REPO},
                        runpod_cache=tmp_path / "none")
    assert src.layout == "official" and (src.components / "vae").is_dir()


def test_not_found_lists_places(tmp_path) -> None:
    env = {"HF_HOME": str(tmp_path / "hf"), "LINGBOT_MODEL_DIR": str(tmp_path / "vol")}
    with pytest.raises(WeightsError) as e:
        resolve_model(REPO, env=env, runpod_cache=tmp_path / "rp")
    msg = str(e.value)
    for place in (tmp_path / "hf" / "hub", tmp_path / "vol", tmp_path / "rp"):
        assert str(place) in msg
    with pytest.raises(WeightsError, match="not a preset"):
        resolve_model("no such thing!", env={})


def test_read_dit_config_both_namings(tmp_path) -> None:
    full = PRESETS["lingbot-world-fast"].dit
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps(checkpoints.official_config(full)))
    assert read_dit_config(tmp_path / "a") == full
    (tmp_path / "b" / "transformer").mkdir(parents=True)
    (tmp_path / "b" / "transformer" / "config.json").write_text(json.dumps(checkpoints.diffusers_transformer_config(full)))
    assert read_dit_config(tmp_path / "b") == full
