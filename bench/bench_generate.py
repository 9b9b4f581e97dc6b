"""Benchmark: the generation worker against bare ``vllm.LLM.generate``, on one vLLM engine, in one run.

Both sides get the same prompts (the worker's own prompt token ids), the same model, the same sampling settings
(a seed per request, as the worker sets them) and the very same engine: one ``vllm.LLM``, which the worker's
``generate.run`` borrows. Their outputs must be identical token for token, or the run fails (exit 1): then they
did not do the same work. The worker's time is its whole ``run`` (reading the dataset, templating and tokenizing,
generating, decoding, writing the shard and its record); the bare side's is the ``LLM.generate`` call alone.
Sides alternate, several times; each counts at its fastest repeat (robust to other work on a shared machine);
the median of the repeats' own ratios is printed too. Output tokens/s = sampled tokens / seconds. Reference
scoring (``--score-reference``) is timed apart, in one more worker run whose scored shard is kept: a scoring call
leaves the engine's cache in another state, which would tilt the next timed generation either way.

By default a tiny random Llama (about 2.6 M parameters) and prompts from ``spin_k8s.workers.tiny`` are made
here and run on this CPU; ``--model`` and ``--data`` take an existing model directory and SFT dataset (that is how
bench/gpu_check.sh runs it on a GPU).

    .venv/bin/python bench/bench_generate.py                 # ~2 minutes on 2 cores
    .venv/bin/python bench/bench_generate.py --prompts 256 --max-tokens 128 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from spin_k8s.workers import data, generate, tiny


def bare(engine: generate.VllmEngine, prompts: list[list[int]], sampling: generate.Sampling) -> tuple[float, Any]:
    """Seconds and outputs of plain ``LLM.generate`` on token-id prompts, one seeded request per prompt."""
    vllm = generate.import_vllm()
    params = [vllm.SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                  max_tokens=sampling.max_tokens, seed=sampling.seed + k) for k in range(len(prompts))]
    inputs = [vllm.inputs.TokensPrompt(prompt_token_ids=p) for p in prompts]
    began = time.monotonic()
    outputs = engine.llm.generate(inputs, params, use_tqdm=False)
    return time.monotonic() - began, outputs


def worker(engine: generate.VllmEngine, settings: generate.GenerateSettings) -> tuple[float, dict[str, Any]]:
    """Seconds of the worker's ``run`` on the borrowed engine and its logged events, by name."""
    log = io.StringIO()
    began = time.monotonic()
    with contextlib.redirect_stdout(log):
        assert generate.run(settings, engine) == 0
    seconds = time.monotonic() - began
    events = {e["event"]: e for e in map(json.loads, log.getvalue().splitlines()) if "event" in e}
    return seconds, events


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example: .venv/bin/python bench/bench_generate.py --prompts 256")
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: a tiny random Llama)")
    parser.add_argument("--data", default=None, help="SFT dataset (default: tiny prompts, as many as --prompts)")
    parser.add_argument("--prompts", type=int, default=128, help="prompts with the tiny data (default 128)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per response (default 64)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each side, alternating (default 5)")
    parser.add_argument("--max-prompt-length", type=int, default=512, help="(default 512)")
    parser.add_argument("--max-length", type=int, default=1024, help="(default 1024)")
    parser.add_argument("--output", type=Path, default=None, help="keep the worker's shards here; the one in "
                        "scored/ is a scored synthetic set (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here, as JSON")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="spin-bench-gen-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = args.model
        if model_dir is None:
            corpus = [m["content"] for row in tiny.sft_rows(512, seed=1) for m in row["messages"]]
            config = tiny.TinyConfig(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2)
            model_dir = tiny.build_model(tmp / "model", corpus, config, seed=0)
        dataset = args.data or str(tiny.write_sft_dataset(tmp / "sft.jsonl", args.prompts, seed=0))
        output = args.output or tmp / "synthetic"
        settings = generate.settings_from_args([
            "--model", str(model_dir), "--data", dataset, "--output", str(output / "scored"), "--run-name", "bench",
            "--max-tokens", str(args.max_tokens), "--temperature", str(args.temperature), "--score-reference",
            "--max-prompt-length", str(args.max_prompt_length), "--max-length", str(args.max_length)])
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        examples = data.load_sft(dataset).examples
        prompts = [data.encode_prompt(tok, ex.prompt, settings.max_prompt_length) for ex in examples]
        sampling = generate.Sampling(settings.temperature, settings.top_p, settings.max_tokens,
                                     generate.shard_seed(settings.run_name, settings.iteration, 0))
        started = time.monotonic()
        engine = generate.open_engine(settings, model_dir, tok)
        assert isinstance(engine, generate.VllmEngine)
        startup = time.monotonic() - started
        try:
            bare(engine, prompts[:8], sampling)  # warm-up: first-call allocations are no one's cost
            times: dict[str, list[float]] = {"bare": [], "worker": []}
            for repeat in range(args.repeats):
                last = dataclasses.replace(settings, output=str(output / f"unscored-{repeat}"), score_reference=False)
                for side in ("bare", "worker") if repeat % 2 == 0 else ("worker", "bare"):  # neither always first
                    if side == "bare":
                        seconds, outputs = bare(engine, prompts, sampling)
                    else:
                        seconds, _ = worker(engine, last)
                    times[side].append(seconds)
                print(f"repeat {repeat + 1}/{args.repeats}: bare {times['bare'][-1]:.2f} s, worker "
                      f"{times['worker'][-1]:.2f} s", flush=True)
            _, events = worker(engine, dataclasses.replace(settings, output=str(output / "scored")))
            scoring = events["scored"]["seconds"]
            ours = [row.generated_ids for row, _ in data.load_synthetic(last.output).rows]
            eos = tok.eos_token_id
            theirs = [[t for t in o.outputs[0].token_ids if t != eos] for o in outputs]  # eos only ever ends one
            if ours != theirs:
                raise SystemExit("FAILED: the worker's samples differ from bare vLLM's: they did not do the same work")
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        finally:
            engine.close()

    best = {side: min(t) for side, t in times.items()}
    result = {
        "prompts": len(prompts), "max_tokens": args.max_tokens, "temperature": args.temperature,
        "output_tokens": tokens, "engine_startup_s": round(startup, 1), "repeats": args.repeats,
        "bare_tokens_per_s": tokens / best["bare"], "worker_tokens_per_s": tokens / best["worker"],
        "ratio": best["bare"] / best["worker"],
        "median_ratio": statistics.median(b / w for b, w in zip(times["bare"], times["worker"], strict=True)),
        "scoring_s": scoring, "scoring_sequences_per_s": 2 * len(prompts) / scoring,
    }
    print(f"\n{len(prompts)} prompts, {tokens} output tokens per run (max {args.max_tokens} each, temperature "
          f"{args.temperature}), one vLLM engine ({engine.version}, started in {startup:.0f} s), best of "
          f"{args.repeats}:")
    print(f"  bare vllm.LLM.generate   {result['bare_tokens_per_s']:10.0f} output tokens/s")
    print(f"  generation worker        {result['worker_tokens_per_s']:10.0f} output tokens/s "
          "(reading, templating, generating, decoding, writing)")
    print(f"  reference scoring        {result['scoring_s']:10.2f} s for {2 * len(prompts)} sequences "
          f"({result['scoring_sequences_per_s']:.0f} sequences/s), timed apart")
    print(f"ratio worker / bare: {result['ratio']:.3f}x best, {result['median_ratio']:.3f}x median of the repeats "
          "(target >= 0.95x)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":  # vLLM spawns processes that re-import this module
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as the worker: skips interpreter teardown, where vLLM's CPU build sometimes aborts
