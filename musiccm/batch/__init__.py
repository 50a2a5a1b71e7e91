"""Batch generation: manifest validation, the Ray Data generator stage, metric rows, resume checks.

The Ray pipeline that wires them together is `musiccm.jobs.batch`; results are read with `musiccm.results`.
"""
