"""The demo's experiment: per seed, a converged SFT model, and from it, at equal training compute, SPIN
iterations through the local executor, continued SFT two ways, and the SFT model sampled at lower
temperatures; every model scored by its exact distance to the task's p_data.

Flow of one seed (``run_seed``), all under ``{out}/seed-{seed}/``:

1. ``task.build`` -> the seed's distribution; ``task.draw`` -> the training pairs (``train.jsonl``: the SFT
   data and SPIN's data), validation pairs (early stopping) and fresh held-out pairs (the paper's quantities);
2. a word-level tokenizer and a tiny Llama (``model.build``) -> SFT to convergence (``sft_to_convergence``:
   runs of ``sft.train`` with the validation NLL measured regularly and the best checkpoint kept, repeated from
   that checkpoint until a run no longer lowers it): the SFT model, iteration 0 of every arm;
3. the precondition, before any comparison: continued SFT from that model for SPIN's whole training compute,
   once at the SFT learning rate and once with SPIN's optimizer and learning rate (the two continued-SFT arms,
   one point per SPIN iteration), must not improve the validation NLL, the exact NLL or the TV distance beyond
   the tolerances (``Precondition``). If one does, the SFT model was not converged: the best such model becomes
   the SFT model and the check runs again (at most ``max_rounds`` times, then the report says "not converged");
4. SPIN: a SpinRun on the SFT model and ``train.jsonl`` run to its end by ``local.run`` (the product's own
   generation and training workers, storage and lineage; the transformers engine); iteration t's model is
   ``naming.model_uri(prefix, t)``, its training-time paper metrics come from the lineage's train record;
5. every model's exact metrics (``evaluate.exact``) at the report's temperatures, and for SPIN the paper's
   quantities on the fresh held-out pairs.

Equal compute: SPIN iteration t runs ``epochs * (pairs_t // global_batch)`` optimizer steps of ``global_batch``
pairs, 2 sequences each (real and generated); a continued-SFT iteration runs as many steps of twice as many
human sequences. SPIN's generation is extra, not charged to it. The steps are planned from the spec before
SPIN runs (``spin_steps``) and checked against the lineage after.

``run_demo`` runs the seeds and returns the report (``report.build``), which it also writes with its plots.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from spin_k8s import lineage, local, naming, planner, storage
from spin_k8s.demo import evaluate, model, report, sft, task

Emit = Callable[[str], None]
TEMPERATURES = (1.0, 0.9, 0.8, 0.7, 0.6)  # 1.0 first: the temperature every arm is compared at
# The executor's per-step training lines: many per iteration; the demo shows the iteration summaries instead.
_STEP_LINE = re.compile(r"\] step \d+:")


class DemoError(RuntimeError):
    """The demo cannot go on (a SPIN run that did not succeed); the message is one line for the user."""


@dataclass(frozen=True)
class SpinSettings:
    """The SpinRun's knobs the demo sets; everything else keeps the CRD's defaults."""

    learning_rate: float = 1e-4  # AdamW peak
    beta: float = 0.1  # the paper's (iterations 0-2)
    epochs: int = 2  # passes over each iteration's pairs (the paper's)
    temperature: float = 1.0  # sampling temperature of the opponent (the authors' vLLM script)
    per_device_batch_size: int = 16  # pairs per rank per step; x nproc ranks = the global batch
    keep_previous: int = 1  # previous iterations' synthetic sets mixed in (the paper's)
    engine: str = "transformers"  # a vLLM engine start costs more than generating the whole set here
    max_tokens: int = 8  # new tokens per answer: the longest valid answer has 3 words and the end token


@dataclass(frozen=True)
class Precondition:
    """How much a continued-SFT model may improve on the SFT model before the SFT model counts as not converged.
    An improvement below a tolerance is within the noise of training (see docs/demo-report.md)."""

    tv: float = 0.01  # exact TV distance, absolute
    nll: float = 0.02  # exact expected NLL of a human answer, nats
    validation_se: float = 2.0  # validation NLL: beyond the nll tolerance and this many standard errors of the
    # paired per-answer difference
    max_rounds: int = 1  # SFT "trained further" from a continued-SFT model this many times at most


@dataclass(frozen=True)
class DemoSettings:
    task: task.TaskConfig
    model: model.ModelConfig
    sft: sft.SftConfig  # the initial SFT (to convergence); its learning rate also drives one continued-SFT arm
    spin: SpinSettings
    iterations: int
    train_pairs: int  # human pairs: the SFT data and SPIN's prompts and real answers
    validation_pairs: int  # early stopping and the precondition's validation NLL
    heldout_pairs: int  # fresh pairs for the paper's quantities
    precondition: Precondition = field(default_factory=Precondition)
    sft_cycles: int = 3  # further SFT runs from the best checkpoint, at most (``sft_to_convergence``)
    nproc: int = 2  # training ranks (torchrun processes) of each SPIN iteration
    # torch threads of this process (SFT and evaluation), one like each worker rank: on 2 cores shared with other
    # work, 2 threads ran the SFT loop 10x slower than 1 (OpenMP threads spinning for a busy core).
    threads: int = 1

    @property
    def global_batch(self) -> int:
        return self.spin.per_device_batch_size * self.nproc


def default_settings(iterations: int = 3, quick: bool = False, spin: SpinSettings | None = None) -> DemoSettings:
    """The demo's settings. ``quick``: fewer pairs, shorter runs, for tests and a first look."""
    if quick:
        return DemoSettings(
            task=task.TaskConfig(), model=model.ModelConfig(),
            sft=sft.SftConfig(steps=300, batch_size=64, learning_rate=3e-3, warmup_ratio=0.05, eval_every=25),
            spin=spin or SpinSettings(epochs=1), iterations=iterations,
            train_pairs=1000, validation_pairs=1000, heldout_pairs=256)
    # 2000 pairs are about 12 per prompt. In the tuning runs the validation NLL was lowest after 350-450 steps of 64
    # (lr 1e-3 or 3e-3) and rose after it (over-fitting), the model still putting a fifth of its mass on invalid
    # answers; 3e-3 over 400 steps ended closest to p_data.
    return DemoSettings(
        task=task.TaskConfig(), model=model.ModelConfig(),
        sft=sft.SftConfig(steps=400, batch_size=64, learning_rate=3e-3, warmup_ratio=0.05, eval_every=25),
        spin=spin or SpinSettings(), iterations=iterations,
        train_pairs=2000, validation_pairs=2000, heldout_pairs=512)


def spin_steps(s: DemoSettings) -> list[int]:
    """Optimizer steps of each SPIN iteration, as the training worker counts them: iteration t trains on its
    own synthetic set plus ``keep_previous`` earlier ones (one pair per training row each), whole global
    batches only, ``epochs`` times."""
    return [s.spin.epochs * (s.train_pairs * (1 + min(t, s.spin.keep_previous)) // s.global_batch)
            for t in range(s.iterations)]


def spin_run(name: str, model_dir: Path, dataset: Path, s: DemoSettings) -> dict[str, Any]:
    """The SpinRun object the demo hands to the local executor (storage: the executor's default)."""
    g, t = s.spin, s.sft
    return {
        "apiVersion": "selfplay.dev/v1alpha1", "kind": "SpinRun", "metadata": {"name": name},
        "spec": {
            "model": f"file://{model_dir.resolve()}", "dataset": f"file://{dataset.resolve()}",
            "iterations": s.iterations, "keepPreviousIterations": g.keep_previous,
            "generation": {"engine": g.engine, "shards": 1, "gpusPerShard": 0, "maxTokens": g.max_tokens,
                           "temperature": g.temperature},
            "training": {"nodes": 1, "gpusPerNode": 0, "zeroStage": 0, "precision": "fp32",
                         "optimizer": "adamw", "learningRate": g.learning_rate, "beta": g.beta, "epochs": g.epochs,
                         "perDeviceBatchSize": g.per_device_batch_size, "maxLength": t.max_length,
                         "maxPromptLength": t.max_prompt_length, "gradientCheckpointing": False,
                         # no mid-iteration checkpoint: each costs seconds here, and a demo is rerun, not resumed
                         "checkpointEverySteps": max(spin_steps(s)) + 1},
        },
    }


def last_epoch_means(metrics: dict[str, Any], epochs: int) -> dict[str, float]:
    """The paper's metrics averaged over the last epoch of an iteration's steps (one step is one batch: noisy)."""
    history = metrics["history"]
    per_epoch = max(1, len(history) // max(1, epochs))
    tail = history[-per_epoch:]
    return {k: sum(float(h[k]) for h in tail) / len(tail) for k in report.PAPER}


@dataclass
class Seed:
    """What one seed's steps share: the task, its pairs and enumeration, and where its files go."""

    seed: int
    out: Path
    s: DemoSettings
    say: Emit
    distribution: task.Task
    train: list[task.Pair]
    validation: list[task.Pair]
    heldout: list[task.Pair]
    enumeration: evaluate.Enumeration | None = None
    validation_nll: dict[Path, list[float]] = field(default_factory=dict)

    @staticmethod
    def texts(pairs: Sequence[task.Pair]) -> list[tuple[str, str]]:
        return [(p.prompt.text, p.response) for p in pairs]

    def point(self, arm: str, iteration: int, model_dir: Path) -> dict[str, Any]:
        """One model's exact metrics at T = 1 (flat) and at every temperature, and its validation NLL."""
        from transformers import AutoTokenizer

        if self.enumeration is None:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self.enumeration = evaluate.enumerate_task(self.distribution, tokenizer, self.train,
                                                       self.s.sft.max_prompt_length)
        by_t = evaluate.exact(model_dir, self.enumeration, TEMPERATURES)
        values = sft.nll(model_dir, self.texts(self.validation), self.s.sft)
        self.validation_nll[model_dir] = values
        return {"arm": arm, "iteration": iteration, "model": str(model_dir), **by_t[1.0],
                "validation_nll": sum(values) / len(values),
                "temperatures": {str(t): m for t, m in by_t.items()}}


def improvement(base: dict[str, Any], other: dict[str, Any], base_nll: Sequence[float],
                other_nll: Sequence[float], p: Precondition) -> list[str]:
    """The ways ``other`` beats ``base`` beyond the precondition's tolerances (empty: it does not)."""
    out = []
    if base["tv"] - other["tv"] > p.tv:
        out.append(f"TV {base['tv']:.4f} -> {other['tv']:.4f}")
    if base["nll"] - other["nll"] > p.nll:
        out.append(f"exact NLL {base['nll']:.4f} -> {other['nll']:.4f}")
    diff, se = evaluate.mean_and_se([a - b for a, b in zip(base_nll, other_nll, strict=True)])
    if diff > max(p.nll, p.validation_se * se):
        out.append(f"validation NLL -{diff:.4f} ({diff / se:.1f} standard errors)")
    return out


def continued_sft(c: Seed, start: dict[str, Any], arm: str, learning_rate: float, directory: Path
                  ) -> list[dict[str, Any]]:
    """One continued-SFT arm from the model of ``start``: per SPIN iteration, SPIN's steps with twice its
    global batch of human sequences, AdamW at ``learning_rate`` with SPIN's per-iteration schedule."""
    points = [start]
    previous = Path(start["model"])
    for t, steps in enumerate(spin_steps(c.s)):
        config = replace(c.s.sft, steps=steps, batch_size=2 * c.s.global_batch, learning_rate=learning_rate,
                         seed=c.seed * 1000 + t + 1)
        out = directory / arm / f"i{t}"
        done = sft.train(previous, out, c.texts(c.train), config)
        point = c.point(arm, t + 1, out)
        point.update(steps=done.steps, sequences=done.sequences, tokens=done.tokens, train_seconds=done.seconds)
        points.append(point)
        previous = out
        c.say(f"{report.ARM_NAMES[arm]} {t}: TV {point['tv']:.4f}, invalid {point['invalid']:.1%}, "
              f"NLL {point['nll']:.4f}, validation NLL {point['validation_nll']:.4f}")
    return points


def sft_to_convergence(c: Seed) -> tuple[Path, list[dict[str, Any]]]:
    """The SFT model: a first run keeping its best checkpoint by validation NLL, then further cycles of the same
    schedule (``cycle_steps`` steps: warmup, decay to 0) from the best so far, until a cycle lowers the validation
    NLL by no more than the precondition's tolerance. Returns the model and each run's record."""
    s = c.s
    model_dir, config = c.out / "sft-0", replace(s.sft, seed=c.seed)
    runs = []
    for k in range(s.sft_cycles + 1):
        source, model_dir = model_dir if k else c.out / "base", c.out / f"sft-{k}"
        result = sft.train(source, model_dir, c.texts(c.train), config, c.texts(c.validation))
        gain = result.curve[0][1] - min(v for _, v in result.curve)
        runs.append({"steps": config.steps, "best_step": result.best_step, "curve": result.curve,
                     "seconds": result.seconds})
        c.say(f"SFT run {k}: lowest validation NLL {result.curve[0][1] - gain:.4f} at step {result.best_step} of "
              f"{config.steps} ({result.seconds:.0f} s)")
        if k and gain <= s.precondition.nll:
            break
        config = replace(s.sft, steps=spin_steps(s)[0], eval_every=max(1, spin_steps(s)[0] // 5), seed=c.seed + k + 1)
    return model_dir, runs


def trained_further(start: dict[str, Any], arms: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The next SFT model when the precondition fails: the continued-SFT model with the lowest validation NLL,
    its SFT record extended by the continued run that made it (steps and sequences count from the base model)."""
    arm, points = min(((a, points[:t + 1]) for a, points in arms.items() for t in range(1, len(points))),
                      key=lambda ap: ap[1][-1]["validation_nll"])
    best, steps = points[-1], sum(p["steps"] for p in points[1:])
    return {**best, "arm": "sft", "iteration": 0, "steps": start["steps"] + steps,
            "sequences": start["sequences"] + sum(p["sequences"] for p in points[1:]),
            "sft_runs": [*start["sft_runs"], {"continued": arm, "steps": steps, "best_step": steps}]}


def converge(c: Seed) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """The SFT model, the two continued-SFT arms from it, and the precondition's record (see the docstring)."""
    s = c.s
    model_dir, runs = sft_to_convergence(c)
    start = c.point("sft", 0, model_dir)
    start.update(steps=sum(r["best_step"] for r in runs), sft_runs=runs,
                 sequences=sum(r["best_step"] for r in runs) * s.sft.batch_size)
    assert c.enumeration is not None  # made by the first point
    c.say(f"SFT model: TV {start['tv']:.4f}, invalid {start['invalid']:.1%}, NLL {start['nll']:.4f} "
          f"(entropy of p_data {c.enumeration.entropy:.4f})")
    rounds: list[dict[str, Any]] = []
    for r in range(s.precondition.max_rounds + 1):
        directory = c.out / f"continued-{r}"
        arms = {"sft-lr": continued_sft(c, start, "sft-lr", s.sft.learning_rate, directory),
                "sft-spinopt": continued_sft(c, start, "sft-spinopt", s.spin.learning_rate, directory)}
        base_nll = c.validation_nll[Path(start["model"])]
        found = {f"{arm} iteration {p['iteration']}": ways for arm, points in arms.items() for p in points[1:]
                 if (ways := improvement(start, p, base_nll, c.validation_nll[Path(p["model"])], s.precondition))}
        rounds.append({"model": start["model"], "improved_by": found})
        if not found:
            c.say("precondition met: continued SFT does not improve on the SFT model")
            return start, arms, {"met": True, "rounds": rounds}
        c.say(f"precondition NOT met (round {r}): " + "; ".join(f"{k}: {', '.join(v)}" for k, v in found.items()))
        if r == s.precondition.max_rounds:
            break
        start = trained_further(start, arms)
    c.say("not converged: the comparison does not test the paper's claim")
    return start, arms, {"met": False, "rounds": rounds}


def run_spin(c: Seed, start: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """SPIN through the local executor from the SFT model; its points and the run's record."""
    s = c.s
    began = time.monotonic()
    dataset = task.write_jsonl(c.out / "train.jsonl", c.train)
    c.say(f"SPIN: {s.iterations} iteration(s) through the local executor")
    result = local.run(spin_run(f"demo-seed-{c.seed}", Path(start["model"]), dataset, s), c.out / "spin",
                       on_event=lambda line: None if _STEP_LINE.search(line) else c.say(f"  {line}"), nproc=s.nproc)
    if result.phase != planner.SUCCEEDED:
        raise DemoError(f"seed {c.seed}: the SPIN run ended {result.phase} ({result.reason}: {result.message}); "
                        f"worker logs in {c.out / 'spin' / 'logs'}")
    seconds = time.monotonic() - began
    steps = lineage.load(lineage.FileStore(Path(storage.parse(result.prefix).key)))
    points, previous = [start], Path(start["model"])
    for t, planned in enumerate(spin_steps(s)):
        metrics = steps[(t, naming.TRAIN)]["metrics"]
        if int(metrics["steps"]) != planned or int(metrics["global_batch"]) != s.global_batch:
            raise DemoError(f"seed {c.seed}: SPIN iteration {t} ran {metrics['steps']} steps of "
                            f"{metrics['global_batch']} pairs, the demo planned {planned} of {s.global_batch}: "
                            "the continued-SFT arms would not have its compute")
        model_dir = Path(storage.parse(naming.model_uri(result.prefix, t)).key)
        point = c.point("spin", t + 1, model_dir)
        history = metrics["history"]
        point.update({f"train/{k}": v for k, v in last_epoch_means(metrics, s.spin.epochs).items()})
        point.update(evaluate.paper_metrics(model_dir, previous, c.heldout, s.spin.beta, seed=c.seed * 1000 + t,
                                            max_prompt_length=s.sft.max_prompt_length, max_length=s.sft.max_length,
                                            max_tokens=s.spin.max_tokens))
        point.update(steps=planned, sequences=2 * planned * s.global_batch,
                     tokens=int(sum(h["tokens"] for h in history)), train_seconds=sum(h["seconds"] for h in history))
        points.append(point)
        previous = model_dir
        c.say(f"SPIN iteration {t}: TV {point['tv']:.4f}, invalid {point['invalid']:.1%}, NLL {point['nll']:.4f}, "
              f"held-out reward accuracy {point['rewards/accuracies']:.3f}, margin {point['rewards/margins']:+.3f}")
    return points, {"prefix": result.prefix, "manifest": result.manifest, "seconds": seconds}


def run_seed(out: Path, seed: int, s: DemoSettings, emit: Emit) -> dict[str, Any]:
    """One seed's SFT model, precondition, SPIN run and continued-SFT arms (see the module docstring)."""
    began = time.monotonic()
    t = task.build(s.task, seed)
    c = Seed(seed, out, s, lambda line: emit(f"[seed {seed}] {line}"), t, task.draw(t, s.train_pairs, "train", seed),
             task.draw(t, s.validation_pairs, "validation", seed), task.draw(t, s.heldout_pairs, "heldout", seed))
    model.build(out / "base", t.words(), s.model, seed)
    start, arms, precondition = converge(c)
    spin_points, spin = run_spin(c, start)
    return {"seed": seed, "spin": spin_points, **arms, "precondition": precondition, **spin,
            "entropy": c.enumeration.entropy if c.enumeration else None, "seconds": time.monotonic() - began}


def run_demo(out: Path, seeds: Sequence[int], iterations: int, quick: bool, on_event: Emit,
             spin: SpinSettings | None = None) -> dict[str, Any]:
    """Runs the demo for ``seeds`` into ``out`` (which must be new or empty) and returns the report, which is
    also written to ``out/report.md``, ``out/report.json`` and the plots."""
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
    on_event(f"report: {out / 'report.md'}, {out / 'report.json'}, plots {out / 'demo.png'}")
    return doc
