"""The tiny local model: deterministic, loadable through the Auto classes, with its chat template and
special tokens."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from spin_k8s import storage
from spin_k8s.workers import data, tiny


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path, tiny_assets: tiny.TinyAssets) -> None:
    again = tiny.create(tmp_path / "again", rows=24, seed=0)
    assert storage.digest_dir(again.model_dir) == storage.digest_dir(tiny_assets.model_dir)
    assert again.data_path.read_bytes() == tiny_assets.data_path.read_bytes()
    other = tiny.create(tmp_path / "other", rows=24, seed=1)
    assert storage.digest_dir(other.model_dir) != storage.digest_dir(tiny_assets.model_dir)


def test_tokenizer_and_model_load_through_auto_classes(tiny_assets: tiny.TinyAssets) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_assets.model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_assets.model_dir)
    assert 300 < len(tok) <= 512 and model.config.vocab_size == len(tok)
    assert 100_000 < model.num_parameters() < 1_000_000
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<|pad|>"
    for special in tiny.SPECIAL_TOKENS:  # each one token, never split by BPE
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert (tiny_assets.model_dir / "chat_template.jinja").read_text() == tiny.CHAT_TEMPLATE
    ids = data.encode_prompt(tok, "How many cats does Bo have?", 512)
    assert tok.convert_ids_to_tokens(ids)[:2] == ["<|user|>", "Ċ"] and ids[-2] == tok.convert_tokens_to_ids(
        "<|assistant|>")
    rows = data.load_sft(str(tiny_assets.data_path))
    assert len(rows.examples) == 24 and not rows.bad
