"""The demo's exact metrics on hand-made models: p_data itself as a model scores TV 0, KL 0 and NLL = entropy;
a model with known next-token probabilities gets exactly the invalid mass, by constraint, that hand arithmetic
gives; temperature sharpens; and the word-level tokenizer gives every string one token sequence."""

from __future__ import annotations

import math

import pytest
import torch

from spin_k8s.demo import evaluate, model, task
from spin_k8s.workers import data

TASK = task.build(task.TaskConfig(categories=2, counts=(1, 2)), 0)
TOKENIZER = model.build_tokenizer(TASK.words())
VOCAB = TOKENIZER.get_vocab()
END = TOKENIZER.eos_token_id
NEG = -1e4  # a logit whose probability is exp(-1e4): zero in double precision


def table(prompt: task.Prompt, train: list[task.Pair] | None = None) -> evaluate.PromptTable:
    enumeration = evaluate.enumerate_task(TASK, TOKENIZER, train or [], 32)
    return next(t for t in enumeration.tables if t.prompt == prompt)


def distribution_logits(tab: evaluate.PromptTable, probs: dict[tuple[int, ...], dict[int, float]]) -> torch.Tensor:
    """(N, k + 1, V) logits: after the prefix of answer n's first j tokens, ``probs[prefix]`` (token -> p)."""
    k = tab.prompt.k
    out = torch.full((len(tab.answers), k + 1, len(VOCAB)), NEG, dtype=torch.float64)
    for n, answer in enumerate(tab.answers):
        for j in range(k + 1):
            for token, p in probs[tuple(answer[:j])].items():
                out[n, j, token] = math.log(p)
    return out


def p_data_as_model(tab: evaluate.PromptTable) -> dict[tuple[int, ...], dict[int, float]]:
    """The next-token probabilities of p_data itself: draw an unused allowed item by weight, then end."""
    w = {VOCAB[item]: v for item, v in TASK.weights[tab.prompt.category].items() if item != tab.prompt.exclude}
    probs: dict[tuple[int, ...], dict[int, float]] = {}
    for answer in tab.answers:
        for j in range(tab.prompt.k + 1):
            prefix = tuple(answer[:j])
            left = {t: v for t, v in w.items() if t not in prefix}
            probs[prefix] = ({t: v / sum(left.values()) for t, v in left.items()} if j < tab.prompt.k
                             else {END: 1.0})
    return probs


@pytest.mark.parametrize("prompt", [task.Prompt("fruits", 2, "fig"), task.Prompt("animals", 1, None)])
def test_p_data_itself_is_at_distance_zero(prompt: task.Prompt) -> None:
    tab = table(prompt)
    m = evaluate.prompt_metrics(tab, distribution_logits(tab, p_data_as_model(tab)), 1.0)
    entropy = -sum(p * math.log(p) for p in tab.p_data)
    assert m["tv"] == pytest.approx(0.0, abs=1e-9)
    assert m["kl"] == pytest.approx(0.0, abs=1e-9)
    assert m["nll"] == pytest.approx(entropy)
    assert m["invalid"] == pytest.approx(0.0, abs=1e-9) and m["valid"] == pytest.approx(1.0)


def test_invalid_mass_of_a_hand_made_model_by_constraint() -> None:
    prompt = task.Prompt("fruits", 1, "fig")
    tab = table(prompt, train=[task.Pair(prompt, ("plum",))])
    fruits = [VOCAB[i] for i in TASK.weights["fruits"] if i != "fig"]
    plum, apple = VOCAB["plum"], VOCAB["apple"]
    # First word: plum 0.4, apple 0.2, fig (excluded) 0.1, cat (other category) 0.1, "Name" 0.05, end 0.15.
    first = {plum: 0.4, apple: 0.2, VOCAB["fig"]: 0.1, VOCAB["cat"]: 0.1, VOCAB["Name"]: 0.05, END: 0.15}
    # After one fruit: end 0.7, another fruit 0.2 (one too many), the same fruit 0.1 (a repeat).
    probs: dict[tuple[int, ...], dict[int, float]] = {(): first}
    for item in fruits:
        other = apple if item != apple else plum
        probs[(item,)] = {END: 0.7, other: 0.2, item: 0.1}
    m = evaluate.prompt_metrics(tab, distribution_logits(tab, probs), 1.0)
    assert m["invalid/exclusion"] == pytest.approx(0.1)
    assert m["invalid/category"] == pytest.approx(0.1)
    assert m["invalid/format"] == pytest.approx(0.05 + 0.15)  # a word that is no item, and an empty answer
    assert m["invalid/count"] == pytest.approx(0.6 * 0.2)
    assert m["invalid/repeat"] == pytest.approx(0.6 * 0.1)
    assert m["valid"] == pytest.approx(0.6 * 0.7)
    assert m["valid"] + m["invalid"] == pytest.approx(1.0)
    p_data = dict(zip((a[0] for a in tab.answers), tab.p_data, strict=True))
    model_p = {plum: 0.4 * 0.7, apple: 0.2 * 0.7}
    expected_tv = 0.5 * (sum(abs(p - model_p.get(t, 0.0)) for t, p in p_data.items()) + m["invalid"])
    assert m["tv"] == pytest.approx(expected_tv)
    assert m["copy"] == pytest.approx(0.4 * 0.7) and m["copy_data"] == pytest.approx(p_data[plum])
    assert m["kl"] > 1000  # p_data's answers the model never gives (probability exp(-1e4))


def test_lower_temperature_sharpens() -> None:
    prompt = task.Prompt("animals", 1, None)
    tab = table(prompt)
    logits = distribution_logits(tab, p_data_as_model(tab))
    hot, cold = (evaluate.prompt_metrics(tab, logits, t) for t in (1.0, 0.5))
    assert hot["tv"] == pytest.approx(0.0, abs=1e-9) and cold["tv"] > 0.05
    # at T = 0.5 each item's probability is proportional to its weight squared
    w = sorted(TASK.weights["animals"].values(), reverse=True)
    top = w[0] ** 2 / sum(x ** 2 for x in w)
    assert cold["copy"] == 0.0 and cold["valid"] == pytest.approx(1.0)
    expected = 0.5 * sum(abs(a ** 2 / sum(x ** 2 for x in w) - a / sum(w)) for a in w)
    assert cold["tv"] == pytest.approx(expected)
    assert top > w[0] / sum(w)


def test_one_tokenization_per_string() -> None:
    prompt = task.Prompt("fruits", 2, "fig")
    ids = data.encode_prompt(TOKENIZER, prompt.text, 32)
    assert TOKENIZER.convert_ids_to_tokens(ids)[1:-2] == prompt.text.split()
    answer = data.encode_response(TOKENIZER, prompt.text, "plum apple", 16)
    assert answer == [VOCAB["plum"], VOCAB["apple"], END]
    assert TOKENIZER.decode(answer[:-1]) == "plum apple"
