"""Loads starfast's compiled core, ``starfast._C`` (built from csrc/ by setup.py), and explains
why when it cannot.

``core`` is the extension module, or None; then a RuntimeWarning says what happened and what to
do, and :mod:`starfast.ops` falls back to its pure-PyTorch references. ``STARFAST_NO_EXTENSION=1``
makes that fallback a choice (no warning): the references serve every op, which is how
``make test-fallback`` tests that path on a machine that has the extension. The core includes no torch
headers, so any installed torch loads it: what goes wrong is that it was not built, that it
failed to load, or that the source tree shadows an installed copy — running Python from the
source root after a non-editable ``pip install .`` imports the source tree's ``starfast/``, which
has no built ``_C`` in it (:func:`failure_message` tells these apart).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

PACKAGE_DIR = Path(__file__).resolve().parent
DISABLE_VARIABLE = "STARFAST_NO_EXTENSION"


def installed_package_dir(search_path: Optional[Sequence[str]] = None) -> Optional[Path]:
    """The directory where an installed (non-editable) starfast distribution put the package, or
    None; ``search_path`` replaces ``sys.path`` for the search. An editable install records no
    package files (its path hook points at the source tree), so it is never "elsewhere"."""
    context = {"name": "starfast"} if search_path is None else {"name": "starfast", "path": list(search_path)}
    for distribution in importlib.metadata.distributions(**context):
        for file in distribution.files or ():
            if file.as_posix() == "starfast/__init__.py":
                return Path(distribution.locate_file(file)).resolve().parent
    return None


def failure_message(error: ImportError, package_dir: Path, installed_dir: Optional[Path]) -> str:
    """What the warning says when ``import starfast._C`` raised ``error``, for the package imported
    from ``package_dir`` while an installed copy (if any) lives in ``installed_dir``."""
    if isinstance(error, ModuleNotFoundError) and error.name == "starfast._C":
        if installed_dir is not None and installed_dir != package_dir:
            what = (f"running from the source tree {package_dir.parent}, which shadows the installed starfast; "
                    "run from another directory, or `pip install -e .`")
        else:
            what = f"it was not built in {package_dir}; build it with `pip install .` (or `pip install -e .`)"
    else:
        what = f"it failed to load ({error}); rebuild it with `pip install .`"
    return f"starfast's compiled extension is not available: {what}. Using the slower pure-PyTorch references."


def disabled() -> bool:
    """True when the environment asks for the pure-PyTorch references (``STARFAST_NO_EXTENSION=1``;
    unset, empty or ``0``: the extension is used; any other value is ignored with a warning)."""
    value = os.environ.get(DISABLE_VARIABLE, "")
    if value not in ("", "0", "1"):
        warnings.warn(f"{DISABLE_VARIABLE}={value!r} is ignored: set it to 1 to use the pure-PyTorch references",
                      RuntimeWarning, stacklevel=3)
    return value == "1"


def load() -> Optional[ModuleType]:
    """``starfast._C``, or None: when disabled, or after warning why it could not be imported."""
    if disabled():
        return None
    try:
        return importlib.import_module("starfast._C")
    except ImportError as error:
        warnings.warn(failure_message(error, PACKAGE_DIR, installed_package_dir()), RuntimeWarning, stacklevel=2)
        return None


core = load()
