"""Progress bars: one policy for every long loop of starfast.

``progress_bar(iterable=None, enabled=True, nested=False, **tqdm_options)`` is ``tqdm`` with the
rules a redirected log needs (tqdm's own practice of adapting to a non-terminal stderr): on a
terminal every bar draws as usual; when stderr is not a terminal (a log file, a batch job), nested
bars (the epochs inside a model, the t-points inside a pair) are dropped and the outer bars
print a line at most every ``LOG_INTERVAL_S`` seconds, so a log grows by lines, not by redraws —
and at least every ``LOG_INTERVAL_S`` seconds too, with the elapsed time and the ETA, even while a
long step (an epoch of a large model) moves nothing: a heartbeat thread redraws the bar.
``enabled=False`` (``--quiet``) draws nothing.
"""
from __future__ import annotations

import sys
import threading
from typing import Any, Iterable, Optional

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


class _LoggedBar(tqdm):
    """A bar for a log: redrawn every ``interval`` seconds by a daemon thread until closed."""

    def __init__(self, *args: Any, interval: float = LOG_INTERVAL_S, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._closed = threading.Event()
        if not self.disable:
            threading.Thread(target=self._beat, args=(interval,), name="progress-heartbeat", daemon=True).start()

    def _beat(self, interval: float) -> None:
        while not self._closed.wait(interval):
            self.refresh()

    def close(self) -> None:
        self._closed.set()
        super().close()


def progress_bar(iterable: Optional[Iterable] = None, *, enabled: bool = True, nested: bool = False, **options: Any) -> tqdm:
    terminal = sys.stderr.isatty()
    if nested:
        options.setdefault("leave", False)
    if terminal:
        return tqdm(iterable, disable=not enabled, **options)
    options.setdefault("mininterval", LOG_INTERVAL_S)
    return _LoggedBar(iterable, disable=not enabled or nested, interval=options["mininterval"], **options)
