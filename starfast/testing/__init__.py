"""Reference implementations and problem generators for the tests and the benchmarks.

Nothing in the library imports this package except the self-check (``python -m starfast.check``).
It ships with starfast so that ``tests/``, ``benchmarks/`` and the self-check share one copy
through ordinary imports (``numpy.testing`` and ``torch.testing`` do the same):

- :mod:`starfast.testing.lap_problems`: random linear-assignment problems of the kinds weight
  matching meets (``make_costs``).
- :mod:`starfast.testing.matching_reference`: a plain, one-model-at-a-time Git Re-Basin weight
  matching with scipy (``match_one``): the tests' independent reference for
  :mod:`starfast.matching` and the benchmarks' baseline.
- :mod:`starfast.testing.op_inputs`: realistic index maps (``block_index``) and mismatch messages
  (``mismatches``) for comparing the compiled ops with their references.
- :mod:`starfast.testing.zoo`: independently initialised models of one architecture as rows
  (``independent_zoo``), the benchmarks' matching problems.
"""
