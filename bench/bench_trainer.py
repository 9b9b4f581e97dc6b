"""Benchmark: the SPIN training worker against TRL's DPOTrainer configured as SPIN, on this CPU.

Both train the same tiny Llama (about 2.6 M parameters, first taught by a short SFT warm-up to answer in the
data's style and stop), on the same pairs (real = the human answer, generated = the warmed-up model's sample),
for the same steps and batch size, one process each, fp32, RMSProp, linear schedule. TRL runs as SPIN: loss
``sigmoid``, chosen = real, rejected = generated, a frozen reference model. Ours runs as the Job would: the
generation worker's precomputed reference log-probs, length-grouped micro-batches. Ours with a live reference
model is measured too, to separate the two effects.

Throughput is the real (non-padding) tokens of all pairs processed divided by the summed time of the
training steps (start-up, tokenization and reference precomputation excluded for both). The trainers run in
turn, several times; "best" counts each step at its fastest repeat (robust to other work on a shared machine),
"median" is the median total. Before training, the two must agree: TRL's log-probs of the pairs equal ours
(same tokens, same masking), and both step-0 losses are ln 2.

    .venv/bin/python bench/bench_trainer.py               # ~5 minutes on 2 cores
    .venv/bin/python bench/bench_trainer.py --pairs 64 --epochs 1
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
        response = data.encode_response(tok, row["prompt"], row["response"], MAX_LENGTH - len(prompt))
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


def make_synthetic(model_dir: Path, data_path: Path, out: Path) -> tuple[Path, list[data.SyntheticRow]]:
    """The generation worker's output (transformers engine, scored), with each sample re-tokenized from its
    text: TRL only takes text, and both trainers must score the same tokens."""
    generated = out / "sampled"
    code = generate.main(["--model", str(model_dir), "--data", str(data_path), "--output", str(generated),
                          "--engine", "transformers", "--max-tokens", "256", "--run-name", "bench",
                          "--max-length", str(MAX_LENGTH), "--max-prompt-length", str(MAX_PROMPT_LENGTH)])
    assert code == 0
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [dataclasses.replace(row, generated_ids=tok(row.generated, add_special_tokens=False)["input_ids"])
            for row, _ in data.load_synthetic(str(generated)).rows]
    # Reference log-probs as the generation worker computes them (its engine, its sequence layout).
    settings = generate.settings_from_args(["--model", str(model_dir), "--data", "-", "--output", "-",
                                            "--max-length", str(MAX_LENGTH)])
    engine = generate.TransformersEngine(model_dir, settings, tok)
    prompts = [data.encode_prompt(tok, r.prompt, MAX_PROMPT_LENGTH) for r in rows]
    responses: list[str | list[int]] = [*(r.real for r in rows), *(r.generated_ids for r in rows)]
    sequences = [p + data.encode_response(tok, r.prompt, resp, MAX_LENGTH - len(p))
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


def run_ours(model_dir: Path, synthetic: Path, out: Path, reference: str, batch: int, steps: int,
             threads: int) -> dict[str, Any]:
    """One run of the training worker as a process of its own; its metrics.json."""
    args = [sys.executable, "-m", "spin_k8s.workers.train", "--model", str(model_dir), "--synthetic",
            f"0={synthetic}", "--output", str(out), "--zero-stage", "0", "--precision", "fp32",
            "--learning-rate", str(LEARNING_RATE), "--beta", str(BETA), "--warmup-ratio", "0.1",
            "--micro-batch-size", str(batch), "--max-steps", str(steps), "--no-gradient-checkpointing",
            "--reference", reference, "--max-length", str(MAX_LENGTH), "--max-prompt-length", str(MAX_PROMPT_LENGTH)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads),
           "SPIN_CACHE_DIR": str(out.parent / "cache")}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"our trainer failed:\n{proc.stderr[-4000:]}")
    metrics: dict[str, Any] = json.loads((out / "metrics.json").read_text())
    return metrics


class StepTimer(TrainerCallback):
    """The wall time of each of TRL's training steps, excluding its set-up and evaluation."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._began = 0.0

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self._began = time.monotonic()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.seconds.append(time.monotonic() - self._began)


def run_trl(model_dir: Path, rows: list[data.SyntheticRow], tok: PreTrainedTokenizerBase, out: Path,
            batch: int, steps: int) -> dict[str, Any]:
    """One TRL run in this process: per-step seconds, losses, and its evaluation at the starting weights."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    # Text as TRL wants it: the same chat-template prompt; TRL appends the eos token to both answers.
    dataset = Dataset.from_list([{"prompt": data.prompt_text(tok, r.prompt), "chosen": r.real,
                                  "rejected": tok.decode(r.generated_ids)} for r in rows])
    config = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=batch, per_device_eval_batch_size=batch, max_steps=steps,
        learning_rate=LEARNING_RATE, lr_scheduler_type="linear", warmup_steps=0.1, optim="rmsprop",
        max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"], max_length=MAX_LENGTH, bf16=False, use_cpu=True,
        gradient_checkpointing=False, report_to=[], logging_steps=1, save_strategy="no", seed=42,
        precompute_ref_log_probs=False, dataloader_num_workers=0, disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    timer = StepTimer()
    trainer = DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=dataset,
                         eval_dataset=dataset, processing_class=tok, callbacks=[timer])
    initial = trainer.evaluate()  # at the starting weights: the log-probs to cross-check
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": timer.seconds, "initial": initial, "losses": losses}


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
    args = parser.parse_args()
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

        # The machine may be shared: runs alternate, and each step counts at its fastest of the repeats (the
        # data order is fixed, so step k processes the same pairs in every repeat of a trainer).
        step_seconds: dict[str, list[list[float]]] = {"ours": [], "ours-live": [], "trl": []}
        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1}/{args.repeats}: ours (precomputed reference), ours (live reference), "
                  f"TRL DPOTrainer ...", flush=True)
            ours = run_ours(model_dir, synthetic, tmp / f"ours-{repeat}", "precomputed", args.batch, steps,
                            args.threads)
            ours_live = run_ours(model_dir, synthetic, tmp / f"ours-live-{repeat}", "live", args.batch, steps,
                                 args.threads)
            trl = run_trl(model_dir, synthetic_rows, tok, tmp / f"trl-{repeat}", args.batch, steps)
            step_seconds["ours"].append([h["seconds"] for h in ours["history"]])
            step_seconds["ours-live"].append([h["seconds"] for h in ours_live["history"]])
            step_seconds["trl"].append(trl["seconds"])

        real_logp, generated_logp = our_logps(model_dir, synthetic)
        print("\ncross-checks at the starting weights:")
        print(f"  mean log p(real):      ours {real_logp:.5f}  TRL {trl['initial']['eval_logps/chosen']:.5f}")
        print(f"  mean log p(generated): ours {generated_logp:.5f}  TRL {trl['initial']['eval_logps/rejected']:.5f}")
        print(f"  step-0 loss:           ours {ours['history'][0]['loss']:.6f}  TRL {trl['losses'][0]:.6f}  "
              f"(ln 2 = {math.log(2):.6f})")
        agree = (abs(real_logp - trl["initial"]["eval_logps/chosen"]) < 1e-3
                 and abs(generated_logp - trl["initial"]["eval_logps/rejected"]) < 1e-3
                 and abs(ours["history"][0]["loss"] - math.log(2)) < 1e-5
                 and abs(trl["losses"][0] - math.log(2)) < 1e-5)
        print(f"  agree: {agree}")

        best = {name: sum(min(run[k] for run in runs) for k in range(steps)) for name, runs in step_seconds.items()}
        median = {name: statistics.median(sum(run) for run in runs) for name, runs in step_seconds.items()}
        print(f"\ntokens/s over {steps} steps ({tokens} real tokens, padding excluded), {args.repeats} repeats:")
        print(f"  {'':30s} {'best':>10s} {'median':>10s}")
        for name, label in (("ours", "ours, precomputed reference"), ("ours-live", "ours, live reference"),
                            ("trl", "TRL DPOTrainer as SPIN")):
            print(f"  {label:30s} {tokens / best[name]:10.0f} {tokens / median[name]:10.0f}")
        print(f"ratio ours / TRL:                  best {best['trl'] / best['ours']:.2f}x, "
              f"median {median['trl'] / median['ours']:.2f}x (target >= 1.3x)")
        print(f"ratio ours (live reference) / TRL: best {best['trl'] / best['ours-live']:.2f}x, "
              f"median {median['trl'] / median['ours-live']:.2f}x")
        print(f"final loss: ours {ours['history'][-1]['loss']:.4f}, ours-live {ours_live['history'][-1]['loss']:.4f}, "
              f"TRL {trl['losses'][-1]:.4f}")

if __name__ == "__main__":
    main()
