"""A bf16 copy of a checkpoint's DiT, written once, so that every cold start reads half the bytes.

The published DiT is 74.2 GB of fp32 safetensors; the worker casts every tensor to bf16 as it loads them, and a
cold start spends ~41 s reading them at the ~1.8 GB/s a lent machine's disk gives (docs/PERFORMANCE.md, v21c).
The copy holds exactly what the loader would have made of them (fp32 -> bf16 rounds to nearest even on the CPU
and on the GPU alike), so a worker serving it computes the same bits from 37 GB.

The copy keeps the source's layout and tensor names: in the diffusers layout transformer/ is rewritten and every
other entry (vae/, text_encoder/, tokenizer/, model_index.json, ...) is hard-linked, or copied where links cannot
be made; in the official layout the shards and config.json are rewritten. It is written under `<dst>.partial`
and renamed when complete, so an interrupted run never looks like a model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from worker.models.loading import INDEX_NAME, SINGLE_NAME, ModelSource, WeightsError, find_shards

SHARD_BYTES = 5 * 10**9


def convert_checkpoint(source: ModelSource, dst: str | Path, dtype: torch.dtype = torch.bfloat16,
                       shard_bytes: int = SHARD_BYTES) -> Path:
    """Write `source` (a local checkpoint) to `dst` with its DiT's floating tensors in `dtype`. Returns dst."""
    from safetensors import safe_open

    if source.kind != "local":
        raise WeightsError(f"model {source.spec!r} is a random-weight preset: there is nothing to convert")
    dst = Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst} already exists: convert writes a new folder and never overwrites one")
    tmp = dst.with_name(dst.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # a previous run that did not finish
    tdir_rel = source.transformer_dir.relative_to(source.path)
    out_tdir = tmp / tdir_rel
    out_tdir.mkdir(parents=True)

    shards = find_shards(source.transformer_dir)
    out = ShardWriter(out_tdir, shard_bytes)
    for path in shards.files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                out.add(key, t.to(dtype) if t.is_floating_point() else t)
    out.close()

    shard_names = {p.name for p in shards.files} | {INDEX_NAME, SINGLE_NAME}
    for entry in source.path.iterdir():  # everything but the DiT's shards: components, configs, model_index.json
        if entry.name in shard_names or entry.resolve() in (source.transformer_dir.resolve(), tmp.resolve()):
            continue  # the copy itself, when it is written inside the source folder
        _link_tree(entry, tmp / entry.name)
    if source.transformer_dir != source.path:
        for entry in source.transformer_dir.iterdir():  # config.json and anything else beside the shards
            if entry.name not in shard_names:
                _link_tree(entry, out_tdir / entry.name)
    tmp.rename(dst)
    return dst


class ShardWriter:
    """Tensors in, one at a time; safetensors shards of at most `shard_bytes` out, named and indexed as the
    diffusers repos name them (the shard count is in every name, so the shards are renamed once it is known)."""

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES) -> None:
        self.folder, self.shard_bytes = Path(folder), shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + nbytes > self.shard_bytes:
            self._flush()
        self._pending[name] = t.detach().contiguous().cpu()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if self._pending:
            name = f"part-{len(self._written):05d}.safetensors"
            save_file(self._pending, str(self.folder / name), metadata={"format": "pt"})
            self._written.append((name, list(self._pending)))
            self._pending, self._pending_bytes = {}, 0

    def close(self) -> int:
        """Write what is left, name the shards and write the index; returns the shard count."""
        self._flush()
        weight_map = {}
        for i, (name, keys) in enumerate(self._written, 1):
            final = f"diffusion_pytorch_model-{i:05d}-of-{len(self._written):05d}.safetensors"
            (self.folder / name).rename(self.folder / final)
            weight_map.update(dict.fromkeys(keys, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return len(self._written)


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link src (a file or a folder, recursively) to dst; copy where a link cannot be made (another
    filesystem, or one without links)."""
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for child in src.iterdir():
            _link_tree(child, dst / child.name)
        return
    try:
        os.link(src.resolve(), dst)  # resolve: HF cache snapshots are symlinks into blobs/
    except OSError:
        shutil.copy2(src, dst)
