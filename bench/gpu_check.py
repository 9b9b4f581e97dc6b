"""The Python parts of bench/gpu_check.sh: random-init Llama models made from a config, one training step's
MFU, and the table of results. Nothing is downloaded: the tokenizer is trained here (``spin_k8s.workers.tiny``).

    python bench/gpu_check.py model --size 1b --out /tmp/gpu/1b --json /tmp/gpu/1b-model.json
    python bench/gpu_check.py train --model /tmp/gpu/1b/model --synthetic /tmp/gpu/1b/synthetic/0 \\
        --out /tmp/gpu/1b/train --json /tmp/gpu/1b-train.json
    python bench/gpu_check.py synthetic --model /tmp/gpu/1b/model --data /tmp/gpu/1b/sft.jsonl --out /tmp/gpu/r
    python bench/gpu_check.py table /tmp/gpu/*.json   # files named {size}-{model,generate,train}.json

``--size tiny`` and ``train --cpu`` run the same code on a CPU (fp32 weights, DeepSpeed's CPU accelerator):
the dry run of the GPU script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

# Llama shapes: TinyLlama-1.1B and Llama-2-7B (vocabulary aside: ours, trained here, has up to 32000 tokens).
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab": 512},
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4, "vocab": 32000},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab": 32000},
}
H200_BF16_DENSE_TFLOPS = 989.0  # the H100/H200 SXM datasheet's dense bf16 figure (this workplace measured ~790)


def corpus(vocab: int, seed: int) -> list[str]:
    """The tiny dataset's text plus random words: enough distinct words for a BPE vocabulary of ``vocab``."""
    from spin_k8s.workers import tiny

    texts = [m["content"] for row in tiny.sft_rows(512, seed) for m in row["messages"]]
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(vocab * 2)]
    return texts + [" ".join(words[k:k + 20]) for k in range(0, len(words), 20)]


def make_model(size: str, out: Path, prompts: int, seed: int) -> dict[str, Any]:
    """A randomly initialised Llama of ``size`` (bf16 with a GPU, fp32 without), its tokenizer and an SFT set."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from spin_k8s.workers import tiny

    shape = dict(SIZES[size])
    tok = tiny.build_tokenizer(corpus(shape.pop("vocab"), seed), SIZES[size]["vocab"])
    config = LlamaConfig(**shape, vocab_size=len(tok), max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
    gpu = torch.cuda.is_available()
    torch.manual_seed(seed)
    with torch.device("cuda" if gpu else "cpu"):  # initialised where it is fast: 7B on a CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if gpu else torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    tiny.write_sft_dataset(out / "sft.jsonl", prompts, seed)
    return {"size": size, "parameters": model.num_parameters(), "vocab": len(tok), "dtype": str(model.dtype)}


def random_synthetic(model: Path, sft: Path, out: Path, tokens: int, seed: int) -> None:
    """A one-shard synthetic set whose samples are ``tokens`` random token ids each (cut at the limit, as a
    random model's samples are), without reference log-probs: training data of the right shapes where no
    generation engine ran."""
    from transformers import AutoTokenizer

    from spin_k8s import storage
    from spin_k8s.workers import data

    tok = AutoTokenizer.from_pretrained(model)
    rng = random.Random(seed)
    special = set(tok.all_special_ids)
    ordinary = [i for i in range(len(tok)) if i not in special]
    rows = [data.SyntheticRow(id=ex.id, prompt=ex.prompt, real=ex.response, generated="",
                              generated_ids=rng.choices(ordinary, k=tokens), length_stopped=True)
            for ex in data.load_sft(str(sft)).examples]
    body = "".join(r.to_json() + "\n" for r in rows).encode()
    storage.write_bytes(str(out / data.shard_name(0, 1)), body)
    record = data.ShardRecord(shard=0, num_shards=1, rows=len(rows), sha256=storage.sha256_bytes(body),
                              engine="random", engine_version="0", sampling={"max_tokens": tokens}, model=str(model),
                              model_digest="", scored=False, max_prompt_length=512, max_length=1024, data=str(sft),
                              max_response_length=512, length_stopped=len(rows))
    storage.write_bytes(str(out / data.done_name(0, 1)), record.to_json().encode())


def train_step(model: Path, synthetic: Path, out: Path, steps: int, micro_batch_size: int, cpu: bool,
               peak_tflops: float) -> dict[str, Any]:
    """A few ZeRO-3 steps of the training worker on one device (bf16 on a GPU, fp32 on a CPU); the MFU of the
    last one (the first ones pay for allocations and warm-up). Model FLOPs: 6 x parameters x the step's real
    (non-padding) tokens: forward and backward of the policy; the reference log-probs are precomputed, and the
    recomputation of gradient checkpointing is hardware work, not model work. The worker is stopped after its
    last step: saving a 7B checkpoint would take a minute of the check's ten."""
    import psutil

    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2"} if cpu else {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "spin_k8s.workers.train", "--model", str(model), "--synthetic", f"0={synthetic}",
               "--output", str(out), "--zero-stage", "3", "--precision", "fp32" if cpu else "bf16",
               "--max-steps", str(steps), "--micro-batch-size", str(micro_batch_size), "--gradient-checkpointing",
               "--reference", "precomputed", "--max-length", "1024", "--max-prompt-length", "512"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    events: list[dict[str, Any]] = []
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = [*tail[-60:], line]
        if line.startswith("{") and '"event"' in line:
            events.append(json.loads(line))
            if sum(e["event"] == "step" for e in events) == steps:
                break
    # torchrun starts its ranks in sessions of their own: stop the whole tree.
    tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    for pid in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    proc.wait()
    done = [e for e in events if e["event"] == "step"]
    if len(done) < steps:
        raise SystemExit(f"training worker ended after {len(done)} of {steps} steps:\n{''.join(tail)}")
    start = next(e for e in events if e["event"] == "start")
    last = done[-1]
    flops = 6 * start["parameters"] * last["tokens"]
    return {"parameters": start["parameters"], "step_seconds": last["seconds"], "step_tokens": last["tokens"],
            "tokens_per_s": last["tokens/s"], "model_tflops": flops / last["seconds"] / 1e12,
            "mfu": flops / last["seconds"] / (peak_tflops * 1e12), "peak_tflops": peak_tflops,
            "micro_batch_size": micro_batch_size,
            # How the engine's reference log-probs compared with the trainer's forward (bf16 vLLM on a GPU)
            "reference_check": next((e for e in events if e["event"] == "reference_check"), None)}


def table(paths: list[Path]) -> None:
    """One row per model size: generation (worker, bare vLLM, ratio, scoring) and training (tokens/s, MFU)."""
    rows: dict[str, dict[str, Any]] = {}
    for path in paths:
        size, _, kind = path.stem.partition("-")
        rows.setdefault(size, {})[kind] = json.loads(path.read_text())
    head = ("size", "params", "gen bare tok/s", "gen worker tok/s", "ratio", "scoring s", "train tok/s", "TFLOP/s",
            "MFU")
    print(" | ".join(f"{h:>16s}" for h in head))
    for size in sorted(rows, key=list(SIZES).index):
        gen, trn, made = rows[size].get("generate"), rows[size].get("train"), rows[size].get("model", {})
        params = made.get("parameters", 0)
        cells = [size, f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params / 1e6:.1f} M"]
        cells += ([f"{gen['bare_tokens_per_s']:.0f}", f"{gen['worker_tokens_per_s']:.0f}", f"{gen['ratio']:.3f}",
                   f"{gen['scoring_s']:.1f}"] if gen else ["n/a"] * 4)
        cells += ([f"{trn['tokens_per_s']:.0f}", f"{trn['model_tflops']:.1f}", f"{100 * trn['mfu']:.1f}%"]
                  if trn else ["n/a"] * 3)
        print(" | ".join(f"{c:>16s}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("model", help="a random-init Llama, its tokenizer and an SFT set")
    m.add_argument("--size", choices=list(SIZES), required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--prompts", type=int, default=256, help="SFT rows (default 256)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--json", type=Path, required=True)
    t = sub.add_parser("train", help="ZeRO-3 training steps of the worker and the last one's MFU")
    t.add_argument("--model", type=Path, required=True)
    t.add_argument("--synthetic", type=Path, required=True, help="a scored synthetic set (bench_generate's)")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--steps", type=int, default=3)
    t.add_argument("--micro-batch-size", type=int, default=16, help="pairs per step (default 16)")
    t.add_argument("--cpu", action="store_true", help="fp32 on DeepSpeed's CPU accelerator (the dry run)")
    t.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS,
                   help=f"the device's bf16 peak (default {H200_BF16_DENSE_TFLOPS}, H200 dense)")
    t.add_argument("--json", type=Path, required=True)
    r = sub.add_parser("synthetic", help="a synthetic set of random-token samples, without reference log-probs")
    r.add_argument("--model", type=Path, required=True)
    r.add_argument("--data", type=Path, required=True, help="the SFT set (model's sft.jsonl)")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--tokens", type=int, default=256, help="tokens per sample (default 256)")
    r.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("table", help="print the results")
    s.add_argument("files", type=Path, nargs="+")
    args = parser.parse_args()
    if args.command == "model":
        made = make_model(args.size, args.out, args.prompts, args.seed)
        args.json.write_text(json.dumps(made, indent=2))
        print(json.dumps(made))
    elif args.command == "synthetic":
        random_synthetic(args.model, args.data, args.out, args.tokens, args.seed)
    elif args.command == "train":
        result = train_step(args.model, args.synthetic, args.out, args.steps, args.micro_batch_size, args.cpu,
                            args.peak_tflops)
        args.json.write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
    else:
        table(args.files)


if __name__ == "__main__":
    main()
