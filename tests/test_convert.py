"""`python -m worker convert`: a bf16 copy of a checkpoint that loads to the same weights as the original."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.checkpoints import TINY, write_tiny_checkpoint
from worker.__main__ import main
from worker.models.convert import convert_checkpoint
from worker.models.dit import build_dit
from worker.models.loading import (
    INDEX_NAME, WeightsError, detect_layout, find_shards, load_dit, load_text_encoder_for, load_vae_for, resolve_model,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    sd = build_dit(TINY.dit, device="cpu", dtype=torch.float32, seed=3).state_dict()
    return {k: v.clone() for k, v in sd.items()}


def _write(tmp_path: Path, sd, layout: str, **kw) -> Path:
    root = tmp_path / "src"
    shard = sum(t.numel() * 4 for t in sd.values()) // 3  # several shards in, a different count out
    write_tiny_checkpoint(root, layout, sd, TINY.dit, max_shard_bytes=shard, **kw)
    return root


def _same_weights(a: Path, b: Path) -> None:
    wa = load_dit(resolve_model(str(a)), dtype=torch.bfloat16).state_dict()
    wb = load_dit(resolve_model(str(b)), dtype=torch.bfloat16).state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _shard_bytes(tdir: Path) -> int:
    return sum(p.stat().st_size for p in find_shards(tdir).files)


def test_diffusers_layout(tmp_path: Path, state_dict) -> None:
    src = _write(tmp_path, state_dict, "diffusers")
    dst = convert_checkpoint(resolve_model(str(src)), tmp_path / "bf16", shard_bytes=40_000)
    assert detect_layout(dst) == ("diffusers", dst / "transformer")
    shards = find_shards(dst / "transformer")
    assert len(shards.files) > 1 and (dst / "transformer" / INDEX_NAME).is_file()
    with safe_open(str(shards.files[0]), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    ratio = _shard_bytes(dst / "transformer") / _shard_bytes(src / "transformer")
    assert 0.49 < ratio < 0.51
    _same_weights(src, dst)
    # everything else is the same files, hard-linked
    for part in ("vae", "text_encoder", "tokenizer"):
        for f in (src / part).rglob("*"):
            if f.is_file():
                assert (dst / part / f.relative_to(src / part)).stat().st_ino == f.stat().st_ino
    assert (dst / "model_index.json").read_text() == (src / "model_index.json").read_text()
    assert (dst / "transformer" / "config.json").read_text() == (src / "transformer" / "config.json").read_text()
    source = resolve_model(str(dst))
    load_vae_for(source, torch.float32, "cpu")
    load_text_encoder_for(source, torch.float32, "cpu")
    assert not (tmp_path / "bf16.partial").exists()


@pytest.mark.parametrize("subfolder", [False, True])
def test_official_layout(tmp_path: Path, state_dict, subfolder: bool) -> None:
    src = _write(tmp_path, state_dict, "official", components=False, official_subfolder=subfolder)
    dst = convert_checkpoint(_official_source(src), tmp_path / "bf16")
    layout, tdir = detect_layout(dst)
    assert layout == "official" and (tdir != dst) == subfolder
    assert (tdir / "config.json").is_file()
    comps = tmp_path / "components"
    write_tiny_checkpoint(comps, "diffusers", state_dict, TINY.dit)
    env = {"LINGBOT_COMPONENTS": str(comps)}
    a = load_dit(resolve_model(str(src), env=env), dtype=torch.bfloat16).state_dict()
    b = load_dit(resolve_model(str(dst), env=env), dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _official_source(src: Path):
    # an official folder has no components; resolving needs a components folder, which convert ignores
    comps = src.parent / "components-for-resolve"
    if not comps.exists():
        comps.mkdir()
        for part in ("vae", "text_encoder", "tokenizer"):
            (comps / part).mkdir()
    return resolve_model(str(src), env={"LINGBOT_COMPONENTS": str(comps)})


def test_refuses_to_overwrite_and_cleans_a_partial_run(tmp_path: Path, state_dict) -> None:
    src = _write(tmp_path, state_dict, "diffusers", components=False)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken"):
        convert_checkpoint(resolve_model(str(src)), tmp_path / "taken")
    with pytest.raises(WeightsError, match="random-weight preset"):
        convert_checkpoint(resolve_model("tiny"), tmp_path / "x")
    assert main(["convert", "--model", str(src), "--out", str(tmp_path / "taken")]) == 2  # said, not a traceback
    junk = tmp_path / "out.partial"
    junk.mkdir()
    (junk / "half-written.safetensors").write_bytes(b"\0" * 10)
    assert main(["convert", "--model", str(src), "--out", str(tmp_path / "out")]) == 0
    assert not junk.exists() and not (tmp_path / "out" / "half-written.safetensors").exists()
    _same_weights(src, tmp_path / "out")
    # inside the source folder: the copy does not copy itself
    inner = convert_checkpoint(resolve_model(str(src)), src / "bf16")
    assert not (inner / "bf16").exists() and not (inner / "bf16.partial").exists()
    _same_weights(src, inner)
