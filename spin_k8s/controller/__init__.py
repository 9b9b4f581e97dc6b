"""The SpinRun controller: observe (kube + lineage), plan (``spin_k8s.planner``), apply, write status."""
