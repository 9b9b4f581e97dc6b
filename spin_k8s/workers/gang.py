"""The training pod's entrypoint: torchrun, with the ranks' input errors passed on as the pod's exit code.

torchrun exits 1 whatever its ranks exited with, so a rank that found an input no retry can fix (a missing model,
a dataset without a usable row: ``runtime.INPUT_EXIT``) would look like a crash, and the controller would restart
the gang for nothing. Each rank that exits that way leaves a marker file (its path in ``runtime.INPUT_ERROR_ENV``,
set here); when torchrun failed and the marker is there, this process exits ``INPUT_EXIT`` too, which the
training Job's ``podFailurePolicy`` turns into FailJob. Every argument goes to torchrun unchanged:

    python -m spin_k8s.workers.gang --nnodes 2 --nproc-per-node 8 ... -m spin_k8s.workers.train --model ...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from spin_k8s.workers import runtime


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory(prefix="spin-gang-") as scratch:
        marker = Path(scratch) / "input-error"
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args],
                                env={**os.environ, runtime.INPUT_ERROR_ENV: str(marker)})
        # The kubelet stops a pod with SIGTERM to PID 1, this process: torchrun must get it to stop its ranks.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
        code = proc.wait()
        if code != 0 and marker.exists():
            return runtime.INPUT_EXIT
        return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


if __name__ == "__main__":
    sys.exit(main())
