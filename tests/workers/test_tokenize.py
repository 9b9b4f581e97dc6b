"""A human answer is tokenized in its conversation (``data.encode_response``), by the workers and the demo's SFT
alike: checked with SentencePiece-style tokenizers (Metaspace, as Llama 2, Mistral and zephyr ship them), where
an answer tokenized on its own opens with a dummy-prefix token the model never reads after the assistant
header."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from spin_k8s.demo import sft
from spin_k8s.workers import data, tiny

ROWS = tiny.sft_rows(12, seed=0)


@pytest.fixture(scope="module", params=["first", "always"])
def sentencepiece(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    corpus = [m["content"] for row in tiny.sft_rows(512, seed=1) for m in row["messages"]]
    return tiny.build_tokenizer(corpus, 400, metaspace=request.param)


def conversation(tok: PreTrainedTokenizerFast, prompt: str, answer: str) -> list[int]:
    """The token ids of the whole templated conversation, tokenized in one piece."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                   tokenize=False)
    assert isinstance(text, str)
    ids: list[int] = tok(text, add_special_tokens=False)["input_ids"]
    return ids


def test_prompt_and_answer_tokens_are_the_whole_conversations(sentencepiece: PreTrainedTokenizerFast) -> None:
    tok = sentencepiece
    for row in ROWS:
        prompt, answer = (m["content"] for m in row["messages"])
        prompt_ids = data.encode_prompt(tok, prompt, 1000)
        answer_ids = data.encode_response(tok, prompt, answer, 1000)
        assert answer_ids[-1] == tok.eos_token_id and len(answer_ids) > 2
        assert prompt_ids + answer_ids == conversation(tok, prompt, answer)[:len(prompt_ids) + len(answer_ids)]
        # The trap this guards against: alone, the answer opens with the dummy prefix "▁".
        alone = tok(answer, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(alone)[0].startswith("▁") and alone != answer_ids[:-1]
        # The demo's SFT trains on the very tokens SPIN scores.
        (encoded,) = sft.encode(tok, [(prompt, answer)], 1000, 1000)
        assert (encoded.ids, encoded.prompt_len) == (prompt_ids + answer_ids, len(prompt_ids))
        assert data.encode_response(tok, prompt, [7, 8, 9], 1000) == [7, 8, 9, tok.eos_token_id]


def test_cuts_keep_a_window_of_the_whole_conversation(sentencepiece: PreTrainedTokenizerFast) -> None:
    """The prompt keeps its last tokens and the answer is cut to the room left: together a window of the
    conversation's tokens, whatever the prompt's cut."""
    tok = sentencepiece
    prompt, answer = (m["content"] for m in ROWS[0]["messages"])
    whole = conversation(tok, prompt, answer)
    start = len(data.encode_prompt(tok, prompt, 1000)) - 5  # where the 5 kept prompt tokens begin
    cut = data.encode_prompt(tok, prompt, 5)
    assert len(cut) == 5
    for room in (2, 3, 100):
        answer_ids = data.encode_response(tok, prompt, answer, room)
        assert cut + answer_ids == whole[start:start + 5 + len(answer_ids)]
        assert len(answer_ids) == min(room, len(data.encode_response(tok, prompt, answer, 1000)))


def test_an_answer_the_tokenizer_joins_to_the_template_is_refused(tiny_assets: tiny.TinyAssets) -> None:
    """A generation prompt ending in a space (the paper's "### Response: "): the byte-level tokenizer reads
    the space and the answer's first word as one token, so no answer tokens continue the prompt's."""
    tok = AutoTokenizer.from_pretrained(tiny_assets.model_dir)
    tok.chat_template = "{% for m in messages %}### Instruction: {{ m['content'] }}\n\n{% endfor %}### Response: "
    assert tok.convert_ids_to_tokens(tok("### Response: Bo", add_special_tokens=False)["input_ids"])[-2:] == [
        ":", "ĠBo"]
    with pytest.raises(data.DataError, match=r"the answer 'Bo has 3 cats\.' to the prompt 'How many cats does Bo "
                                             r"have\?' does not tokenize as a continuation of the prompt"):
        data.encode_response(tok, "How many cats does Bo have?", "Bo has 3 cats.", 100)
    # Sampled ids are what the engine produced after the prompt's tokens: taken as they are.
    assert data.encode_response(tok, "How many cats does Bo have?", [7, 8], 100) == [7, 8, tok.eos_token_id]
