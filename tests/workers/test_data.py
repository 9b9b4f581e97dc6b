"""Datasets, the shared prompt template, shards and mixing; bad data reaches the user as one counted line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from spin_k8s.workers import data, generate, runtime, tiny, train

GOOD_CHAT = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
LINES = [
    json.dumps(GOOD_CHAT),                                                          # 1 ok
    json.dumps({"prompt": "Q", "prompt_id": "x", "messages": [                      # 2 ok: system + 2 turns
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "First?"},
        {"role": "assistant", "content": "One."}, {"role": "user", "content": "Second?"},
        {"role": "assistant", "content": "Two."}]}),
    json.dumps({"prompt": "2+2?", "response": "4"}),                                # 3 ok: pair shape
    '{"messages": [',                                                               # 4 invalid JSON
    json.dumps({"messages": [{"content": "no role"}]}),                             # 5 missing role
    json.dumps({"messages": [{"role": "user", "content": "  "},                     # 6 empty text
                             {"role": "assistant", "content": "x"}]}),
    json.dumps({"messages": [{"role": "user", "content": 7},                        # 7 wrong type
                             {"role": "assistant", "content": "x"}]}),
    json.dumps({"messages": [{"role": "user", "content": "alone"}]}),               # 8 no assistant
    "",                                                                             # 9 blank: skipped
    json.dumps(["not", "an", "object"]),                                            # 10 wrong type
    json.dumps({"prompt": "q"}),                                                    # 11 no response
    json.dumps({"messages": "text"}),                                               # 12 wrong type
]


def test_jsonl_keeps_first_turns_and_reports_bad_rows_with_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(LINES) + "\n")
    sft = data.load_sft(str(path))
    assert [(e.prompt, e.response) for e in sft.examples] == [("Hi?", "Hello."), ("First?", "One."), ("2+2?", "4")]
    assert [e.id for e in sft.examples] == [0, 1, 2]
    assert [(b.line, b.reason) for b in sft.bad] == [
        (4, "invalid JSON (Expecting value)"),
        (5, "message 0 has no role"),
        (6, "message 0 content is empty"),
        (7, "message 0 content is int, not text"),
        (8, "no assistant turn after the first user turn"),
        (10, "row is list, not an object"),
        (11, "neither 'messages' nor 'prompt'/'response'"),
        (12, "messages is str, not a list"),
    ]
    summary = sft.summary(limit=2)
    assert summary.startswith("8 bad rows skipped: line 4: invalid JSON")
    assert summary.endswith("and 6 more") and "\n" not in summary


def test_parquet_rows_and_their_numbers(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"prompt": "a?", "response": "A."}, {"prompt": "b?", "response": ""},
                                  {"prompt": "c?", "response": "C."}])
    pq.write_table(table, tmp_path / "sft.parquet")
    sft = data.load_sft(f"file://{tmp_path}/sft.parquet")
    assert [(e.id, e.prompt) for e in sft.examples] == [(0, "a?"), (2, "c?")]
    assert [(b.line, b.reason) for b in sft.bad] == [(2, "response is empty")]
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(data.DataError, match="not a readable Parquet file"):
        data.load_sft(str(tmp_path / "broken.parquet"))


@pytest.mark.s3
def test_reads_from_s3(s3_server: Any, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    s3_server.client().put_object(Bucket=bucket, Key="d/sft.jsonl", Body=(json.dumps(GOOD_CHAT) + "\n").encode())
    assert [e.response for e in data.load_sft(f"s3://{bucket}/d/sft.jsonl").examples] == ["Hello."]
    with pytest.raises(data.DataError, match="no such dataset"):
        data.load_sft(f"s3://{bucket}/d/missing.jsonl")


def test_no_usable_row_is_one_clear_line_and_the_input_exit_code(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(LINES[3:8]) + "\n")
    with pytest.raises(data.DataError) as info:
        data.load_sft(str(path))
    message = str(info.value)
    assert "no usable rows in 5 records" in message and "line 1: invalid JSON" in message and "\n" not in message

    code = generate.main(["--model", str(tmp_path / "unused"), "--data", str(path), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == runtime.INPUT_EXIT  # not retried: the Job's podFailurePolicy fails the Job on it
    assert err.count("\n") == 1 and err.startswith("error: ") and "no usable rows" in err
    assert not (tmp_path / "o").exists()


def test_usage_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main(["--model", "m", "--output", "o", "--synthetic", "zero=s3://b/x"]) == 2
    assert capsys.readouterr().err == "error: expected ITERATION=URI, got 'zero=s3://b/x'\n"
    assert generate.main(["--model", "m", "--data", "d", "--output", "o", "--num-shards", "2",
                          "--shard-index", "2"]) == 2
    assert capsys.readouterr().err == "error: --shard-index 2 is outside 0..1\n"
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage errors
        generate.main(["--data", "d"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(("iteration", "keep", "expected"), [
    (0, 1, ["s0"]),
    (1, 1, ["s0", "s1"]),
    (3, 1, ["s2", "s3"]),
    (3, 2, ["s1", "s2", "s3"]),
    (3, 0, ["s3"]),
    (1, 5, ["s0", "s1"]),
])
def test_mix(iteration: int, keep: int, expected: list[str]) -> None:
    available = {i: f"s{i}" for i in range(4)}
    assert data.mix(iteration, keep, available) == expected


def test_mix_refuses_missing_sets() -> None:
    with pytest.raises(data.DataError, match=r"iterations \[1\]"):
        data.mix(2, 1, {0: "s0", 2: "s2"})
    with pytest.raises(ValueError):
        data.mix(-1, 1, {})


def test_shard_bounds_partition_exactly() -> None:
    for total in (0, 1, 7, 100):
        for n in (1, 2, 3, 8, 13):
            spans = [data.shard_bounds(total, i, n) for i in range(n)]
            covered = [k for start, stop in spans for k in range(start, stop)]
            assert covered == list(range(total))
            assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1
    with pytest.raises(ValueError):
        data.shard_bounds(10, 3, 3)


def test_prompt_template_and_truncation(tiny_assets: tiny.TinyAssets) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets.model_dir)
    assert data.prompt_text(tok, "What is 1 plus 2?") == "<|user|>\nWhat is 1 plus 2?<|end|>\n<|assistant|>\n"
    full = data.encode_prompt(tok, "What is 1 plus 2?", 1000)
    assert tok.decode(full) == data.prompt_text(tok, "What is 1 plus 2?")
    cut = data.encode_prompt(tok, "What is 1 plus 2?", 4)
    assert cut == full[-4:] and tok.convert_ids_to_tokens(cut)[-2:] == ["<|assistant|>", "Ċ"]

    response = data.encode_response(tok, "What is 1 plus 2?", "1 plus 2 is 3.", 100)
    assert response[-1] == tok.eos_token_id and tok.decode(response[:-1]) == "1 plus 2 is 3."
    assert data.encode_response(tok, "What is 1 plus 2?", [7, 8, 9], 100) == [7, 8, 9, tok.eos_token_id]
    assert data.encode_response(tok, "What is 1 plus 2?", [7, 8, 9], 2) == [7, 8]


def test_load_synthetic_refuses_incomplete_or_tampered_sets(synthetic: Path, tmp_path: Path) -> None:
    whole = data.load_synthetic(str(synthetic))
    assert sorted(row.id for row, _ in whole.rows) == list(range(24))

    copy = tmp_path / "copy"
    shutil.copytree(synthetic, copy)
    (copy / data.done_name(1, 2)).unlink()
    with pytest.raises(data.DataError, match=r"incomplete, shards \[1\] of 2"):
        data.load_synthetic(str(copy))

    shutil.rmtree(copy)
    shutil.copytree(synthetic, copy)
    shard = copy / data.shard_name(0, 2)
    shard.write_text(shard.read_text().replace('"id": 0', '"id": 99'))
    with pytest.raises(data.DataError, match="does not match its done record"):
        data.load_synthetic(str(copy))
    with pytest.raises(data.DataError, match="no finished generation shard"):
        data.load_synthetic(str(tmp_path / "nothing"))
