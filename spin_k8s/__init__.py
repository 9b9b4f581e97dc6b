"""spin-k8s: Self-Play Fine-Tuning (SPIN, arXiv 2401.01335) as a Kubernetes-native batch system.

Layering (imports point down only): cli -> controller -> (apply, kube, lineage) -> planner ->
(manifests, naming) -> api types. The workers (``spin_k8s.workers``) import nothing from the controller
side; ``spin_k8s.testing`` is the test environment and is imported by nothing else.
"""

__version__ = "0.1.0"
