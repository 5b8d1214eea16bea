"""How an SP-NGD step moves gradients to the owners of their curvature blocks and the results
back (DESIGN.md §3 "Paths are objects"). :func:`spngd_ds.initialize` picks one per engine:

- :class:`~spngd_ds.paths.fast.FastPath`: standalone and ZeRO stage 0. SP-NGD reduces the
  gradients itself, owners update their layers, the parameters are gathered back.
- :class:`~spngd_ds.paths.compatible.CompatiblePath`: ZeRO 1, 2, 3 (and CPU offload). DeepSpeed
  reduces and partitions gradients and owns the fp32 master weights; owners precondition before
  DeepSpeed's step, which then calls SP-NGD on its flat partitions for the momentum update.
"""
