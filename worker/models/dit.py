"""LingBot-World Fast DiT: the causal Wan2.1-14B block stack with LingBot camera adapters.

Parameter names and shapes are the official ones (reference/official_fast_keys.txt), so a real checkpoint
loads with strict=True. The forward follows reference/fast_rollout.md section 5:

    tokens = patch_embed([noisy 16 | mask 4 | image latent 16])            (f, h, w) row-major
    e, e0  = time MLPs of the sinusoidal t embedding                        fp32, one row: every token shares t
    for each block:
        x += gate1 * self_attn(LN(x) * (1 + scale1) + shift1)              RoPE'd K/V go to the cache first
        x  = (1 + cam_scale) * x + cam_shift                                per chunk, precomputed
        x += cross_attn(norm3(x), text)                                     text K/V per prompt, precomputed
        x += gate2 * ffn(LN(x) * (1 + scale2) + shift2)
    out = head(LN(x) * (1 + scale) + shift)  ->  unpatchify to [16, F, H/8, W/8]

The residual stream stays in fp32 and the matmuls run in the weights' dtype (bf16), as under the official
autocast. A block's last line is deferred (LINGBOT_GATED_NORM, on by default): the next block, or the head, adds
gate2 * ffn in its first norm's kernel (Block.forward). Work that does not change inside a chunk (RoPE tables,
camera modulation, cache slots) is built once by `prepare_chunk`, and a frame's camera modulation once per distinct
camera condition (camera_memo.py); work that does not change inside a job (text K/V, time embeddings) once per job.
With sequence parallelism every rank runs the blocks on its share of the tokens (see worker/parallel/sp.py).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from worker.config import DiTConfig
from worker.models.attention import attention
from worker.models.camera_memo import CameraMemo, memo_budget_setting
from worker.models.fused import (
    attn_residual_camera_norm3,
    gated_residual,
    gated_residual_modulated_norm,
    linear_gelu,
    modulated_norm,
    residual_modulated_norm,
    rms_norm,
)
from worker.models.fp8 import shared_input
from worker.models.kv_cache import KVCache
from worker.models.qk_norm_rope import qk_norm_rope
from worker.parallel.sp import SINGLE, SequenceParallel, consecutive_slices
from worker.transfer import to_device


def gated_norm_setting(env=os.environ) -> bool:
    """LINGBOT_GATED_NORM (default 1): each block's FFN residual is added by the next block's first norm (or the
    head's), in one kernel (fused.gated_residual_modulated_norm): one pass over the fp32 residual stream less per
    block boundary (~96 MB at 4680 tokens on one GPU; docs/PERFORMANCE.md v28). 0 adds it at the block's end, for
    A/B runs. Read when the model is built, so a spawned rank sees the environment it is given."""
    value = env.get("LINGBOT_GATED_NORM", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"LINGBOT_GATED_NORM={value!r}: must be 0 or 1")
    return value == "1"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def layer_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None):
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[cos(t w_k), sin(t w_k)], w_k = 10000^(-k/half), in float64 like the official code."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    arg = t.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


def rope_tables(cfg: DiTConfig, start_frame: int, grid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [L, head_dim/2] for tokens (f, h, w) at absolute latent frame start_frame + f.

    The head dim is rotated in consecutive channel pairs; the pairs are split (t, h, w) = [22, 21, 21]. Built in
    float64 on `device`: on the host the tables cost each rank tens of milliseconds per chunk with the GPU waiting.
    """
    f, h, w = grid
    if start_frame + f > cfg.rope_max_positions:
        raise ValueError(
            f"latent frame {start_frame + f} is past the RoPE table ({cfg.rope_max_positions} frames)"
        )
    f64 = {"dtype": torch.float64, "device": device}
    angles = []
    for n_ch, (first, count) in zip(cfg.rope_split, ((start_frame, f), (0, h), (0, w))):
        inv = 1.0 / torch.pow(cfg.rope_theta, torch.arange(0, n_ch, 2, **f64) / n_ch)
        angles.append(torch.arange(first, first + count, **f64)[:, None] * inv[None])
    at, ah, aw = angles
    full = torch.cat(
        [
            at[:, None, None, :].expand(f, h, w, -1),
            ah[None, :, None, :].expand(f, h, w, -1),
            aw[None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, -1)
    return torch.cos(full).float(), torch.sin(full).float()


# --- per-job and per-chunk context --------------------------------------------------------------------------
@dataclass
class ChunkContext:
    grid: tuple[int, int, int]  # latent (F, h, w) after patching
    start_frame: int
    num_tokens: int  # all of the chunk's tokens, every rank's
    cos: torch.Tensor  # RoPE tables [this rank's tokens, head_dim / 2]
    sin: torch.Tensor
    cam_scale: list[torch.Tensor]  # per block, this rank's tokens [B, Ls, dim]
    cam_shift: list[torch.Tensor]
    cache: KVCache | None
    attn_mask: torch.Tensor | None = None


# A block's FFN residual (ffn output, gate2) not yet added to the residual stream (LINGBOT_GATED_NORM), or None.
Pending = tuple[torch.Tensor, torch.Tensor] | None


# --- blocks -------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """q, k, v, o projections with RMSNorm on q and k over the full model dim (official names)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q = RMSNorm(d, cfg.eps)
        self.norm_k = RMSNorm(d, cfg.eps)


class SelfAttention(Attention):
    def forward(
        self, x: torch.Tensor, ctx: ChunkContext, layer: int, sp: SequenceParallel, cache_only: bool = False
    ) -> torch.Tensor | None:
        b, s, _ = x.shape
        hd = (self.num_heads, self.head_dim)
        x = shared_input(x, self.q)  # FP8 linears: quantised once for q, k and v
        norm_rope = functools.partial(qk_norm_rope, cos=ctx.cos, sin=ctx.sin)
        slots = ctx.cache.chunk_slots(layer) if ctx.cache is not None else None
        if not sp.enabled:
            # RMSNorm (across all heads) and RoPE in one pass over q and over k; k and v written straight into the
            # chunk's cache slots where they are one run of slots (else copied there by cache.write).
            groups = (self.num_heads,)
            q = None if cache_only else norm_rope(self.q(x), self.norm_q.weight, self.norm_q.eps,
                                                  groups=groups).view(b, s, *hd)
            k = norm_rope(self.k(x), self.norm_k.weight, self.norm_k.eps, groups=groups,
                          out=slots[0] if slots else None).view(b, s, *hd)
            if slots:
                if isinstance(self.v, nn.Linear):
                    torch.addmm(self.v.bias, x.reshape(b * s, -1), self.v.weight.t(), out=slots[1].view(b * s, -1))
                else:  # FP8 linears
                    slots[1].copy_(self.v(x).view_as(slots[1]))
                k, v = ctx.cache.visible(layer)
            else:
                v = self.v(x).view(b, s, *hd)
                if ctx.cache is not None:
                    k, v = ctx.cache.write(layer, k, v)
        else:
            # Each rank norms and rotates its own tokens (the norm needs every head, which only the sender has),
            # writing q and k in the exchange's send layout; v's projection writes it per head group. q's
            # exchange runs while k and v are projected. K and V arrive straight in this chunk's cache slots.
            groups = sp.split_heads(self.num_heads)
            shape = (b, s, *hd)
            q = (lambda: None) if cache_only else sp.seq_to_heads_async(
                norm_rope(self.q(x), self.norm_q.weight, self.norm_q.eps, groups=groups), shape, ctx.num_tokens,
                tag="q")
            k = norm_rope(self.k(x), self.norm_k.weight, self.norm_k.eps, groups=groups)
            k = sp.seq_to_heads_async(k, shape, ctx.num_tokens, out=slots[0] if slots else None, tag="k")
            v_out = slots[1] if slots else None
            v = sp.linear_to_heads_async(x, self.v.weight, self.v.bias, self.num_heads, ctx.num_tokens, out=v_out,
                                         tag="v") if isinstance(self.v, nn.Linear) else None
            if v is None:
                v = sp.seq_to_heads_async(_linear_head_groups(self.v, x, sp, self.head_dim), shape, ctx.num_tokens,
                                          out=v_out, tag="v")
            q, k, v = q(), k(), v()
            if ctx.cache is not None:
                k, v = ctx.cache.visible(layer) if slots else ctx.cache.write(layer, k, v)
        if cache_only:  # the refresh's last block: its K/V are all a later chunk reads (q was never projected)
            return None
        # One rank's whole set of heads is where filling FA4's last wave was measured to pay (wave_split.py).
        out = attention(q, k, v, ctx.attn_mask, wave_split=not sp.enabled)
        return _linear_from_head_groups(self.o, sp.heads_to_seq_ordered(out, self.num_heads), self.head_dim,
                                        sp.split_heads(self.num_heads))


def _linear_head_groups(linear: nn.Module, x: torch.Tensor, sp: SequenceParallel, head_dim: int) -> torch.Tensor:
    """linear(x) for [B, s, dim] -> [B, s, H*D], written flat in the exchange's send layout: one GEMM per head
    group, each writing its own contiguous block, instead of one GEMM and a strided copy."""
    if not isinstance(linear, nn.Linear):  # FP8 linears: project, then pack
        return sp.pack_heads(linear(x).unflatten(-1, (-1, head_dim)))
    groups = sp.split_heads(linear.out_features // head_dim)
    x2 = x.reshape(-1, x.shape[-1])
    send = x.new_empty(x2.shape[0] * sum(groups) * head_dim)
    offset = 0
    for hs in consecutive_slices(groups):
        rows = slice(hs.start * head_dim, hs.stop * head_dim)
        n = x2.shape[0] * (rows.stop - rows.start)
        block = send[offset : offset + n].view(x2.shape[0], -1)
        torch.addmm(linear.bias[rows], x2, linear.weight[rows].t(), out=block)
        offset += n
    return send


def _linear_from_head_groups(linear: nn.Module, parts: Iterable[tuple[int, torch.Tensor]], head_dim: int,
                             heads: Sequence[int]) -> torch.Tensor:
    """linear(concat of the head groups [B, s, h_j, D]) as split-K GEMMs over the groups (j, part) in the order
    they come (sp.heads_to_seq_ordered), accumulating in place: no copy back into one [B, s, H, D] tensor."""
    if len(heads) == 1:  # one rank
        ((_, part),) = parts
        return linear(part.flatten(-2))
    if not isinstance(linear, nn.Linear):  # FP8 linears
        return linear(torch.cat([p for _, p in sorted(parts, key=lambda jp: jp[0])], dim=-2).flatten(-2))
    starts = [0, *itertools.accumulate(heads)]
    y = None
    for j, part in parts:
        *lead, s, _, _ = part.shape
        w = linear.weight[:, starts[j] * head_dim : starts[j + 1] * head_dim].t()
        part = part.reshape(-1, w.shape[0])
        y = torch.addmm(linear.bias, part, w) if y is None else y.addmm_(part, w)
    return y.view(*lead, s, -1)


class CrossAttention(Attention):
    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = context.shape
        k = self.norm_k(self.k(context)).view(b, n, self.num_heads, self.head_dim)
        v = self.v(context).view(b, n, self.num_heads, self.head_dim)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, s, self.num_heads, self.head_dim)
        return self.o(attention(q, *kv).flatten(2))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.zeros(1, 6, d))
        self.self_attn = SelfAttention(cfg)
        self.cross_attn = CrossAttention(cfg)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=True)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.cam_injector_layer1 = nn.Linear(d, d)
        self.cam_injector_layer2 = nn.Linear(d, d)
        self.cam_scale_layer = nn.Linear(d, d)
        self.cam_shift_layer = nn.Linear(d, d)

    def camera_modulation(self, cam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.cam_injector_layer2(F.silu(self.cam_injector_layer1(cam))) + cam
        return self.cam_scale_layer(h), self.cam_shift_layer(h)

    def forward(
        self,
        x: torch.Tensor,  # fp32 residual stream [B, Ls, dim]
        pending: Pending,
        e0: torch.Tensor,  # fp32 [B, 6, dim]
        text_kv: tuple[torch.Tensor, torch.Tensor],
        ctx: ChunkContext,
        layer: int,
        sp: SequenceParallel,
        cache_only: bool = False,
        defer: bool = False,
    ) -> tuple[torch.Tensor, Pending]:
        """(x, pending) for the next block. pending: the previous block's FFN residual, not yet in x; it is added
        here by the kernel of the first norm. defer: hand this block's own FFN residual on the same way instead
        of adding it (LINGBOT_GATED_NORM). With cache_only only the K/V are written (the model's last block)."""
        wdt = self.modulation.dtype
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).unsqueeze(2).unbind(1)
        if pending is None:
            h = modulated_norm(x, shift1, scale1, self.eps, wdt)
        else:
            x, h = gated_residual_modulated_norm(x, *pending, shift1, scale1, self.eps, wdt)
        attn = self.self_attn(h, ctx, layer, sp, cache_only)
        if cache_only:
            return x, None
        # Camera: the per-chunk scale/shift were computed once in prepare_chunk.
        x, h = attn_residual_camera_norm3(x, attn, gate1, ctx.cam_scale[layer], ctx.cam_shift[layer],
                                          self.norm3.weight, self.norm3.bias, self.eps, wdt)
        x, h = residual_modulated_norm(x, self.cross_attn(h, text_kv), shift2, scale2, self.eps, wdt)
        ffn = self.ffn[2](linear_gelu(self.ffn[0], h))
        if defer:
            return x, (ffn, gate2)
        return gated_residual(x, ffn, gate2), None


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)

    def forward(self, x: torch.Tensor, e: torch.Tensor, pending: Pending = None) -> torch.Tensor:
        """pending: the last block's deferred FFN residual (Block.forward), added by the norm's kernel."""
        shift, scale = (self.modulation.float() + e[:, None]).unsqueeze(2).unbind(1)
        if pending is None:
            h = (layer_norm(x, self.eps) * (1 + scale) + shift).to(self.head.weight.dtype)
        else:
            # Writes the finished x too, which nothing reads: one kernel for both uses rather than a second graph.
            _, h = gated_residual_modulated_norm(x, *pending, shift, scale, self.eps, self.head.weight.dtype)
        return self.head(h).float()


# --- the model ----------------------------------------------------------------------------------------------
class LingBotDiT(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.patch_embedding_wancamctrl = nn.Linear(cfg.camera_in_features, d)
        self.c2ws_hidden_states_layer1 = nn.Linear(d, d)
        self.c2ws_hidden_states_layer2 = nn.Linear(d, d)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.gated_norm = gated_norm_setting()
        self.camera_memo = CameraMemo(memo_budget_setting())

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def init_random(self, seed: int = 0) -> "LingBotDiT":
        """Deterministic random weights, drawn on the model's device (a 14B init on the CPU takes minutes).

        Scaled 1/sqrt(fan_in) so activations stay O(1); the camera scale/shift get a tenth of that so forty
        multiplicative camera modulations do not overflow bf16. Benchmarks only need realistic magnitudes.
        """
        g = torch.Generator(device=self.device).manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif p.dim() == 1:  # norm weights
                    p.fill_(1.0)
                else:
                    fan_in = p.shape[-1] if name.endswith("modulation") else p[0].numel()
                    std = fan_in**-0.5 * (0.1 if ("cam_scale" in name or "cam_shift" in name) else 1.0)
                    p.normal_(0.0, std, generator=g)
        return self

    # --- per-job work ---------------------------------------------------------------------------------------
    def encode_text(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Text K/V of every block, computed once per prompt.

        context: [B, n, text_dim] (real tokens only). Zero-padded to text_len like the official model, and the
        pads are attended (the official cross-attention has no mask).
        """
        b, n, _ = context.shape
        if n > self.cfg.text_len:
            raise ValueError(f"prompt has {n} tokens, more than text_len={self.cfg.text_len}")
        padded = context.new_zeros(b, self.cfg.text_len, self.cfg.text_dim)
        padded[:, :n] = context
        emb = self.text_embedding(padded.to(self.dtype))
        return [blk.cross_attn.text_kv(emb) for blk in self.blocks]

    def time_embedding_for(self, t: float, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(e, e0) in fp32. Every token shares t, so one row stands for all of them."""
        tt = torch.full((batch,), float(t), device=self.device)
        sin = sinusoidal_embedding(self.cfg.freq_dim, tt).float()
        l0, l2 = self.time_embedding[0], self.time_embedding[2]
        e = F.linear(F.silu(F.linear(sin, l0.weight.float(), l0.bias.float())), l2.weight.float(), l2.bias.float())
        lp = self.time_projection[1]
        e0 = F.linear(F.silu(e), lp.weight.float(), lp.bias.float()).unflatten(1, (6, self.cfg.dim))
        return e, e0

    # --- per-chunk work -------------------------------------------------------------------------------------
    def camera_tokens(self, plucker: torch.Tensor) -> torch.Tensor:
        """[B, 384, F, H/8, W/8] -> [B, L, 1536]: the 1x2x2 patch, channel-major like the official einops."""
        b, c, f, h, w = plucker.shape
        pt, ph, pw = self.cfg.patch_size
        x = plucker.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # b, f, h, w, c, pt, ph, pw
        return x.reshape(b, (f // pt) * (h // ph) * (w // pw), c * pt * ph * pw)

    def prepare_chunk(
        self,
        plucker: torch.Tensor,
        start_frame: int,
        cache: KVCache | None,
        sp: SequenceParallel = SINGLE,
        attn_mask: torch.Tensor | None = None,
        frame_keys: Sequence[bytes] | None = None,
    ) -> ChunkContext:
        """Everything a chunk's five forwards share: RoPE tables, cache slots and the camera modulation.

        frame_keys: one key per latent frame of `plucker`, equal for equal frames (camera.CameraChunk); with them, a
        frame whose condition the memo holds reuses its modulation instead of computing it again."""
        _, _, f, h, w = plucker.shape
        pt, ph, pw = self.cfg.patch_size
        grid = (f // pt, h // ph, w // pw)
        n = math.prod(grid)
        # This rank's tokens only: each rank rotates its own q and k before the exchange. In their own storage: a
        # view at an offset would make the fused kernels recompile for the CUDA graphs' fixed copies of these
        # tables (worker/models/chunk_graphs.py), which have none.
        cos, sin = (sp.shard(t, dim=0).clone() for t in rope_tables(self.cfg, start_frame, grid, self.device))
        if cache is not None:
            cache.begin_chunk(start_frame, grid[0])
        tokens = self.camera_tokens(to_device(plucker, self.device, self.dtype))
        if frame_keys is not None and self.camera_memo.enabled:
            per_frame = n // grid[0]
            scales, shifts = self.camera_memo.modulation(
                frame_keys, per_frame, sp.token_span(n),
                rows=lambda j, lo, hi: tokens[:, j * per_frame + lo : j * per_frame + hi],
                compute=self.camera_modulation_of, device=self.device,
                row_bytes=2 * len(self.blocks) * self.cfg.dim * self.dtype.itemsize)
        else:
            scales, shifts = self.camera_modulation_of(sp.shard(tokens))
        return ChunkContext(grid, start_frame, n, cos, sin, scales, shifts, cache, attn_mask)

    def camera_modulation_of(self, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per block, the camera scale and shift [B, L, dim] of camera tokens [B, L, 1536]."""
        p = self.patch_embedding_wancamctrl(tokens)
        cam = p + self.c2ws_hidden_states_layer2(F.silu(self.c2ws_hidden_states_layer1(p)))
        scales, shifts = zip(*(blk.camera_modulation(cam) for blk in self.blocks)) if self.blocks else ((), ())
        return list(scales), list(shifts)

    # --- the forward --------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,  # [B, 16, F, H/8, W/8] noisy latents
        y: torch.Tensor,  # [B, 20, F, H/8, W/8] mask + image latents
        t: float,
        text_kv: list[tuple[torch.Tensor, torch.Tensor]],
        ctx: ChunkContext,
        sp: SequenceParallel = SINGLE,
        cache_only: bool = False,
        time_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """Flow prediction [B, 16, F, H/8, W/8] in fp32; with cache_only, fill the K/V cache and stop."""
        b = x.shape[0]
        tokens = self.patch_embedding(torch.cat([x, y], dim=1).to(self.dtype))
        tokens = tokens.flatten(2).transpose(1, 2)  # [B, L, dim], (f, h, w) row-major
        h = sp.shard(tokens).float()
        e, e0 = time_emb if time_emb is not None else self.time_embedding_for(t, b)
        last = len(self.blocks) - 1
        pending = None
        for i, blk in enumerate(self.blocks):
            h, pending = blk(h, pending, e0, text_kv[i], ctx, i, sp, cache_only=cache_only and i == last,
                             defer=self.gated_norm)
        if cache_only:
            return None
        out = sp.gather(self.head(h, e, pending), ctx.num_tokens)
        return self.unpatchify(out, ctx.grid)

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """'f h w (p q r c) -> c (f p) (h q) (w r)' with c = out_dim last inside the 64."""
        b = out.shape[0]
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.out_dim
        x = out.reshape(b, f, h, w, pt, ph, pw, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, c, f * pt, h * ph, w * pw)


def build_dit(cfg: DiTConfig, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
              seed: int | None = 0) -> LingBotDiT:
    """A DiT with random weights drawn on `device` (seed), or left on `meta` for the loader (seed=None)."""
    with torch.device("meta"):
        model = LingBotDiT(cfg).to(dtype)
    if seed is None:
        return model
    model = model.to_empty(device=device).init_random(seed)
    return model.eval().requires_grad_(False)
