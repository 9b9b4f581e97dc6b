"""The test environment: a real Kubernetes control plane, a node agent and an S3 server on loopback.

Used by the pytest session fixtures and by hand (``python -m spin_k8s.testing up``) for debugging.
Nothing here is imported by the controller or the workers.
"""
