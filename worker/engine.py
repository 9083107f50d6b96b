"""The warm model: DiT and VAE on every rank; text encoder on the leader. One job at a time.

`Engine.load` resolves a model spec (preset, folder or hub id from the local caches), loads the parts this
rank needs and keeps them resident. `Engine.rollout` runs one job and yields decoded chunks.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from worker.config import PRESETS, ModelPreset
from worker.models import chunk_graphs
from worker.models.loading import ModelSource, load_dit, load_text_encoder_for, load_vae_for, resolve_model
from worker.models.prewarm import Prewarm
from worker.models.prewarm import exclusive as prewarm_exclusive
from worker.models.vae import StreamingVAE
from worker.parallel.sp import SINGLE, SequenceParallel
from worker.parallel.sp import decode_split as sp_decode_split
from worker.rollout import ChunkOutput, RolloutJob, rollout
from worker.rollout import decode_priority as rollout_decode_priority

log = logging.getLogger("worker.engine")

DEFAULT_MODEL = "robbyant/lingbot-world-fast-diffusers"
FALLBACK_MODEL = "tiny"

NOISE_WARNING = """
################################################################################################
#  NO REAL WEIGHTS: running the '{name}' preset with RANDOM weights. The video will be noise.   #
#  Point LINGBOT_MODEL (or --model) at a LingBot-World Fast folder or a cached hub id.          #
################################################################################################"""


def default_device() -> str:
    return os.environ.get("LINGBOT_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def offload_text_encoder(dev: torch.device, sp: SequenceParallel, env=os.environ) -> bool:
    """Move UMT5 (11 GB bf16) to host RAM between prompts when one GPU must also hold the 37 GB DiT and the KV span.

    At 832x480, window 15 + sink 3, one rank peaks at ~66 GiB without the encoder (docs/PERFORMANCE.md): with it
    an 80 GB GPU has no headroom. LINGBOT_OFFLOAD_TEXT_ENCODER=1/0 forces the choice.
    """
    forced = env.get("LINGBOT_OFFLOAD_TEXT_ENCODER")
    if forced in ("0", "1"):
        return forced == "1"
    if dev.type != "cuda" or sp.world > 1:
        return False
    return torch.cuda.get_device_properties(dev).total_memory < 100 * 2**30


@contextlib.contextmanager
def _load_logged(part: str, source: ModelSource, sp: SequenceParallel) -> Iterator[None]:
    """Log how long loading `part` took on this rank: what a cold start spends where (docs/PERFORMANCE.md v21c)."""
    t = time.perf_counter()
    yield
    origin = "built with random weights" if source.kind == "random" else f"loaded from {source.path}"
    log.info("%s%s %s in %.1f s", f"rank {sp.rank}: " if sp.enabled else "", part, origin, time.perf_counter() - t)


def resolve_with_fallback(spec: str | None) -> ModelSource:
    """An explicit spec must resolve; with none configured, try the real model and fall back to tiny."""
    spec = spec or os.environ.get("LINGBOT_MODEL")
    if spec:
        return resolve_model(spec)
    try:
        return resolve_model(DEFAULT_MODEL)
    except Exception as exc:  # noqa: BLE001 - any failure to find weights means "not configured"
        log.info("default model not found locally (%s); using the %s preset", exc, FALLBACK_MODEL)
        return resolve_model(FALLBACK_MODEL)


@dataclass
class EngineInfo:
    name: str
    random_weights: bool
    device: str
    ranks: int


class Engine:
    def __init__(
        self,
        *,
        source: ModelSource,
        dit: torch.nn.Module,
        vae: StreamingVAE | None,
        text_encoder,
        device: torch.device,
        sp: SequenceParallel = SINGLE,
    ) -> None:
        self.source, self.dit, self.vae, self.text_encoder = source, dit, vae, text_encoder
        self.device, self.sp = device, sp
        self.ranks_in_sync = True
        self.cuda_graphs: str | None = None  # None: LINGBOT_CUDA_GRAPHS, read per job (configure)
        self.warm_graphs = None  # chunk_graphs.JobGraphs kept across jobs under LINGBOT_CUDA_GRAPHS=warm
        self.decode_priority: str | None = None  # None: LINGBOT_DECODE_PRIORITY (rollout.decode_priority)
        self.decode_split: str | None = None  # None: LINGBOT_DECODE_SPLIT (sp.decode_split)
        self._lock = threading.Lock()  # the VAE stream and the KV cache are per job: one job at a time
        self._fixed_context: torch.Tensor | None = None

    def configure(self, *, cuda_graphs: str | None = None, leader_share: float | None = None,
                  decode_priority: str | None = None, decode_split: str | None = None) -> None:
        """Settings that may change between jobs (None keeps one): the CUDA-graph mode (worker/models/
        chunk_graphs.py) instead of LINGBOT_CUDA_GRAPHS, the leader's share of the tokens (worker/parallel/
        sp.py; every rank of a pool must take the same, RankPool.configure), who decodes (sp.decode_split, the
        same on every rank) instead of LINGBOT_DECODE_SPLIT, and the leader's decode stream priority
        (rollout.decode_priority) instead of LINGBOT_DECODE_PRIORITY. Benchmarks compare settings in one process
        with it."""
        if decode_priority is not None:
            self.decode_priority = rollout_decode_priority(decode_priority)
        if decode_split is not None:
            self.decode_split = sp_decode_split(decode_split)
        if cuda_graphs is not None:
            self.cuda_graphs = chunk_graphs.check_mode(cuda_graphs, "cuda_graphs")
            if not chunk_graphs.keeps_graphs(self.graph_mode):
                self.warm_graphs = None  # kept graphs and their cache: no job of this mode uses them
        if leader_share is not None:
            self.sp = replace(self.sp, leader_share=leader_share)

    @property
    def graph_mode(self) -> str:
        """The CUDA-graph mode the next job runs under (chunk_graphs.resolve: `auto` made concrete)."""
        return chunk_graphs.resolve(self.cuda_graphs, self.device, self.sp)

    # --- construction -----------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: str | None = None,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        sp: SequenceParallel = SINGLE,
        text_encoder: bool = True,
        seed: int = 0,
        fp8: bool | None = None,
    ) -> "Engine":
        source = resolve_with_fallback(model)
        dev = torch.device(device or default_device())
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", sp.rank if sp.enabled else torch.cuda.current_device())
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dtype = dtype or torch.bfloat16
        if source.kind == "random":
            log.warning(NOISE_WARNING.format(name=source.preset.name))
        # With a kernel cache folder, Dynamo traces the fused chains a previous process compiled while this one
        # waits on the disk (prewarm.enabled); a no-op otherwise.
        prewarm = Prewarm(dev, sp.rank, sp.world)
        with _load_logged("DiT", source, sp):
            dit = load_dit(source, dtype=dtype, device=dev, seed=seed)
        if fp8 if fp8 is not None else os.environ.get("LINGBOT_FP8") == "1":
            from worker.models.fp8 import convert_blocks_to_fp8

            log.warning("FP8 linears in the DiT blocks (%d swapped): ~11-13%% less time per chunk, 17 GiB less "
                        "weight memory, ~4%% latent error against bf16 (random weights)", convert_blocks_to_fp8(dit))
        # Every rank holds the VAE (0.25 GB in bf16): the leader encodes the image condition, and every rank
        # decodes its band of the frames (sp.decode_split).
        vae_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        with _load_logged("VAE", source, sp), prewarm_exclusive():  # from_pretrained sets the default dtype
            vae = StreamingVAE(load_vae_for(source, vae_dtype, dev))
        enc = None
        if sp.is_leader and text_encoder:
            with _load_logged("text encoder", source, sp):
                enc = load_text_encoder_for(source, dtype if dev.type == "cuda" else torch.float32, dev,
                                            build_lock=prewarm_exclusive(), offload=offload_text_encoder(dev, sp))
        prewarm.join()
        engine = cls(source=source, dit=dit, vae=vae, text_encoder=enc, device=dev, sp=sp)
        if sp.is_leader and not text_encoder:
            # Benchmarks skip the 11 GB encoder: a fixed random context with a typical prompt length.
            g = torch.Generator().manual_seed(seed)
            engine._fixed_context = torch.randn(120, dit.cfg.text_dim, generator=g)
        return engine

    @property
    def preset(self) -> ModelPreset:
        return self.source.preset or PRESETS["lingbot-world-fast"]

    @property
    def info(self) -> EngineInfo:
        name = self.source.preset.name if self.source.kind == "random" else str(self.source.path)
        return EngineInfo(name, self.source.kind == "random", str(self.device), self.sp.world)

    # --- the pieces the rollout asks the leader for ----------------------------------------------------
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        if self.text_encoder is None:
            return self._fixed_context
        return self.text_encoder.encode(prompt).float()

    def condition_stream(self, image: torch.Tensor, num_chunks: int) -> Iterator[torch.Tensor]:
        self.vae.start_condition(image)
        for _ in range(num_chunks):
            yield self.vae.next_condition_chunk()

    def decoder(self, rows: tuple[int, int] | None = None) -> StreamingVAE:
        """The VAE with a new decode stream started, for whole frames or for output rows [a, b) only."""
        self.vae.start_decode()
        self.vae.rows = rows
        return self.vae

    # --- a job ----------------------------------------------------------------------------------------------
    def free_memory(self) -> None:
        """After an out-of-memory job: what this process keeps on its GPU between jobs beyond the weights (the
        camera memo, worker/models/camera_memo.py, and the allocator's free blocks) goes back."""
        self.dit.camera_memo.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def rollout(self, job: RolloutJob) -> Iterator[ChunkOutput]:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("engine is busy with another job")
        try:
            yield from rollout(self, job)
        finally:
            if self.vae is not None:
                self.vae.reset()
            self._lock.release()
