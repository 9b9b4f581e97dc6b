"""Benchmark: peak memory of the trainer's log-probs, forward and backward, chunked over response positions
(``train.batch_logps`` with ``--logits-chunk-tokens``) against the model's whole logits (chunk 0), measured in one
run on one model and batch.

The model is a one-layer Llama with a 32k vocabulary and a narrow hidden size, so that logits dominate memory as
they do for a 7B model's micro-batch (there: 2B x T x V x 4 bytes of fp32, tens of GB at a 128k vocabulary). The
batch: 2B sequences of T tokens, prompts of a quarter of T. On CPU each variant runs in a fresh process and its
cost is the growth of the process's peak resident memory over its resident memory before the pass (a short pass
of the same variant warms the allocator first); on a GPU (``--device cuda``) it is
``torch.cuda.max_memory_allocated`` over what was allocated before. The ratio is chunked / whole.

Measured on 2 shared CPU cores (defaults: 8 x 512 tokens, 32k vocabulary, 499 MiB of fp32 logits): whole 2032 MiB
(the logits, their log-softmax temporaries and gradients, about four copies), chunked 547 MiB at 1024 positions
a chunk (ratio 0.27) and 171 MiB at 256 (0.084): about four copies of one chunk's logits, whatever the batch.

    .venv/bin/python bench/bench_logps.py                   # ~1 minute on 2 cores, ~3 GB of memory
    .venv/bin/python bench/bench_logps.py --device cuda --sequences 16 --length 1024 --vocab 128256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from typing import Any

import psutil
import torch

from spin_k8s.workers import batching, train


def build(args: argparse.Namespace) -> tuple[Any, batching.Batch]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(args.device).train()
    g = torch.Generator().manual_seed(1)
    prompt = args.length // 4
    pairs = []
    for k in range(args.sequences // 2):
        real = torch.randint(5, args.vocab, (args.length,), generator=g).tolist()
        generated = real[:prompt] + torch.randint(5, args.vocab, (args.length - k - prompt,), generator=g).tolist()
        pairs.append(batching.Pair(real=real, generated=generated, prompt_len=prompt))
    return model, batching.collate(pairs, pad_id=0).to(torch.device(args.device))


def one_pass(model: Any, batch: batching.Batch, chunk: int) -> None:
    weights = torch.linspace(-1.0, 1.0, 2 * batch.pairs, device=batch.input_ids.device)
    (train.batch_logps(model, batch, chunk) * weights).sum().backward()
    model.zero_grad(set_to_none=True)


def measure(args: argparse.Namespace, chunk: int) -> int:
    """Peak bytes one forward and backward adds, in this process."""
    model, batch = build(args)
    small = batching.collate([batching.Pair(real=list(range(5, 37)), generated=list(range(5, 30)), prompt_len=8)],
                             pad_id=0).to(torch.device(args.device))
    one_pass(model, small, chunk)  # kernels and allocator warmed, at a small size
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        one_pass(model, batch, chunk)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = psutil.Process().memory_info().rss
    one_pass(model, batch, chunk)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    parser.add_argument("--sequences", type=int, default=8, help="sequences per micro-batch, 2B (default 8)")
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence, T (default 512)")
    parser.add_argument("--chunk", type=int, default=train.LOGITS_CHUNK_TOKENS,
                        help=f"response positions per chunk (default {train.LOGITS_CHUNK_TOKENS})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # one CPU measurement
    args = parser.parse_args()
    if args.child is not None:
        print(measure(args, args.child))
        return

    def peak(chunk: int) -> int:
        if args.device == "cuda":
            return measure(args, chunk)
        # A fixed mmap threshold: glibc otherwise raises it to 32 MiB after the first large free, and serves
        # later tensors from a heap it does not give back, which would count freed chunks as resident.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", str(chunk)], check=True,
                             capture_output=True, text=True, env=env).stdout
        return int(out.strip().splitlines()[-1])

    whole, chunked = peak(0), peak(args.chunk)
    logits = args.sequences * (args.length - 1) * args.vocab * 4
    mib = 1 << 20
    print(json.dumps({
        "device": args.device, "vocab": args.vocab, "sequences": args.sequences, "length": args.length,
        "chunk": args.chunk, "fp32_logits_mib": round(logits / mib, 1),
        "peak_whole_mib": round(whole / mib, 1), "peak_chunked_mib": round(chunked / mib, 1),
        "ratio_chunked_to_whole": round(chunked / whole, 3),
    }))


if __name__ == "__main__":
    main()
