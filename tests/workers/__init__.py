"""Tests of the SPIN workers (spin_k8s.workers) and the storage module."""
