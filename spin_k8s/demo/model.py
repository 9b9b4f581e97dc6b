"""The demo's model: a word-level tokenizer over the task's words and a tiny Llama, built locally and saved as
a Hugging Face directory the workers load like any checkpoint.

Word-level (``tokenizers``' WordLevel, split on whitespace and punctuation), with the roles and end-of-turn
special tokens and the chat template of ``workers.tiny``: a string has exactly one tokenization, so the
probability a model gives a word sequence is the probability of one token sequence, and enumerating answers
enumerates token sequences. Both are deterministic functions of their inputs and the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from spin_k8s.workers import tiny

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

UNKNOWN = "<|unk|>"


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the demo's Llama: small enough that it does not fit p_data exactly from a few thousand pairs."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    max_positions: int = 64  # the longest prompt + answer has about 20 tokens


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*tiny.SPECIAL_TOKENS, UNKNOWN, *words])}
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNKNOWN))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=word_level, pad_token="<|pad|>", eos_token="<|end|>", unk_token=UNKNOWN,
        additional_special_tokens=list(tiny.SPECIAL_TOKENS[1:4]))
    tok.chat_template = tiny.CHAT_TEMPLATE
    return tok


def build(out_dir: Path, words: list[str], config: ModelConfig, seed: int) -> Path:
    """Saves the tokenizer of ``words`` and a randomly initialised Llama (seeded) to ``out_dir``."""
    tok = build_tokenizer(words)
    shape = tiny.TinyConfig(
        vocab_size=len(tok), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_layers=config.num_layers, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
        max_positions=config.max_positions)
    return tiny.save_llama(out_dir, tok, shape, seed)
