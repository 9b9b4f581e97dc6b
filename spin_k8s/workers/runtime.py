"""Process-level helpers shared by the worker entrypoints: the exit-code convention, JSON-line logs and the
local model cache.

Exit codes: 0 done (also: nothing left to do), 2 bad usage (one line on stderr), ``INPUT_EXIT`` (3) an input
that no retry can fix: a model URI with nothing under it, a dataset without a usable row, a tokenizer that does not
load (one line on stderr); anything else a crash worth a retry. The Jobs' ``podFailurePolicy`` fails a Job at
once on ``INPUT_EXIT`` (spin_k8s.manifests), so it is never retried.

Whatever the reason a worker fails, it writes it as one line to the container's termination log, which the
kubelet reports as the container's termination message and the controller copies into the SpinRun's status.
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
INPUT_EXIT = 3
# Where a container's termination message goes: the kubelet creates the file (the container's
# terminationMessagePath, by default /dev/termination-log) before the container starts. The test cluster's node
# agent runs pods as host processes and names a per-container file in this variable instead.
TERMINATION_LOG_ENV = "TERMINATION_MESSAGE_PATH"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
# What the training worker writes next to a model it saved, last: its metrics, the marker that the model is
# complete. Not part of the model: it holds timings, so it would make two identical models look different.
METRICS_FILE = "metrics.json"


class UsageError(ValueError):
    """A bad argument combination; reported as one line with exit code 2."""


def log(**fields: Any) -> None:
    """One JSON object per stdout line: the workers' machine-readable log."""
    print(json.dumps(fields, separators=(",", ":"), default=str), flush=True)


def write_termination_message(message: str) -> None:
    """``message`` as one line in the container's termination log; nothing where there is none (outside a
    container, the file does not exist: creating it would be writing into the host's /dev)."""
    path = Path(os.environ.get(TERMINATION_LOG_ENV) or DEFAULT_TERMINATION_LOG)
    line = " ".join(message.split())[:2000]
    try:
        if path.is_file():
            path.write_text(line + "\n")
    except OSError:
        pass  # the message is a courtesy; the exit code and the log still say it


def run_cli(main: Callable[[], int]) -> int:
    """Runs an entrypoint: bad usage becomes ``error: ...`` on stderr and exit code 2, an input no retry can fix
    the same line and ``INPUT_EXIT``; every failure's reason goes to the termination log."""
    try:
        return main()
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        write_termination_message(str(exc))
        return USAGE_EXIT
    except (data.DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        write_termination_message(str(exc))
        return INPUT_EXIT
    except BaseException as exc:
        if not isinstance(exc, SystemExit | KeyboardInterrupt):
            write_termination_message(f"{type(exc).__name__}: {exc}")
        raise


def load_tokenizer(model_dir: Path, uri: str) -> Any:
    """The model's tokenizer; a DataError (an input error, not retried) when it does not load."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise data.DataError(f"{uri}: the tokenizer does not load ({type(exc).__name__}: {first})") from exc


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
