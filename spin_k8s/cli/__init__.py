"""``spinctl``: the command line users drive spin-k8s with (entry point ``spin_k8s.cli:main``).

``session`` holds what every command shares (cluster connection, output option, one-line errors),
``spec`` builds and checks the SpinRun ``start`` submits, ``output`` formats, ``commands`` wires them up.
"""

from spin_k8s.cli.commands import main

__all__ = ["main"]
