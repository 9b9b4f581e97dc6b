"""Data for both workers: reading SFT datasets, the one prompt template, synthetic shards and mixing.

Flow: ``load_sft`` reads the human pairs (JSONL or Parquet, chat-shaped or prompt/response rows) ->
the generation worker turns prompts into token ids with ``encode_prompt`` and writes shards of
``SyntheticRow`` -> the training worker reads the mixed shards (``mix``, ``load_synthetic``) and tokenizes each
pair with ``encode_prompt`` + ``encode_response``. Because both workers (and the demo's SFT) call the same two
functions, they see the same prompt tokens (the original SPIN code did not: its generation prompt was a plain
"### Instruction" text while training used the chat template), and a human answer is tokenized in its
conversation, as the sampled answers are, never on its own.

This module imports no ML framework at import time: the controller may use ``mix`` and the shard names.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from spin_k8s import storage

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_SHARD_RE = re.compile(r"shard-\d{5}-of-\d{5}\.jsonl$")


class DataError(ValueError):
    """Unusable input data. The message is one line, fit to show a user as is."""


@dataclass(frozen=True)
class Example:
    """One human pair. ``id`` is the row's 0-based position in its source file: stable across reruns."""

    id: int
    prompt: str
    response: str


@dataclass(frozen=True)
class BadRow:
    line: int  # 1-based line (JSONL) or row (Parquet) number
    reason: str


@dataclass(frozen=True)
class SftData:
    examples: list[Example]
    bad: list[BadRow]

    def summary(self, limit: int = 5) -> str:
        """``"3 bad rows skipped: line 2: invalid JSON; line 7: no assistant turn; ..."``, or ``""``."""
        if not self.bad:
            return ""
        shown = "; ".join(f"line {b.line}: {b.reason}" for b in self.bad[:limit])
        more = f"; and {len(self.bad) - limit} more" if len(self.bad) > limit else ""
        return f"{len(self.bad)} bad rows skipped: {shown}{more}"


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is {type(value).__name__}, not text")
    if not value.strip():
        raise ValueError(f"{what} is empty")
    return value


def parse_row(row: object) -> tuple[str, str]:
    """(prompt, response) from one row; ValueError with a short reason for a row that cannot be used.

    A ``messages`` list (UltraChat-200k shape) wins over ``prompt``/``response``: the first user turn and the
    first assistant turn after it are kept, as in the paper; system turns and later turns are dropped.
    """
    if not isinstance(row, dict):
        raise ValueError(f"row is {type(row).__name__}, not an object")
    messages = row.get("messages")
    if messages is None:
        if "prompt" not in row or "response" not in row:
            raise ValueError("neither 'messages' nor 'prompt'/'response'")
        return _text(row["prompt"], "prompt"), _text(row["response"], "response")
    if not isinstance(messages, list):
        raise ValueError(f"messages is {type(messages).__name__}, not a list")
    prompt: str | None = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"message {i} has no role")
        if prompt is None and message["role"] == "user":
            prompt = _text(message.get("content"), f"message {i} content")
        elif prompt is not None and message["role"] == "assistant":
            return prompt, _text(message.get("content"), f"message {i} content")
    raise ValueError("no user turn" if prompt is None else "no assistant turn after the first user turn")


def _records(uri: str, raw: bytes) -> list[tuple[int, object]]:
    """(1-based line or row number, decoded row or the JSON error) for each record of the file."""
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq  # type: ignore[import-untyped]

        try:
            table = pq.read_table(io.BytesIO(raw))
        except Exception as exc:
            raise DataError(f"{uri}: not a readable Parquet file ({exc})") from exc
        return list(enumerate(table.to_pylist(), start=1))
    out: list[tuple[int, object]] = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            out.append((number, DataError(f"invalid JSON ({exc.msg})")))
    return out


def load_sft(uri: str) -> SftData:
    """Reads an SFT dataset (``.jsonl``/``.json`` lines or ``.parquet``) from a path, ``file://`` or ``s3://``.

    Bad rows are skipped and listed with their line numbers; a dataset without one usable row is a DataError.
    """
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError as exc:
        raise DataError(f"{uri}: no such dataset") from exc
    examples, bad = [], []
    records = _records(uri, raw)
    for index, (number, record) in enumerate(records):
        try:
            if isinstance(record, DataError):
                raise ValueError(str(record))
            prompt, response = parse_row(record)
        except ValueError as exc:
            bad.append(BadRow(number, str(exc)))
            continue
        examples.append(Example(id=index, prompt=prompt, response=response))
    data = SftData(examples, bad)
    if not examples:
        detail = f" ({data.summary(3)})" if bad else ""
        raise DataError(f"{uri}: no usable rows in {len(records)} records{detail}")
    return data


# --- The one prompt template -------------------------------------------------------------------------------

PROMPT_FORMATS = ("chatTemplate", "paperInstruction")
# The prompt of the authors' generation script (the paper's appendix B.1) is this text followed by a space. The
# space is the first character of the answer here: a prompt ending in it tokenizes apart from the whole text under
# every common tokenizer (byte-level BPE reads " Hello" as one token, SentencePiece "▁Hello"), so the prompt's
# tokens would not be a prefix of the conversation's and no human answer could be tokenized in context. The text
# the model reads is the authors' exactly; only the odd lone-space token their tokenizer call left at the prompt's
# end is gone, as in the text's own tokenization.
PAPER_INSTRUCTION = "### Instruction: {prompt}\n\n### Response:"
PAPER_ANSWER_PREFIX = " "


@dataclass(frozen=True)
class Template:
    """How a prompt becomes the text generation continues and training scores answers after: one value both
    workers get from the spec (``generation.promptFormat``, ``data.systemPrompt``) and every shard records."""

    format: str = "chatTemplate"  # chatTemplate: the model's chat template | paperInstruction: the authors' prompt
    system_prompt: str | None = None  # chatTemplate only: a system turn before the user's ("" an empty one)

    def __post_init__(self) -> None:
        if self.format not in PROMPT_FORMATS:
            raise ValueError(f"unknown prompt format {self.format!r}; expected one of {', '.join(PROMPT_FORMATS)}")
        if self.format == "paperInstruction" and self.system_prompt is not None:
            raise ValueError("the paperInstruction prompt has no system turn: leave the system prompt unset")

    @property
    def answer_prefix(self) -> str:
        """Text between the prompt and the answer that belongs to the answer's tokens."""
        return PAPER_ANSWER_PREFIX if self.format == "paperInstruction" else ""


CHAT = Template()


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str, template: Template = CHAT) -> str:
    """The text before the answer: the model's own chat template around one user turn (after a system turn if
    the template has one), ending where the assistant's answer starts; or the authors' instruction prompt."""
    if template.format == "paperInstruction":
        return PAPER_INSTRUCTION.format(prompt=prompt)
    messages = [{"role": "user", "content": prompt}]
    if template.system_prompt is not None:
        messages.insert(0, {"role": "system", "content": template.system_prompt})
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja2's TemplateError, raised by templates that refuse a system turn
        if template.system_prompt is None:
            raise
        raise DataError(f"the model's chat template refuses a system turn ({exc}); leave data.systemPrompt "
                        "unset") from exc
    assert isinstance(text, str)
    return text


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, max_prompt_length: int,
                  template: Template = CHAT) -> list[int]:
    """Prompt token ids as generation feeds them and training scores after them.

    Too long a prompt keeps its *last* ``max_prompt_length`` tokens: the generation prompt that opens the
    assistant's turn sits at the end and must survive.
    """
    ids: list[int] = tokenizer(prompt_text(tokenizer, prompt, template), add_special_tokens=False)["input_ids"]
    return ids[-max_prompt_length:]


def response_room(max_length: int, prompt_len: int, max_response_length: int) -> int:
    """Response tokens (end-of-turn included) that fit after a prompt of ``prompt_len`` tokens: what is left of
    ``max_length``, and at most ``max_response_length`` (the authors: max length - max prompt length)."""
    return min(max_response_length, max_length - prompt_len)


def encode_response(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str | Sequence[int],
                    room: int, template: Template = CHAT, *, ended: bool = True) -> list[int]:
    """The answer to ``prompt``, followed by the end-of-turn token if it ``ended``, cut to ``room`` tokens:
    exactly what training scores after ``encode_prompt``'s tokens.

    ``response`` is the token ids a generation engine sampled after those prompt tokens (scored as sampled, not
    re-tokenized from the decoded text), or text: a human answer. ``ended=False`` is for a sample the engine
    stopped at its token limit: no end-of-turn token follows it (appending one would mark every cut sample with a
    free feature, "ends abruptly"). Text is tokenized in its conversation: the
    tokens of the templated prompt followed by the answer, less the templated prompt's own tokens (as TRL's DPO
    tokenization did). Alone, an answer tokenizes differently under SentencePiece-style tokenizers (Llama 2,
    Mistral, zephyr): it opens with a dummy-prefix token ("▁Hello") that never follows the assistant header in
    the model's own text ("Hello"), a feature that would tell every human answer from the sampled ones.

    The prompt's tokens are counted before ``max_prompt_length`` cuts them: the cut only drops the prompt's
    front, so it never changes the answer's tokens.

    DataError when the templated prompt's tokens are not a prefix of the whole's: the tokenizer joins the
    prompt's last characters and the answer's first into one token (a template ending in a space, an answer
    opening with a newline a byte-level vocabulary joins to the template's). No token sequence then continues
    the prompt tokens the pair shares and reads the conversation as the tokenizer does. Cutting at the longest
    common prefix would give the human answer another prompt than the sampled one, or score part of the prompt
    as answer: a separable feature again. So the row is refused, with the seam in the message.
    """
    if isinstance(response, str):
        context = prompt_text(tokenizer, prompt, template)
        head: list[int] = tokenizer(context, add_special_tokens=False)["input_ids"]
        whole: list[int] = tokenizer(context + template.answer_prefix + response,
                                     add_special_tokens=False)["input_ids"]
        if whole[:len(head)] != head:
            raise DataError(f"the answer {response[:40]!r} to the prompt {prompt[:40]!r} does not tokenize as a "
                            f"continuation of the prompt: the tokenizer joins the template's end "
                            f"{context[-20:]!r} with the answer's start; strip the answer's leading whitespace "
                            f"or end the template's generation prompt with a special token")
        ids = whole[len(head):]
    else:
        ids = list(response)
    eos = tokenizer.eos_token_id
    assert isinstance(eos, int), "the tokenizer needs an end-of-turn (eos) token"
    return [*ids, eos][:max(room, 0)] if ended else ids[:max(room, 0)]


# --- Synthetic shards --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticRow:
    """One line of a generation shard. Reference log-probs are summed over the response tokens (see
    ``encode_response``) under the opponent model, present only when the shard was scored."""

    id: int
    prompt: str
    real: str
    generated: str
    generated_ids: list[int]  # without the end-of-turn token
    # The engine stopped at its token limit, not at an end-of-turn token: none follows (False in older shards,
    # which appended one to every sample).
    length_stopped: bool = False
    ref_real_logp: float | None = None
    ref_generated_logp: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


@dataclass(frozen=True)
class ShardRecord:
    """The ``.done.json`` record of a finished shard, written last and once. ``model_digest`` identifies the
    opponent that generated (and, if ``scored``, scored) the rows; training trusts precomputed reference
    log-probs only from a shard whose digest and length limits match its own, and refuses a shard generated
    under another prompt template than its own."""

    shard: int
    num_shards: int
    rows: int
    sha256: str
    engine: str
    engine_version: str
    sampling: dict[str, float | int]
    model: str
    model_digest: str
    scored: bool
    max_prompt_length: int
    max_length: int
    data: str
    # Defaults: what a record written before these fields existed meant (its scores are not trusted: no
    # trainer's response cap is 0).
    max_response_length: int = 0
    prompt_format: str = "chatTemplate"
    system_prompt: str | None = None
    length_stopped: int = 0  # rows whose sample hit the token limit (``SyntheticRow.length_stopped``)

    @property
    def template(self) -> Template:
        return Template(self.prompt_format, self.system_prompt)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @staticmethod
    def from_json(raw: bytes) -> ShardRecord:
        return ShardRecord(**json.loads(raw))


def shard_name(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}.jsonl"


def done_name(index: int, num_shards: int) -> str:
    return f"{shard_name(index, num_shards)}.done.json"


def shard_bounds(total: int, index: int, num_shards: int) -> tuple[int, int]:
    """[start, stop) of shard ``index`` over ``total`` items: contiguous, sizes differ by at most one,
    together an exact partition."""
    if not 0 <= index < num_shards:
        raise ValueError(f"shard index {index} is outside 0..{num_shards - 1}")
    return total * index // num_shards, total * (index + 1) // num_shards


@dataclass(frozen=True)
class SyntheticSet:
    """All rows of one generation output prefix, each with the record of the shard it came from."""

    uri: str
    rows: list[tuple[SyntheticRow, ShardRecord]]


def load_synthetic(prefix: str) -> SyntheticSet:
    """Reads a complete generation output: every shard must be done and match its recorded sha256."""
    uris = storage.list_uris(prefix)
    shards = {m.group(0): u for u in uris if (m := _SHARD_RE.search(u))}
    records = [ShardRecord.from_json(storage.read_bytes(u)) for u in uris if u.endswith(".done.json")]
    if not records:
        raise DataError(f"{prefix}: no finished generation shard (no *.done.json)")
    total = {r.num_shards for r in records}
    if len(total) != 1:
        raise DataError(f"{prefix}: shards from different shard counts {sorted(total)}")
    n = total.pop()
    missing = sorted(set(range(n)) - {r.shard for r in records})
    if missing:
        raise DataError(f"{prefix}: incomplete, shards {missing} of {n} are not done")
    rows: list[tuple[SyntheticRow, ShardRecord]] = []
    for record in sorted(records, key=lambda r: r.shard):
        name = shard_name(record.shard, n)
        raw = storage.read_bytes(shards[name]) if name in shards else b""
        if storage.sha256_bytes(raw) != record.sha256:
            raise DataError(f"{prefix}/{name}: content does not match its done record's sha256")
        for line in raw.decode().splitlines():
            rows.append((SyntheticRow(**json.loads(line)), record))
    return SyntheticSet(prefix, rows)


def mix(iteration: int, keep_previous: int, available: Mapping[int, str]) -> list[str]:
    """The synthetic sets iteration ``iteration`` trains on: its own plus those of the ``keep_previous``
    iterations before it (1 in the paper; the authors later found 2 better), oldest first.

    ``available`` maps an iteration number to its synthetic set's URI. Iterations before 0 do not exist, so
    iteration 0 always trains on its own set alone.
    """
    if iteration < 0 or keep_previous < 0:
        raise ValueError("iteration and keep_previous must be >= 0")
    wanted = range(max(0, iteration - keep_previous), iteration + 1)
    missing = [i for i in wanted if i not in available]
    if missing:
        raise DataError(f"iteration {iteration} needs the synthetic sets of iterations {missing}, "
                        f"which are not available")
    return [available[i] for i in wanted]


def is_held_out(row_id: int, fraction: float) -> bool:
    """Whether a prompt belongs to the held-out split: decided by its id alone, so the same prompts are held
    out in every iteration and never trained on."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"heldout:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def parse_assignments(values: Sequence[str]) -> dict[int, str]:
    """``["0=s3://b/i0", "1=s3://b/i1"]`` -> ``{0: "s3://b/i0", 1: "s3://b/i1"}``; DataError otherwise."""
    out: dict[int, str] = {}
    for value in values:
        key, sep, uri = value.partition("=")
        if not sep or not key.strip().isdigit() or not uri:
            raise DataError(f"expected ITERATION=URI, got {value!r}")
        out[int(key)] = uri
    return out

