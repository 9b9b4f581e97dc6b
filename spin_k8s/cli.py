"""``spinctl``: the command line users drive spin-k8s with."""

from __future__ import annotations

import click

import spin_k8s


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(spin_k8s.__version__, prog_name="spinctl")
def main() -> None:
    """Run Self-Play Fine-Tuning (SPIN) on Kubernetes.

    \b
    Examples:
      spinctl --version
    """
