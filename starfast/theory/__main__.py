"""Entry point of ``python -m starfast.theory`` (the command line lives in :mod:`starfast.theory.cli`)."""
from starfast.theory.cli import main

raise SystemExit(main())
