"""UMT5-XXL text encoder (transformers.UMT5EncoderModel) with official Wan prompt handling and a small prompt cache.

Official semantics (wan/modules/t5.py): clean whitespace, tokenize with padding to max_length=text_len (512) and
truncation, run the encoder with the attention mask, return the hidden states trimmed to the real token count
(incl. </s>). The DiT zero-pads back to text_len itself.
"""

from __future__ import annotations

import contextlib
import html
import logging
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from worker.config import DiTConfig
from worker.models.host_weights import HostWeights, TiedWeightsDiffer
from worker.models.loading import find_shards

log = logging.getLogger("worker.text_encoder")

TEXT_LEN = DiTConfig().text_len  # tokens the encoder pads to (official text_len)


def clean_prompt(text: str) -> str:
    """Official 'whitespace' clean: html-unescape (twice, as Wan's basic_clean), collapse whitespace, strip.

    Wan also runs ftfy.fix_text; we use it when installed (it only repairs mojibake).
    """
    try:
        import ftfy  # type: ignore

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    """Prompt -> [n_tokens, d_model] embeddings, with an LRU cache (CPU) of recent prompts.

    With `offload` the weights live in host RAM (`HostWeights`) and are lent to `device` for each prompt the
    cache misses: an upload of 11.4 GB at full size, and nothing copied back. `host_weights`: the model's weights
    already packed there (load_text_encoder reads them from the files straight into the buffer); implies offload.
    """

    def __init__(
        self,
        model: UMT5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        device: str | torch.device | None = None,
        text_len: int = TEXT_LEN,
        cache_size: int = 16,
        offload: bool = False,
        host_weights: HostWeights | None = None,
    ) -> None:
        offload = offload or host_weights is not None
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if not offload:  # offloaded, the weights stay in host RAM, where HostWeights packs them
            self.model.to(self.device)
        self.text_len = text_len
        self.cache_size = cache_size
        self.host_weights = host_weights or (HostWeights(self.model) if offload else None)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def d_model(self) -> int:
        return self.model.config.d_model

    @property
    def offloaded(self) -> bool:
        return self.host_weights is not None

    # ---- encoding ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _run(self, text: str) -> torch.Tensor:
        batch = self.tokenizer(
            [text], padding="max_length", truncation=True, max_length=self.text_len,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        if self.host_weights is None:
            return self._forward(ids, mask)
        t = time.perf_counter()
        with self.host_weights.lent(self.device) as upload_s:
            out = self._forward(ids, mask)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the copy's 11 GB back to the driver, not kept as one cached block
        log.info("prompt encoded with the host-resident encoder in %.2f s (%.2f s of it the %.1f GB upload)",
                 time.perf_counter() - t, upload_s, self.host_weights.nbytes / 1e9)
        return out

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state[0]
        return hidden[: int(mask[0].sum())]

    def encode(self, prompt: str) -> torch.Tensor:
        """[n_tokens, d_model] in the encoder's dtype, on `self.device`; n_tokens <= text_len (trimmed)."""
        key = clean_prompt(prompt)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit.to(self.device)
            self.misses += 1
            out = self._run(key)
            if self.cache_size > 0:
                self._cache[key] = out.to("cpu")  # cached copy in host RAM: small (n x d_model)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return out

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()


def build_text_encoder(
    kwargs: dict, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0, *,
    build_lock: contextlib.AbstractContextManager | None = None, **enc_kw
) -> TextEncoder:
    """Random-init UMT5 encoder from UMT5Config kwargs (a preset's `text_encoder`) + the in-code tiny tokenizer."""
    from worker.models.tokenizer_tiny import build_tiny_tokenizer

    cfg = UMT5Config(**kwargs)
    with build_lock or contextlib.nullcontext(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(cfg).to(dtype=dtype)
    tok = build_tiny_tokenizer(cfg.vocab_size, model_max_length=enc_kw.get("text_len", TEXT_LEN))
    return TextEncoder(model, tok, device=device, **enc_kw)


def load_text_encoder(
    folder: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", *,
    build_lock: contextlib.AbstractContextManager | None = None, **enc_kw
) -> TextEncoder:
    """Load `folder/text_encoder` + `folder/tokenizer` (diffusers layout), local files only. `build_lock` is held
    only while transformers builds the model (it changes the process's default dtype meanwhile), not while an
    offloaded encoder's weights are read into host RAM.

    Offloaded, the model is built on the meta device and its safetensors files are read straight into the host
    buffer: one copy of the weights made once, where from_pretrained and packing made two (docs/PERFORMANCE.md
    v26)."""
    folder, model = Path(folder), None
    names = (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME)  # transformers' safetensors (a .bin: from_pretrained's way)
    if enc_kw.get("offload") and any((folder / "text_encoder" / n).is_file() for n in names):
        files = find_shards(folder / "text_encoder", *names).files
        config = UMT5Config.from_pretrained(folder / "text_encoder", local_files_only=True)
        with build_lock or contextlib.nullcontext(), torch.device("meta"):
            model = UMT5EncoderModel(config).to(dtype)
        try:
            enc_kw = {**enc_kw, "host_weights": HostWeights(model, files)}
        except TiedWeightsDiffer as exc:  # transformers unties them: its load, then the packing
            log.warning("text encoder: %s; loading it with from_pretrained", exc)
            model = None
    if model is None:
        with build_lock or contextlib.nullcontext():
            model = UMT5EncoderModel.from_pretrained(folder / "text_encoder", dtype=dtype, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    return TextEncoder(model, tok, device=device, **enc_kw)
