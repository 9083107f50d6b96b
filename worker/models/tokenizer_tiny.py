"""A tiny T5-style tokenizer built in code (no download): byte-level, no merges.

Only for random-weight presets and tests. Ids follow T5's conventions the encoder relies on: <pad> = 0, </s> = 1,
<unk> = 2, then the 256 byte-level symbols; every sequence gets a trailing </s> like T5's tokenizer.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 (T5: pad 0, eos 1, unk 2)


def build_tiny_tokenizer(vocab_size: int, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with 3 specials + 256 bytes; `vocab_size` (the encoder's) must hold them all."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    n = len(SPECIAL_TOKENS) + len(alphabet)
    if vocab_size < n:
        raise ValueError(f"tiny tokenizer needs vocab_size >= {n}, got {vocab_size}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=model_max_length, padding_side="right",
    )
