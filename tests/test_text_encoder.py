"""UMT5 text encoder wrapper: official padding/trim semantics, determinism, LRU prompt cache, offload, load."""

from __future__ import annotations

import pytest
import torch

from worker.config import PRESETS
from worker.models.text_encoder import TEXT_LEN, TextEncoder, build_text_encoder, clean_prompt, load_text_encoder
from worker.models.tokenizer_tiny import build_tiny_tokenizer

KW = PRESETS["tiny"].text_encoder


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def enc() -> TextEncoder:
    return build_text_encoder(KW, torch.float32, "cpu", seed=0)


def test_tokenizer_t5_conventions() -> None:
    tok = build_tiny_tokenizer(KW["vocab_size"])
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1
    ids = tok("a cat")["input_ids"]
    assert ids[-1] == 1 and all(2 < i < KW["vocab_size"] for i in ids[:-1])
    padded = tok("a cat", padding="max_length", max_length=16)["input_ids"]
    assert padded[: len(ids)] == ids and set(padded[len(ids) :]) == {0}


def test_shape_and_trim(enc: TextEncoder) -> None:
    prompt = "A red car drives through a rainy city at night."
    out = enc.encode(prompt)
    n = len(enc.tokenizer(clean_prompt(prompt))["input_ids"])  # real tokens incl. </s>
    assert out.shape == (n, KW["d_model"])
    # Trimmed rows equal the padded-to-512 masked run's first n rows (official: run padded, then trim).
    batch = enc.tokenizer([prompt], padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="pt")
    assert batch["input_ids"].shape == (1, TEXT_LEN)
    with torch.no_grad():
        full = enc.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[0]
    assert torch.equal(out, full[:n])


def test_long_prompt_truncated(enc: TextEncoder) -> None:
    out = enc.encode("x" * 2000)
    assert out.shape == (TEXT_LEN, KW["d_model"])


def test_deterministic_and_seeded(enc: TextEncoder) -> None:
    other = build_text_encoder(KW, torch.float32, "cpu", seed=0, cache_size=0)
    p = "a forest path in autumn"
    assert torch.equal(enc.encode(p), other.encode(p))
    assert torch.equal(other.encode(p), other.encode(p))
    different = build_text_encoder(KW, torch.float32, "cpu", seed=1, cache_size=0)
    assert not torch.equal(different.encode(p), other.encode(p))


def test_lru_cache() -> None:
    e = build_text_encoder(KW, torch.float32, "cpu", seed=0, cache_size=2)
    a = e.encode("prompt a")
    assert (e.hits, e.misses) == (0, 1)
    again = e.encode("  prompt   a ")  # same prompt after the official whitespace clean
    assert (e.hits, e.misses) == (1, 1) and torch.equal(a, again)
    e.encode("prompt b")
    e.encode("prompt a")  # a is now most recent
    e.encode("prompt c")  # evicts b
    assert e.hits == 2
    e.encode("prompt a")
    assert e.hits == 3
    e.encode("prompt b")
    assert e.misses == 4  # a, b, c, b again
    assert all(t.device.type == "cpu" for t in e._cache.values()) and len(e._cache) == 2


def test_offload_and_back() -> None:
    e = build_text_encoder(KW, torch.float32, "cpu", seed=0, cache_size=0, offload_after_encode=True)
    out = e.encode("hello world")
    assert next(e.model.parameters()).device.type == "cpu"
    e.offload().to("cpu")
    assert torch.equal(e.encode("hello world"), out)


def test_load_from_diffusers_layout(tmp_path, enc: TextEncoder) -> None:
    enc.model.save_pretrained(tmp_path / "text_encoder")
    enc.tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = load_text_encoder(tmp_path, torch.float32, "cpu")
    p = "a boat on a calm lake"
    assert torch.equal(loaded.encode(p), enc.encode(p))
    bf = load_text_encoder(tmp_path, torch.bfloat16, "cpu")
    assert bf.encode(p).dtype == torch.bfloat16
