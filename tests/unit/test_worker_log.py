"""The workers' JSON-line log stays one object per line when the ranks of a node share one stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

WRITER = """
from spin_k8s.workers import runtime
for step in range(3000):
    runtime.log(event="step", rank={rank}, step=step, note="x" * 60)
"""


def test_two_ranks_writing_to_one_unbuffered_stdout_never_share_a_line() -> None:
    read, write = os.pipe()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # as the worker pods run
    ranks = [subprocess.Popen([sys.executable, "-c", WRITER.format(rank=rank)], stdout=write, env=env)
             for rank in (0, 1)]
    os.close(write)
    with os.fdopen(read) as out:
        lines = out.read().splitlines()
    assert [rank.wait() for rank in ranks] == [0, 0]
    parsed = [json.loads(line) for line in lines]
    assert sorted((e["rank"], e["step"]) for e in parsed) == [(r, s) for r in (0, 1) for s in range(3000)]
