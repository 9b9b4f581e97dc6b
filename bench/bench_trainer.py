"""Benchmark: the SPIN training worker against TRL's DPOTrainer configured as SPIN, on this CPU, like for like.

Both train the same tiny Llama (about 2.6 M parameters, first taught by a short SFT warm-up to answer in the
data's style and stop), on the same pairs (real = the human answer, generated = the warmed-up model's sample),
for the same steps and batch size, one process each, fp32, RMSProp, linear schedule, no dropout. TRL runs as
SPIN: loss ``sigmoid``, chosen = real, rejected = generated, and ``precompute_ref_log_probs=True`` (the
reference log-probs computed once before training, no reference model in the steps). Ours runs as the Job would:
the generation worker's precomputed reference log-probs. Batches are length-grouped on both sides (transformers'
``LengthGroupedSampler`` for TRL, ``--length-grouping`` for ours) or on neither (``--length-grouping off``).

Before any timing the two must agree, or the run fails (exit 1): TRL's mean log-probs of the real and generated
answers at the starting weights equal ours (same tokens, same masking); after training, both step-0 losses are
ln 2. Throughput is the real (non-padding) tokens of all pairs processed divided by the summed time of the training
steps (start-up, tokenization and reference precomputation excluded for both). The trainers run in turn, several
times; "best" counts each step at its fastest repeat (robust to other work on a shared machine), "median" is the
median total. The ratio is measured in one run, against TRL in the same run.

    .venv/bin/python bench/bench_trainer.py               # ~5 minutes on 2 cores
    .venv/bin/python bench/bench_trainer.py --pairs 64 --epochs 1 --length-grouping off
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from spin_k8s import storage
from spin_k8s.workers import batching, data, generate, tiny, train

MAX_LENGTH = 1024
MAX_PROMPT_LENGTH = 512
LEARNING_RATE = 1e-5
BETA = 0.1


def sft_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Pairs of 1-10 of the tiny dataset's questions and answers each, so lengths vary as in real data."""
    rng = random.Random(seed)
    pool = tiny.sft_rows(4 * n, seed)
    rows = []
    for _ in range(n):
        picked = rng.sample(pool, rng.randint(1, 10))
        turns = [row["messages"] for row in picked]
        rows.append({"prompt": " ".join(t[0]["content"] for t in turns),
                     "response": " ".join(t[1]["content"] for t in turns)})
    return rows


def warm_up(model_dir: Path, rows: list[dict[str, str]], steps: int) -> None:
    """A short supervised fine-tune of the random model on the rows (response tokens only), saved in place:
    SPIN starts from an SFT model, and only a model that learnt to stop gives realistic sample lengths."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    examples = []  # (input ids, labels): the prompt is context only (-100), the response is learnt
    for row in rows:
        prompt = data.encode_prompt(tok, row["prompt"], MAX_PROMPT_LENGTH)
        response = data.encode_response(tok, row["prompt"], row["response"], room(len(prompt)))
        examples.append((prompt + response, [-100] * len(prompt) + response))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        chunk = random.Random(step).sample(examples, 16)
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.tensor([ids + [tok.pad_token_id] * (width - len(ids)) for ids, _ in chunk])  # (B, T)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk])  # (B, T)
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])  # (B, T)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  sft warm-up step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    model.save_pretrained(model_dir)


def room(prompt_len: int) -> int:
    return data.response_room(MAX_LENGTH, prompt_len, MAX_LENGTH - MAX_PROMPT_LENGTH)


def make_synthetic(model_dir: Path, data_path: Path, out: Path) -> tuple[Path, list[data.SyntheticRow]]:
    """The generation worker's output (transformers engine, scored), with each sample re-tokenized from its
    text: TRL only takes text, and both trainers must score the same tokens. TRL appends the end-of-turn token to
    every answer, so every sample here counts as ended (ours appends none to a sample cut at the token limit)."""
    generated = out / "sampled"
    code = generate.main(["--model", str(model_dir), "--data", str(data_path), "--output", str(generated),
                          "--engine", "transformers", "--max-tokens", "256", "--run-name", "bench",
                          "--max-length", str(MAX_LENGTH), "--max-prompt-length", str(MAX_PROMPT_LENGTH)])
    assert code == 0
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [dataclasses.replace(row, generated_ids=tok(row.generated, add_special_tokens=False)["input_ids"],
                                length_stopped=False)
            for row, _ in data.load_synthetic(str(generated)).rows]
    # Reference log-probs as the generation worker computes them (its engine, its sequence layout).
    settings = generate.settings_from_args(["--model", str(model_dir), "--data", "-", "--output", "-",
                                            "--max-length", str(MAX_LENGTH)])
    engine = generate.TransformersEngine(model_dir, settings, tok)
    prompts = [data.encode_prompt(tok, r.prompt, MAX_PROMPT_LENGTH) for r in rows]
    responses: list[str | list[int]] = [*(r.real for r in rows), *(r.generated_ids for r in rows)]
    sequences = [p + data.encode_response(tok, r.prompt, resp, room(len(p)))
                 for p, r, resp in zip(prompts * 2, rows * 2, responses, strict=True)]
    scores = engine.score(sequences, [len(p) for p in prompts * 2])
    rows = [dataclasses.replace(r, ref_real_logp=scores[k], ref_generated_logp=scores[len(rows) + k])
            for k, r in enumerate(rows)]
    body = "".join(r.to_json() + "\n" for r in rows).encode()
    final = out / "synthetic"
    storage.write_bytes(str(final / data.shard_name(0, 1)), body)
    record = data.load_synthetic(str(generated)).rows[0][1]
    storage.write_bytes(str(final / data.done_name(0, 1)), dataclasses.replace(
        record, rows=len(rows), sha256=storage.sha256_bytes(body), scored=True).to_json().encode())
    return final, rows


def run_ours(model_dir: Path, synthetic: Path, out: Path, batch: int, steps: int, grouped: bool,
             threads: int) -> dict[str, Any]:
    """One run of the training worker as a process of its own, with the shards' reference log-probs; its
    metrics.json."""
    args = [sys.executable, "-m", "spin_k8s.workers.train", "--model", str(model_dir), "--synthetic",
            f"0={synthetic}", "--output", str(out), "--zero-stage", "0", "--precision", "fp32",
            "--learning-rate", str(LEARNING_RATE), "--beta", str(BETA), "--warmup-ratio", "0.1",
            "--micro-batch-size", str(batch), "--max-steps", str(steps), "--no-gradient-checkpointing",
            "--reference", "precomputed", "--max-length", str(MAX_LENGTH),
            "--max-prompt-length", str(MAX_PROMPT_LENGTH), "--length-grouping" if grouped else "--no-length-grouping"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads),
           "SPIN_CACHE_DIR": str(out.parent / "cache")}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"our trainer failed:\n{proc.stderr[-4000:]}")
    metrics: dict[str, Any] = json.loads((out / "metrics.json").read_text())
    if metrics["reference"]["precomputed"] != metrics["pairs"] or (metrics["reference_check"] or {}).get("fallback"):
        raise SystemExit(f"our trainer did not use the shards' reference log-probs: {metrics['reference']}")
    return metrics


class StepTimer(TrainerCallback):
    """The wall time of each of TRL's training steps, excluding its set-up and evaluation: from one step's end to
    the next's, so that a step counts fetching and collating its batch, as our worker's steps do (the Trainer
    fetches a step's batch before its ``on_step_begin``); the first step from its ``on_step_begin``."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._last: float | None = None

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        if self._last is None:
            self._last = time.monotonic()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        now = time.monotonic()
        assert self._last is not None
        self.seconds.append(now - self._last)
        self._last = now


def trl_trainer(model_dir: Path, rows: list[data.SyntheticRow], tok: PreTrainedTokenizerBase, out: Path,
                batch: int, steps: int, grouped: bool, timer: StepTimer) -> Any:
    """TRL's DPOTrainer as SPIN with precomputed reference log-probs (computed here, before any step)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class LengthGroupedDPOTrainer(DPOTrainer):
        """transformers' length-grouped sampler, which infers lengths from an ``input_ids`` column a DPO dataset
        does not have: here from its token columns."""

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            ds = self.train_dataset if train_dataset is None else train_dataset
            lengths = [len(p) + max(len(c), len(r))
                       for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], strict=True)]
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=lengths)

    # Text as TRL wants it: the same chat-template prompt; TRL appends the eos token to both answers.
    dataset = Dataset.from_list([{"prompt": data.prompt_text(tok, r.prompt), "chosen": r.real,
                                  "rejected": tok.decode(r.generated_ids)} for r in rows])
    config = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=batch, per_device_eval_batch_size=batch, max_steps=steps,
        learning_rate=LEARNING_RATE, lr_scheduler_type="linear", warmup_steps=0.1, optim="rmsprop",
        max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"], max_length=MAX_LENGTH, bf16=False, use_cpu=True,
        gradient_checkpointing=False, report_to=[], logging_steps=1, save_strategy="no", seed=42,
        precompute_ref_log_probs=True, disable_dropout=True, dataloader_num_workers=0, disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer_class = LengthGroupedDPOTrainer if grouped else DPOTrainer
    return trainer_class(model=model, ref_model=None, args=config, train_dataset=dataset, eval_dataset=dataset,
                         processing_class=tok, callbacks=[timer])


def run_trl(model_dir: Path, rows: list[data.SyntheticRow], tok: PreTrainedTokenizerBase, out: Path,
            batch: int, steps: int, grouped: bool) -> dict[str, Any]:
    """One TRL run in this process: per-step seconds and losses."""
    timer = StepTimer()
    trainer = trl_trainer(model_dir, rows, tok, out, batch, steps, grouped, timer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": timer.seconds, "losses": losses}


def our_logps(model_dir: Path, synthetic: Path) -> tuple[float, float]:
    """Mean summed log-prob of the real and of the generated responses under the starting model, computed
    with the trainer's own tokenization and helper."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    settings = train.settings_from_args(["--model", "-", "--output", "-", "--synthetic", "0=-"])
    pairs = train.load_pairs([str(synthetic)], tok, settings, "")
    with torch.no_grad():
        logps = train.batch_logps(model, batching.collate(pairs, tok.pad_token_id))  # (2N,) real first
    return logps[:len(pairs)].mean().item(), logps[len(pairs):].mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example: .venv/bin/python bench/bench_trainer.py --pairs 128 --epochs 2")
    parser.add_argument("--pairs", type=int, default=128, help="training pairs (default 128)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step (default 8)")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the pairs (default 2)")
    parser.add_argument("--warm-up-steps", type=int, default=80, help="SFT steps before generating (default 80)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each trainer, alternating (default 3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    parser.add_argument("--length-grouping", choices=("on", "off"), default="on",
                        help="length-grouped batches on both sides, or on neither (default on)")
    args = parser.parse_args()
    grouped = args.length_grouping == "on"
    torch.set_num_threads(args.threads)
    steps = args.epochs * (args.pairs // args.batch)  # whole epochs: both process every pair equally often

    with tempfile.TemporaryDirectory(prefix="spin-bench-") as tmp_name:
        tmp = Path(tmp_name)
        rows = sft_rows(args.pairs, seed=0)
        data_path = tmp / "sft.jsonl"
        data_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        corpus = [text for r in sft_rows(512, seed=1) for text in r.values()]
        config = tiny.TinyConfig(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2)
        model_dir = tiny.build_model(tmp / "model", corpus, config, seed=0)
        tok = AutoTokenizer.from_pretrained(model_dir)
        params = AutoModelForCausalLM.from_pretrained(model_dir).num_parameters()
        print(f"model: {params / 1e6:.2f} M parameters; {args.pairs} pairs, {steps} steps of {args.batch} pairs, "
              f"{args.threads} threads", flush=True)
        warm_up(model_dir, rows, args.warm_up_steps)
        synthetic, synthetic_rows = make_synthetic(model_dir, data_path, tmp)

        pairs = train.load_pairs([str(synthetic)], tok, train.settings_from_args(
            ["--model", "-", "--output", "-", "--synthetic", "0=-"]), "")
        tokens_per_epoch = sum(len(p.real) + len(p.generated) for p in pairs)
        lengths = [len(p.generated) - p.prompt_len for p in pairs]
        print(f"generated response tokens: min {min(lengths)}, mean {sum(lengths) / len(lengths):.0f}, "
              f"max {max(lengths)}; {tokens_per_epoch} tokens per epoch", flush=True)
        tokens = tokens_per_epoch * args.epochs

        # Agreement first: a trainer that scores other tokens than ours would make the ratio meaningless.
        real_logp, generated_logp = our_logps(model_dir, synthetic)
        initial = trl_trainer(model_dir, synthetic_rows, tok, tmp / "trl-check", args.batch, steps, grouped,
                              StepTimer()).evaluate()  # at the starting weights
        print("\ncross-check at the starting weights:")
        print(f"  mean log p(real):      ours {real_logp:.5f}  TRL {initial['eval_logps/chosen']:.5f}")
        print(f"  mean log p(generated): ours {generated_logp:.5f}  TRL {initial['eval_logps/rejected']:.5f}")
        if not (abs(real_logp - initial["eval_logps/chosen"]) < 1e-3
                and abs(generated_logp - initial["eval_logps/rejected"]) < 1e-3):
            raise SystemExit("FAILED: TRL's log-probs of the pairs differ from ours: the trainers do not score the "
                             "same tokens, so their speeds cannot be compared")

        # The machine may be shared: runs alternate, and each step counts at its fastest of the repeats (the
        # data order is fixed, so step k processes the same pairs in every repeat of a trainer).
        step_seconds: dict[str, list[list[float]]] = {"ours": [], "trl": []}
        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1}/{args.repeats}: ours, TRL DPOTrainer ...", flush=True)
            ours = run_ours(model_dir, synthetic, tmp / f"ours-{repeat}", args.batch, steps, grouped, args.threads)
            trl = run_trl(model_dir, synthetic_rows, tok, tmp / f"trl-{repeat}", args.batch, steps, grouped)
            step_seconds["ours"].append([h["seconds"] for h in ours["history"]])
            step_seconds["trl"].append(trl["seconds"])

        print(f"  step-0 loss:           ours {ours['history'][0]['loss']:.6f}  TRL {trl['losses'][0]:.6f}  "
              f"(ln 2 = {math.log(2):.6f})")
        if not (abs(ours["history"][0]["loss"] - math.log(2)) < 1e-5 and abs(trl["losses"][0] - math.log(2)) < 1e-5):
            raise SystemExit("FAILED: a step-0 loss is not ln 2: policy and reference differ at the start")

        best = {name: sum(min(run[k] for run in runs) for k in range(steps)) for name, runs in step_seconds.items()}
        median = {name: statistics.median(sum(run) for run in runs) for name, runs in step_seconds.items()}
        print(f"\ntokens/s over {steps} steps ({tokens} real tokens, padding excluded), {args.repeats} repeats, "
              f"length grouping {args.length_grouping} on both sides, precomputed reference on both sides:")
        print(f"  {'':30s} {'best':>10s} {'median':>10s}")
        for name, label in (("ours", "ours (training worker)"), ("trl", "TRL DPOTrainer as SPIN")):
            print(f"  {label:30s} {tokens / best[name]:10.0f} {tokens / median[name]:10.0f}")
        print(f"ratio ours / TRL: best {best['trl'] / best['ours']:.2f}x, "
              f"median {median['trl'] / median['ours']:.2f}x (target >= 1.3x)")
        print(f"final loss: ours {ours['history'][-1]['loss']:.4f}, TRL {trl['losses'][-1]:.4f}")

if __name__ == "__main__":
    main()
