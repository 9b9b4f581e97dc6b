"""Shared by the worker tests: the length limits they all use, running the workers as processes the way
the Jobs do, and small synthetic sets cut from a generated one."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from spin_k8s import storage
from spin_k8s.workers import data, tiny

MAX_PROMPT_LENGTH = 48
MAX_LENGTH = 80
MAX_TOKENS = 12


def generate_args(assets: tiny.TinyAssets, output: Path | str, *extra: str,
                  engine: str | None = "transformers") -> list[str]:
    """Generation worker arguments for the tiny model. ``engine``: transformers, the fast one here, unless a
    test is about vLLM; None leaves ``--engine`` out (the worker's default, vllm)."""
    return ["--model", str(assets.model_dir), "--data", str(assets.data_path), "--output", str(output),
            *(["--engine", engine] if engine else []), "--max-tokens", str(MAX_TOKENS),
            "--max-length", str(MAX_LENGTH), "--max-prompt-length", str(MAX_PROMPT_LENGTH), "--run-name", "test",
            *extra]


def worker_env(cache: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a worker pod gets on a CPU node: DeepSpeed's CPU accelerator, one thread per rank."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "SPIN_CACHE_DIR": str(cache),
            "PYTHONUNBUFFERED": "1", **(extra or {})}


def train_command(nproc: int, args: list[str]) -> list[str]:
    """``torchrun ... -m spin_k8s.workers.train ARGS``, or a plain process for one rank."""
    if nproc == 1:
        return [sys.executable, "-m", "spin_k8s.workers.train", *args]
    # --standalone: torchrun finds its own free port (the machine's other tests take ports too)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "spin_k8s.workers.train", *args]


def events(stdout: str) -> list[dict[str, object]]:
    """The JSON-line events of a worker's stdout (other lines are library chatter)."""
    out = []
    for line in stdout.splitlines():
        if line.startswith("{") and '"event"' in line:
            out.append(json.loads(line))
    return out


def run_train(nproc: int, args: list[str], cache: Path, extra_env: dict[str, str] | None = None,
              timeout: float = 300) -> tuple[list[dict[str, object]], str]:
    proc = subprocess.run(train_command(nproc, args), env=worker_env(cache, extra_env), capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return events(proc.stdout), proc.stdout


def subset(source: Path, rows: int, out: Path, *, scored: bool, real_offset: float = 0.0) -> Path:
    """A one-shard synthetic set with the first ``rows`` rows of ``source``; ``scored=False`` drops the
    reference log-probs so that training must compute them itself; ``real_offset`` (nats) is added to the
    real answers' reference log-probs, as a faulty scoring engine would."""
    picked = [row for row, _ in data.load_synthetic(str(source)).rows[:rows]]
    record = data.load_synthetic(str(source)).rows[0][1]
    if not scored:
        picked = [dataclasses.replace(r, ref_real_logp=None, ref_generated_logp=None) for r in picked]
    elif real_offset:
        shifted = []
        for r in picked:
            assert r.ref_real_logp is not None
            shifted.append(dataclasses.replace(r, ref_real_logp=r.ref_real_logp + real_offset))
        picked = shifted
    body = "".join(r.to_json() + "\n" for r in picked).encode()
    storage.write_bytes(str(out / data.shard_name(0, 1)), body)
    done = dataclasses.replace(record, shard=0, num_shards=1, rows=rows, sha256=storage.sha256_bytes(body),
                               scored=scored)
    storage.write_bytes(str(out / data.done_name(0, 1)), done.to_json().encode())
    return out
