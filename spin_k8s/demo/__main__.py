"""``python -m spin_k8s.demo``: the demo's command line (``spinctl demo`` calls :func:`experiment.run_demo`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from spin_k8s.demo import experiment


def seeds(value: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``."""
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from exc
    if not out or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {value!r}")
    return out


def parser(prog: str = "python -m spin_k8s.demo") -> argparse.ArgumentParser:
    spin = experiment.SpinSettings()  # the defaults shown in the help
    p = argparse.ArgumentParser(
        prog=prog,
        description="Test the paper's claim on this machine: from a converged SFT model on a task whose answer "
                    "distribution is known exactly, SPIN iterations through the local executor against continued "
                    "SFT at the same training compute and the SFT model at lower temperatures, every model scored "
                    "by its exact distance to that distribution.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               f"  {prog} --out /tmp/spin-demo                  # 1 seed, 3 iterations\n"
               f"  {prog} --out /tmp/spin-cmp --seeds 0,1,2     # the comparison over 3 seeds\n"
               f"  {prog} --out /tmp/spin-quick --quick --iterations 1\n"
               f"  {prog} --out /tmp/spin-tune --learning-rate 3e-5 --beta 1.0\n"
               "writes OUT/report.md, OUT/report.json and OUT/demo.png",
    )
    a = p.add_argument
    a("--out", required=True, type=Path, help="new or empty directory for everything the demo writes "
      "(example: /tmp/spin-demo)")
    a("--seeds", type=seeds, default=[0], help="comma-separated seeds; each gets its own split, model and runs "
      "(default 0; example: 0,1,2)")
    a("--iterations", type=int, default=3, help="SPIN iterations (default 3; example: 2)")
    a("--quick", action="store_true", help="fewer training pairs and shorter runs: a first look in a few minutes")
    a("--learning-rate", type=float, default=None,
      help=f"SPIN learning rate (default {spin.learning_rate}; example: 3e-5)")
    a("--beta", type=float, default=None, help=f"SPIN beta (default {spin.beta}; example: 0.1)")
    a("--epochs", type=int, default=None,
      help=f"SPIN epochs per iteration (default {spin.epochs}, 1 with --quick; example: 4)")
    a("--temperature", type=float, default=None,
      help=f"sampling temperature of the opponent (default {spin.temperature}; example: 0.7)")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m spin_k8s.demo") -> int:
    args = parser(prog).parse_args(argv)
    if args.iterations < 1 or (args.epochs is not None and args.epochs < 1):
        parser(prog).error("--iterations and --epochs must be >= 1")
    given = {"learning_rate": args.learning_rate, "beta": args.beta, "epochs": args.epochs,
             "temperature": args.temperature}
    default = experiment.default_settings(args.iterations, args.quick).spin
    spin = dataclasses.replace(default, **{k: v for k, v in given.items() if v is not None})
    began = time.monotonic()

    def show(line: str) -> None:
        print(f"{time.monotonic() - began:7.1f}s {line}", flush=True)

    try:
        doc = experiment.run_demo(args.out, args.seeds, args.iterations, args.quick, show, spin)
    except experiment.DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print((args.out / "report.md").read_text())
    print(doc["conclusion"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
