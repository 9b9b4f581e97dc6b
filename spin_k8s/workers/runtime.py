"""Process-level helpers shared by the worker entrypoints: the exit-code convention, JSON-line logs and the
local model cache.

Exit codes: 0 done (also: nothing left to do), 2 bad usage or unusable data (one line on stderr), anything
else a crash worth a retry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spin_k8s import storage
from spin_k8s.workers import data

USAGE_EXIT = 2
# What the training worker writes next to a model it saved, last: its metrics, the marker that the model is
# complete. Not part of the model: it holds timings, so it would make two identical models look different.
METRICS_FILE = "metrics.json"


class UsageError(ValueError):
    """A bad argument combination; reported as one line with exit code 2."""


def log(**fields: Any) -> None:
    """One JSON object per stdout line: the workers' machine-readable log."""
    print(json.dumps(fields, separators=(",", ":"), default=str), flush=True)


def run_cli(main: Callable[[], int]) -> int:
    """Runs an entrypoint, turning bad input into ``error: ...`` on stderr and exit code 2."""
    try:
        return main()
    except (UsageError, data.DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return USAGE_EXIT


def add_template_flags(parser: argparse.ArgumentParser) -> None:
    """The flags both workers take to tokenize a pair alike (the generation worker to sample and score, the
    training worker to train): the prompt template and the response cap. Their values must be equal in both."""
    a = parser.add_argument
    a("--prompt-format", choices=data.PROMPT_FORMATS, default="chatTemplate", help="the prompt the model "
      "continues and training scores answers after: chatTemplate = the model's chat template; paperInstruction "
      "= the authors' '### Instruction: ... ### Response:' prompt (default chatTemplate; example: paperInstruction)")
    a("--system-prompt", default=None, help="chatTemplate only: a system turn before each prompt; an empty "
      "string adds an empty one, as the authors' trainer did (default none; example: --system-prompt=)")
    a("--max-response-length", type=int, default=0, help="response tokens (end-of-turn included) kept at most; "
      "0 = --max-length minus --max-prompt-length, as the authors (default 0; example: 768)")


def template_from_args(args: argparse.Namespace) -> data.Template:
    try:
        return data.Template(args.prompt_format, args.system_prompt)
    except ValueError as exc:
        raise UsageError(f"--prompt-format {args.prompt_format} --system-prompt: {exc}") from exc


def response_cap_from_args(args: argparse.Namespace) -> int:
    """``--max-response-length``, or max length - max prompt length where it is 0."""
    if args.max_response_length < 0:
        raise UsageError("need --max-response-length >= 0")
    return int(args.max_response_length or args.max_length - args.max_prompt_length)


def model_digest(model_dir: Path) -> str:
    """A model's identity in lineage: the digest of its files, the training worker's metrics aside. The
    training worker records it as ``checkpoint_sha256``; the next iteration's workers find it again."""
    return storage.digest_dir(model_dir, exclude=(METRICS_FILE,))


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPIN_CACHE_DIR", os.path.join(tempfile.gettempdir(), "spin-cache")))


def fetch_model(uri: str, cache_dir: Path) -> Path:
    """A local directory holding the model at ``uri``: the directory itself for a local URI, else a copy
    in ``cache_dir`` downloaded once per URI.

    Several processes on a node may race here (one per rank): each downloads into its own temporary
    directory and the first rename wins, so no one ever sees a half-written copy.
    """
    loc = storage.parse(uri)
    if loc.scheme == "file":
        if not (Path(loc.key) / "config.json").is_file():
            raise FileNotFoundError(f"{uri}: not a model directory (no config.json)")
        return Path(loc.key)
    target = cache_dir / "models" / hashlib.sha256(uri.encode()).hexdigest()[:24]
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    try:
        storage.download_dir(uri, staging)
        if not (staging / "config.json").is_file():
            raise FileNotFoundError(f"{uri}: not a model directory (no config.json)")
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
