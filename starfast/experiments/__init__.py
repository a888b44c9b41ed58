"""The paper's experiments as commands: ``python -m starfast.experiments NAME [--preset quick|paper]``.

Each experiment (:mod:`~starfast.experiments.catalog`) is a declarative description: the run
directories it needs, the star sets and sweep points measured in each
(:mod:`~starfast.experiments.plan`). A cell, one run directory's stages, is executed by
:mod:`~starfast.experiments.cells` through the pipeline (models, stars) and
:mod:`~starfast.experiments.measure` (barriers, every curve stored); launchers
(:mod:`~starfast.experiments.launch`) run the cells here, in a process pool or on a cluster; the
results, table, figure and verdict are :mod:`~starfast.experiments.output`'s.
"""
