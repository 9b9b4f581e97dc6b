"""The self-contained SPIN demo: a checkable task, a weak SFT model, SPIN through the local executor, and the
continued-SFT baseline, reported as tables and a plot. Nothing comes from a model hub.

    python -m spin_k8s.demo --out /tmp/spin-demo
"""
