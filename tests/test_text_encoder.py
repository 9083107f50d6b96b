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


def _spans(buf: torch.Tensor, t: torch.Tensor) -> bool:
    start = buf.data_ptr()
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + buf.numel()


def test_offloaded_encoder_borrows_its_weights_per_prompt(enc: TextEncoder) -> None:
    e = build_text_encoder(KW, torch.float32, "cpu", seed=0, cache_size=0, offload=True)
    hw = e.host_weights
    params = dict(e.model.named_parameters(remove_duplicate=False))
    # One host buffer holds every weight once: the shared embedding is one slot for its two names.
    assert e.model.shared.weight is e.model.encoder.embed_tokens.weight
    assert hw.nbytes >= sum(p.numel() * p.element_size() for p in e.model.parameters())
    assert hw.nbytes < sum(p.numel() * p.element_size() for p in params.values())
    assert all(_spans(hw.host, p) for p in params.values())
    seen = []

    def during(module, args):  # inside the forward: every weight is in the lent copy, none in the host buffer
        seen.append([not _spans(hw.host, p) for p in params.values()])

    hook = e.model.register_forward_pre_hook(during)
    out = e.encode("hello world")
    hook.remove()
    assert seen and all(seen[0])
    assert all(_spans(hw.host, p) for p in params.values())  # given back: nothing points at the copy
    assert torch.equal(out, enc.encode("hello world"))  # the same weights, packed and lent
    assert torch.equal(e.encode("hello world"), out)  # and again after a lend


def test_offloaded_encoder_gives_its_weights_back_on_error() -> None:
    e = build_text_encoder(KW, torch.float32, "cpu", seed=0, cache_size=0, offload=True)

    def fail(module, args):
        raise RuntimeError("boom")

    hook = e.model.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        e.encode("hello world")
    hook.remove()
    assert all(_spans(e.host_weights.host, p) for p in e.model.parameters())


def test_load_from_diffusers_layout(tmp_path, enc: TextEncoder) -> None:
    enc.model.save_pretrained(tmp_path / "text_encoder")
    enc.tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = load_text_encoder(tmp_path, torch.float32, "cpu")
    p = "a boat on a calm lake"
    assert torch.equal(loaded.encode(p), enc.encode(p))
    offloaded = load_text_encoder(tmp_path, torch.float32, "cpu", offload=True)
    assert offloaded.offloaded and torch.equal(offloaded.encode(p), enc.encode(p))
    bf = load_text_encoder(tmp_path, torch.bfloat16, "cpu")
    assert bf.encode(p).dtype == torch.bfloat16


def test_build_lock_covers_the_build_not_the_packing(tmp_path, monkeypatch, enc: TextEncoder) -> None:
    """Engine.load passes prewarm.exclusive() as build_lock: transformers changes the default dtype while it builds
    the model, so the prewarm's replay must wait then; reading an offloaded encoder's weights into host RAM changes
    no process state, and the replay goes on meanwhile."""
    import threading

    from worker.models import text_encoder

    enc.model.save_pretrained(tmp_path / "text_encoder")
    enc.tokenizer.save_pretrained(tmp_path / "tokenizer")
    lock = threading.Lock()
    held = {}
    read = text_encoder.HostWeights.__init__

    class Building(text_encoder.UMT5EncoderModel):
        def __init__(self, *args, **kwargs):
            held["build"] = lock.locked()
            super().__init__(*args, **kwargs)

    def reading(self, module, files=None):
        held["read"] = lock.locked()
        read(self, module, files)

    monkeypatch.setattr(text_encoder, "UMT5EncoderModel", Building)
    monkeypatch.setattr(text_encoder.HostWeights, "__init__", reading)
    loaded = load_text_encoder(tmp_path, torch.float32, "cpu", build_lock=lock, offload=True)
    assert held == {"build": True, "read": False} and not lock.locked()
    assert torch.equal(loaded.encode("a boat"), enc.encode("a boat"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offloaded_weights_are_read_straight_into_host_ram(tmp_path, dtype, enc: TextEncoder) -> None:
    """Offloaded, the encoder is built on the meta device and its files are read into the host buffer (cast where
    the file's dtype differs): the same weights as from_pretrained's, bit for bit, the tied embedding one tensor,
    from one file or from shards."""
    from worker.models.host_weights import HostWeights

    enc.model.save_pretrained(tmp_path / "one" / "text_encoder")
    enc.model.save_pretrained(tmp_path / "shards" / "text_encoder", max_shard_size="20KB")
    assert len(list((tmp_path / "shards" / "text_encoder").glob("*.safetensors"))) > 1
    from safetensors.torch import save_file  # a stray file the index does not name is not read, as in transformers

    save_file({"stray.weight": torch.zeros(3)}, tmp_path / "shards" / "text_encoder" / "stray.safetensors")
    want = {k: v.to(dtype) for k, v in enc.model.state_dict().items()}
    for folder in ("one", "shards"):
        enc.tokenizer.save_pretrained(tmp_path / folder / "tokenizer")
        got = load_text_encoder(tmp_path / folder, dtype, "cpu", offload=True)
        assert isinstance(got.host_weights, HostWeights) and got.offloaded
        model = got.model
        assert model.shared.weight is model.encoder.embed_tokens.weight
        state = model.state_dict()
        assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
        assert all(p.device.type == "cpu" and p.untyped_storage().data_ptr() == got.host_weights.host.data_ptr()
                   for p in model.parameters())
    plain = load_text_encoder(tmp_path / "one", dtype, "cpu")
    assert torch.equal(got.encode("a boat on a lake"), plain.encode("a boat on a lake"))


def test_bad_encoder_files_name_the_tensor(tmp_path, enc: TextEncoder) -> None:
    from safetensors.torch import load_file, save_file

    from worker.models.loading import WeightsError

    enc.model.save_pretrained(tmp_path / "text_encoder")
    enc.tokenizer.save_pretrained(tmp_path / "tokenizer")
    path = tmp_path / "text_encoder" / "model.safetensors"
    good = load_file(path)
    layer = "encoder.block.0.layer.0.SelfAttention.q.weight"
    cases = [
        ({k: v for k, v in good.items() if k != layer}, f"missing from .*'{layer}'"),
        ({**good, "encoder.extra.weight": torch.zeros(2)}, "unexpected tensor 'encoder.extra.weight'"),
        ({**good, layer: good[layer][:, :-1].contiguous()}, f"shape mismatch for '{layer}'"),
    ]
    for tensors, match in cases:
        save_file(tensors, path)
        with pytest.raises(WeightsError, match=match):
            load_text_encoder(tmp_path, torch.float32, "cpu", offload=True)
    save_file(good, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightsError, match="truncated"):
        load_text_encoder(tmp_path, torch.float32, "cpu", offload=True)


def test_a_tied_weight_stored_twice_with_other_values_loads_as_transformers_does(tmp_path, caplog,
                                                                                  enc: TextEncoder) -> None:
    """The embedding is one tensor in the model under two names. Stored twice with equal values it is read once
    and checked; stored with different values transformers unties the two, so the direct read gives way to
    from_pretrained (warning), and the encoder is what transformers makes of the files."""
    from safetensors.torch import load_file, save_file

    enc.model.save_pretrained(tmp_path / "text_encoder")
    enc.tokenizer.save_pretrained(tmp_path / "tokenizer")
    path = tmp_path / "text_encoder" / "model.safetensors"
    tensors = load_file(path)
    assert "encoder.embed_tokens.weight" not in tensors  # transformers stores a tied weight once
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"].clone()
    save_file(tensors, path)
    assert load_text_encoder(tmp_path, torch.float32, "cpu", offload=True).host_weights.nbytes < path.stat().st_size
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"] * 2
    save_file(tensors, path)
    with caplog.at_level("WARNING", logger="worker.text_encoder"):
        got = load_text_encoder(tmp_path, torch.float32, "cpu", offload=True)
    assert "differ" in caplog.text and got.offloaded
    plain = load_text_encoder(tmp_path, torch.float32, "cpu")
    assert plain.model.shared.weight is not plain.model.encoder.embed_tokens.weight
    assert torch.equal(got.encode("a boat"), plain.encode("a boat"))
