"""Kept for the training job's older imports: the functions live in :mod:`spngd_ds.distenv`.

The library (``spngd_ds.initialize``) needs them too and must not import the training job, so
they moved there; this module only re-exports them.
"""

from __future__ import annotations

from spngd_ds.distenv import MPI_ENV_KEYS, ensure_single_process_env, free_port

__all__ = ["MPI_ENV_KEYS", "ensure_single_process_env", "free_port"]
