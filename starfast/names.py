"""Names a user types for architectures and datasets: aliases and "did you mean" suggestions.

``resolve_name(kind, name, known, aliases)`` returns the canonical name for ``name`` (itself when
known, its target when an alias, case-insensitively), or raises ``ValueError`` listing the choices
and the closest one when ``name`` is neither.
"""
from __future__ import annotations

import difflib
from typing import Mapping, Sequence


def resolve_name(kind: str, name: str, known: Sequence[str], aliases: Mapping[str, str] = {}) -> str:
    if not isinstance(name, str):
        raise ValueError(f"{kind} must be a name such as {known[0]!r}, got {name!r}")
    lowered = name.strip().lower()
    if lowered in known:
        return lowered
    if lowered in aliases:
        return aliases[lowered]
    candidates = list(known) + list(aliases)
    close = difflib.get_close_matches(lowered, candidates, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    spelled = ", ".join(known)
    if aliases:
        spelled += "; or a family name: " + ", ".join(f"{alias} (= {target})" for alias, target in aliases.items())
    raise ValueError(f"unknown {kind} {name!r}; {hint}choose one of: {spelled}")
