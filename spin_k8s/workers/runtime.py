"""Process-level helpers shared by the worker entrypoints: the exit-code convention, JSON-line logs and the
local model cache.

Exit codes: 0 done (also: nothing left to do), 2 bad usage (one line on stderr), ``INPUT_EXIT`` (3) an input
that no retry can fix: a model URI with nothing under it, a dataset without a usable row, a tokenizer that does not
load (one line on stderr); anything else a crash worth a retry. The Jobs' ``podFailurePolicy`` fails a Job at
once on ``INPUT_EXIT`` (spin_k8s.manifests), so it is never retried; under torchrun, which hides its ranks' codes,
``spin_k8s.workers.gang`` passes it on.

Whatever the reason a worker fails, it writes it as one line to the container's termination log, which the
kubelet reports as the container's termination message and the controller copies into the SpinRun's status.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spin_k8s import storage
from spin_k8s.workers import data

USAGE_EXIT = 2
INPUT_EXIT = 3
# A file a process that exits INPUT_EXIT creates, when this variable names one: torchrun hides its ranks' exit
# codes, so the training pod's entrypoint (spin_k8s.workers.gang) learns of an input error this way.
INPUT_ERROR_ENV = "SPIN_INPUT_ERROR_FILE"
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
    """One JSON object per stdout line: the workers' machine-readable log. One write per line: the ranks of a
    node share the container's stdout, and ``print`` writes the text and its newline apart (two writes when
    unbuffered), so two ranks' lines could run into one."""
    sys.stdout.write(json.dumps(fields, separators=(",", ":"), default=str) + "\n")
    sys.stdout.flush()


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
        if os.environ.get(INPUT_ERROR_ENV):
            Path(os.environ[INPUT_ERROR_ENV]).touch()
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
    """A local directory holding the model at ``uri``: the directory itself for a local URI, else a verified copy
    in ``cache_dir`` (the pod's scratch volume), downloaded once per node.

    Every process on a node that needs the model (one per rank under torchrun) takes the same file lock; the
    first downloads while the others wait on the lock, then find the copy there. A copy is downloaded into a
    staging directory, checked file by file against the store's listing (size, and MD5 where the store states
    it) and as a whole against the digest the training worker recorded with it (``checkpoint_sha256`` in its
    ``metrics.json``), and only then renamed into place: the rename is the completion marker, so a download
    that failed or was killed is never used. Its leftovers are deleted by the next process holding the lock (a
    killed holder's lock is released with its process). Logs one ``model_fetched`` event per process: ``downloaded``
    is true in the one process per node that downloaded.
    """
    loc = storage.parse(uri)
    if loc.scheme == "file":
        if not (Path(loc.key) / "config.json").is_file():
            raise FileNotFoundError(f"{uri}: not a model directory (no config.json)")
        return Path(loc.key)
    began = time.monotonic()
    name = hashlib.sha256(uri.encode()).hexdigest()[:24]
    models = cache_dir / "models"
    target = models / name
    models.mkdir(parents=True, exist_ok=True)
    with open(models / f".{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when its process dies
        downloaded = not target.is_dir()
        if downloaded:
            for stale in models.glob(f".download-{name}-*"):
                shutil.rmtree(stale)
            staging = Path(tempfile.mkdtemp(dir=models, prefix=f".download-{name}-"))
            try:
                storage.download_dir(uri, staging, verify=True)
                check_model(uri, staging)
                staging.rename(target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    log(event="model_fetched", uri=uri, path=str(target), downloaded=downloaded,
        node=int(os.environ.get("GROUP_RANK", "0")), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        seconds=round(time.monotonic() - began, 3))
    return target


def check_model(uri: str, local: Path) -> None:
    """A downloaded model is whole: it has a config, and its digest is the one its writer recorded, where one
    did (a model the training worker wrote; a model put in storage by hand carries none and is checked file by
    file only). FileNotFoundError (an input error) without a config; storage.IntegrityError on a mismatch."""
    if not (local / "config.json").is_file():
        raise FileNotFoundError(f"{uri}: not a model directory (no config.json)")
    metrics = local / METRICS_FILE
    recorded = json.loads(metrics.read_text()).get("checkpoint_sha256") if metrics.is_file() else None
    if recorded and (digest := model_digest(local)) != recorded:
        raise storage.IntegrityError(f"{uri}: the downloaded model's sha256 is {digest}, but {METRICS_FILE} "
                                     f"records {recorded}: the copy or the stored model is corrupt")
