"""A human answer is tokenized in its conversation (``data.encode_response``), by the workers and the demo's SFT
alike: checked with SentencePiece-style tokenizers (Metaspace, as Llama 2, Mistral and zephyr ship them), where
an answer tokenized on its own opens with a dummy-prefix token the model never reads after the assistant
header; and with every prompt template (``data.Template``): the chat template with and without a system turn, and
the authors' instruction prompt, whose trailing space would break the rule if it ended the prompt."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from spin_k8s.demo import sft
from spin_k8s.workers import data, tiny

ROWS = tiny.sft_rows(12, seed=0)


@pytest.fixture(scope="module", params=["first", "always"])
def sentencepiece(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    corpus = [m["content"] for row in tiny.sft_rows(512, seed=1) for m in row["messages"]]
    corpus += [data.PAPER_INSTRUCTION.format(prompt="")]  # its characters ("#", ":") in the alphabet
    return tiny.build_tokenizer(corpus, 400, metaspace=request.param)


@pytest.fixture(scope="module", params=["byte-level", "metaspace-first", "metaspace-always"])
def any_tokenizer(request: pytest.FixtureRequest, tiny_assets: tiny.TinyAssets) -> PreTrainedTokenizerFast:
    if request.param == "byte-level":
        tok: PreTrainedTokenizerFast = AutoTokenizer.from_pretrained(tiny_assets.model_dir)
        return tok
    corpus = [m["content"] for row in tiny.sft_rows(512, seed=1) for m in row["messages"]]
    corpus += [data.PAPER_INSTRUCTION.format(prompt="")]
    return tiny.build_tokenizer(corpus, 400, metaspace=request.param.removeprefix("metaspace-"))


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


def tokens(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    ids: list[int] = tok(text, add_special_tokens=False)["input_ids"]
    return ids


def test_the_authors_instruction_prompt_is_their_text_with_every_answer_in_context(
        any_tokenizer: PreTrainedTokenizerFast) -> None:
    """The prompt reads "### Instruction: {prompt}\n\n### Response:" and the answer's tokens start with the space
    the authors' prompt ended with: together the tokens of the authors' whole text. Ending the prompt with that
    space instead gives prompt tokens that are no prefix of the whole's (a lone space token, which the whole text
    joins to the answer's first word where the vocabulary has that merge), with a byte-level and a SentencePiece
    vocabulary alike."""
    tok, paper = any_tokenizer, data.Template("paperInstruction")
    broken = 0
    for row in ROWS:
        prompt, answer = (m["content"] for m in row["messages"])
        authors = f"### Instruction: {prompt}\n\n### Response: "  # their script's prompt, verbatim
        prompt_ids = data.encode_prompt(tok, prompt, 1000, paper)
        assert tok.decode(prompt_ids) == data.prompt_text(tok, prompt, paper) == authors[:-1]
        answer_ids = data.encode_response(tok, prompt, answer, 1000, paper)
        assert prompt_ids + answer_ids == [*tokens(tok, authors + answer), tok.eos_token_id]
        broken += tokens(tok, authors + answer)[:len(tokens(tok, authors))] != tokens(tok, authors)
    assert broken >= len(ROWS) // 3
    with pytest.raises(ValueError, match="no system turn"):
        data.Template("paperInstruction", "")


def test_a_system_turn_opens_the_conversation_and_answers_stay_in_context(
        any_tokenizer: PreTrainedTokenizerFast) -> None:
    """``data.systemPrompt``: "" adds an empty system turn (the authors' trainer, zephyr's SFT); unset adds none."""
    tok = any_tokenizer
    prompt, answer = (m["content"] for m in ROWS[0]["messages"])
    for system in ("", "Answer in one sentence."):
        template = data.Template("chatTemplate", system)
        text = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": prompt},
                                        {"role": "assistant", "content": answer}], tokenize=False)
        assert isinstance(text, str) and text.startswith(f"<|system|>\n{system}<|end|>\n<|user|>")
        prompt_ids = data.encode_prompt(tok, prompt, 1000, template)
        answer_ids = data.encode_response(tok, prompt, answer, 1000, template)
        assert prompt_ids + answer_ids == tokens(tok, text)[:len(prompt_ids) + len(answer_ids)]
        assert answer_ids == data.encode_response(tok, prompt, answer, 1000)  # the answer reads the same
    assert not data.prompt_text(tok, prompt).startswith("<|system|>")


def test_a_chat_template_without_system_turns_is_one_clear_line(tiny_assets: tiny.TinyAssets) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_assets.model_dir)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                         "supported') }}{% endif %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}")
    with pytest.raises(data.DataError, match=r"the model's chat template refuses a system turn \(System role not "
                                             r"supported\); leave data.systemPrompt unset"):
        data.encode_prompt(tok, "Hi?", 100, data.Template("chatTemplate", ""))


def test_a_sample_cut_at_the_token_limit_gets_no_end_of_turn(tiny_assets: tiny.TinyAssets) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_assets.model_dir)
    assert data.encode_response(tok, "Hi?", [7, 8, 9], 100, ended=False) == [7, 8, 9]
    assert data.encode_response(tok, "Hi?", [7, 8, 9], 2, ended=False) == [7, 8]
    assert data.encode_response(tok, "Hi?", [7, 8, 9], 100) == [7, 8, 9, tok.eos_token_id]
