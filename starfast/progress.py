"""Progress bars: one policy for every long loop of starfast.

``progress_bar(iterable=None, enabled=True, nested=False, **tqdm_options)`` is ``tqdm`` with the
rules a redirected log needs (tqdm's own practice of adapting to a non-terminal stderr): on a
terminal every bar draws as usual; when stderr is not a terminal (a log file, a batch job), nested
bars (the epochs inside a model, the t-points inside a pair) are dropped and the outer bars
print a line at most every ``LOG_INTERVAL_S`` seconds, so a log grows by lines, not by redraws.
``enabled=False`` (``--quiet``) draws nothing.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, Optional

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def progress_bar(iterable: Optional[Iterable] = None, *, enabled: bool = True, nested: bool = False, **options: Any) -> tqdm:
    terminal = sys.stderr.isatty()
    if not terminal:
        options.setdefault("mininterval", LOG_INTERVAL_S)
    if nested:
        options.setdefault("leave", False)
    return tqdm(iterable, disable=not enabled or (nested and not terminal), **options)
