"""A tiny local model, tokenizer and SFT dataset for tests and the demo: nothing comes from a model hub.

The tokenizer is a byte-level BPE trained with ``tokenizers`` on the dataset's own text, with special tokens
for the roles and the end of a turn, wrapped in ``PreTrainedTokenizerFast`` with a Jinja chat template saved
next to it (``build_tokenizer`` also makes a SentencePiece-style one, for tokenization tests). The model is a
small Llama built with ``from_config``. Everything is a deterministic function of the seed, so two calls with
the same arguments write byte-identical files.

    python -m spin_k8s.workers.tiny --output /tmp/tiny --rows 64 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Roles get their own tokens so the template's markers never split; "<|end|>" closes a turn and is the
# end-of-sequence token the generation engines stop at.
SPECIAL_TOKENS = ("<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_NAMES = ("Ada", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal")
_THINGS = ("apples", "books", "cats", "drums", "eggs", "flags", "gems", "hats")
_COLORS = ("red", "blue", "green", "gold", "gray", "pink")


@dataclass(frozen=True)
class TinyConfig:
    """Shape of the tiny Llama. The defaults give about 0.4 M parameters and a head size of 64, which the
    vLLM CPU attention kernels support."""

    vocab_size: int = 512  # BPE vocabulary including the special tokens
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    max_positions: int = 2048  # longest sequence the model accepts, in tokens


@dataclass(frozen=True)
class TinyAssets:
    """What :func:`create` wrote: a model directory (weights, config, tokenizer) and a JSONL SFT dataset."""

    model_dir: Path
    data_path: Path


def sft_rows(n: int, seed: int) -> list[dict[str, list[dict[str, str]]]]:
    """``n`` UltraChat-shaped rows (``messages`` with a user turn and an assistant turn) whose answers follow
    simple rules, so a tiny model can learn to tell them from its own samples."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        kind = rng.randrange(3)
        if kind == 0:
            a, b = rng.randrange(20), rng.randrange(20)
            user, answer = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        elif kind == 1:
            name, count, thing = rng.choice(_NAMES), rng.randrange(2, 9), rng.choice(_THINGS)
            user, answer = f"How many {thing} does {name} have?", f"{name} has {count} {thing}."
        else:
            thing, color = rng.choice(_THINGS), rng.choice(_COLORS)
            user, answer = f"What color are the {thing}?", f"The {thing} are {color}."
        rows.append({"messages": [{"role": "user", "content": user},
                                  {"role": "assistant", "content": answer}]})
    return rows


def write_sft_dataset(path: Path, n: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in sft_rows(n, seed)))
    return path


def build_tokenizer(texts: list[str], vocab_size: int, metaspace: str | None = None) -> PreTrainedTokenizerFast:
    """A BPE ``PreTrainedTokenizerFast`` trained on ``texts``, with the chat template set.

    Byte-level (GPT-2 style) by default. With ``metaspace`` ("first" or "always", the prepend scheme), a
    SentencePiece-style one as Llama 2 and Mistral ship it: spaces become "▁" and a dummy "▁" opens the text
    (each text between special tokens, for "always"), so an answer tokenized on its own starts differently
    than in its conversation; for the tests of that. Its alphabet is the characters of ``texts`` plus the
    template's newline, without byte fallback: other characters are dropped.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    if metaspace is None:
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        bpe.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=metaspace, split=False)
        bpe.decoder = decoders.Metaspace(prepend_scheme=metaspace, split=False)
        alphabet = ["\n"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe, pad_token="<|pad|>", eos_token="<|end|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:4]))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(out_dir: Path, texts: list[str], config: TinyConfig, seed: int) -> Path:
    """Trains the tokenizer on ``texts``, builds a randomly initialised Llama and saves both to ``out_dir``."""
    return save_llama(out_dir, build_tokenizer(texts, config.vocab_size), config, seed)


def save_llama(out_dir: Path, tok: PreTrainedTokenizerFast, config: TinyConfig, seed: int) -> Path:
    """Saves ``tok`` and a randomly initialised (seeded) Llama of ``config``'s shape over its vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    llama = LlamaConfig(
        vocab_size=len(tok), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.max_positions,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llama, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def create(out_dir: Path, *, rows: int = 64, seed: int = 0, config: TinyConfig = TinyConfig()) -> TinyAssets:
    """Writes ``out_dir/model`` (tiny Llama + tokenizer) and ``out_dir/sft.jsonl`` (``rows`` examples).

    The tokenizer is trained on a larger sample of the same generator than the dataset, so held-out rows of
    the same kind tokenize as compactly as the training rows.
    """
    data = write_sft_dataset(out_dir / "sft.jsonl", rows, seed)
    corpus = [m["content"] for row in sft_rows(max(rows, 512), seed + 1) for m in row["messages"]]
    model = build_model(out_dir / "model", corpus, config, seed)
    return TinyAssets(model_dir=model, data_path=data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spin_k8s.workers.tiny",
        description="Write a tiny Llama, its tokenizer and a small SFT dataset for tests and the demo.",
        epilog="example: python -m spin_k8s.workers.tiny --output /tmp/tiny --rows 64 --seed 0",
    )
    parser.add_argument("--output", required=True, type=Path,
                        help="directory to create; receives model/ and sft.jsonl (example: /tmp/tiny)")
    parser.add_argument("--rows", type=int, default=64, help="SFT rows to write (default 64; example: 200)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for data, tokenizer and weights (default 0; example: 3)")
    parser.add_argument("--hidden-size", type=int, default=TinyConfig.hidden_size,
                        help=f"model width (default {TinyConfig.hidden_size}; example: 256)")
    parser.add_argument("--layers", type=int, default=TinyConfig.num_layers,
                        help=f"decoder layers (default {TinyConfig.num_layers}; example: 4)")
    args = parser.parse_args(argv)
    heads = max(1, args.hidden_size // 64)  # keeps the head size at 64 for vLLM's CPU kernels
    config = TinyConfig(hidden_size=args.hidden_size, intermediate_size=2 * args.hidden_size,
                        num_layers=args.layers, num_heads=heads, num_kv_heads=max(1, heads // 2))
    assets = create(args.output, rows=args.rows, seed=args.seed, config=config)
    print(json.dumps({"model": str(assets.model_dir), "data": str(assets.data_path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
