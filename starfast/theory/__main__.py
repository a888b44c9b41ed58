"""Entry point of ``python -m starfast.theory`` (the command line lives in :mod:`starfast.theory.cli`)."""
import sys

from starfast.arguments import run_command
from starfast.theory.cli import main

run_command(main, "python -m starfast.theory " + " ".join(sys.argv[1:]))
