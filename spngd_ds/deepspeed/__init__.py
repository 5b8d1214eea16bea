"""SP-NGD's coupling to DeepSpeed.

:func:`~spngd_ds.deepspeed.integration.initialize`, the engine wiring
(:mod:`~spngd_ds.deepspeed.engine`), :func:`~spngd_ds.deepspeed.patch.patch_deepspeed`, ZeRO
partitions, checkpoints and the rank-agreement check. The core of :mod:`spngd_ds` never imports this
package; inside it, ``import deepspeed`` is the third-party DeepSpeed (absolute imports).
"""
