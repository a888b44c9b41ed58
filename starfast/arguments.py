"""Argument parsing that the command lines share.

``name_parser`` (an argparse ``type`` that resolves aliases and suggests the closest name),
``parse_arch_kw`` (``key=value``), ``parse_milestones`` (``100,150``), ``parse_extra_heldout``
(``NAME:COUNT[:KEY=VALUE,...]``), ``parse_device`` (``--device``), ``check_data_dir`` and
``parse_arguments`` (``parse_args`` where ``-h``/``--help`` anywhere on the line prints help),
``DATA_ERRORS``: what loading a dataset raises for a person to act on, which a command line prints
as one line (the message says what to do; the traceback would only bury it), and
``run_command``: a command's entry point, where Ctrl-C is one line instead of a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from starfast.data import CorruptDataError

DATA_ERRORS = (CorruptDataError, ConnectionError, FileNotFoundError, ImportError)


def parse_arch_kw(text: str) -> tuple:
    """``key=value`` -> ``(key, value)`` with value parsed as a bool (``true``/``false``), else int,
    else float, else kept as str."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"--arch-kw expects key=value, got {text!r}")
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    for parse in (int, float):
        try:
            return key, parse(value)
        except ValueError:
            pass
    return key, value


# The recipe fields an --extra-heldout set may override, with their types.
EXTRA_RECIPE_KEYS = {"optimizer": str, "lr": float, "momentum": float, "weight_decay": float, "schedule": str,
                     "gamma": float, "epochs": int, "batch_size": int, "label_smoothing": float}


def parse_extra_heldout(text: str) -> Tuple[str, int, Dict[str, Any]]:
    """``NAME:COUNT[:KEY=VALUE,...]`` -> ``(name, count, recipe overrides)``, e.g. ``adam:3:optimizer=adam``
    or ``adam:3:optimizer=adam,lr=0.001`` (keys: :data:`EXTRA_RECIPE_KEYS`)."""
    usage = f"--extra-heldout expects NAME:COUNT[:KEY=VALUE,...] such as adam:3:optimizer=adam, got {text!r}"
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[0]:
        raise argparse.ArgumentTypeError(usage)
    try:
        count = int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(usage) from None
    overrides: Dict[str, Any] = {}
    for item in (parts[2].split(",") if len(parts) == 3 and parts[2] else []):
        key, separator, value = item.partition("=")
        if not separator or key not in EXTRA_RECIPE_KEYS:
            raise argparse.ArgumentTypeError(f"--extra-heldout {text!r}: {item!r} is not KEY=VALUE with KEY one of "
                                             f"{', '.join(EXTRA_RECIPE_KEYS)}")
        try:
            overrides[key] = EXTRA_RECIPE_KEYS[key](value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--extra-heldout {text!r}: {key}={value!r} is not a valid "
                                             f"{EXTRA_RECIPE_KEYS[key].__name__}") from None
    return parts[0], count, overrides


def name_parser(canonical: Callable[[str], str]) -> Callable[[str], str]:
    """An argparse ``type`` resolving aliases, whose error carries the "did you mean" hint."""

    def parse(text: str) -> str:
        try:
            return canonical(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def auto_or_count(text: str) -> Optional[int]:
    """``auto`` -> ``None`` (starfast chooses), else an int."""
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None


def parse_milestones(text: str) -> List[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--milestones expects comma-separated epochs such as 100,150, got {text!r}") from None


def parse_device(requested: str, local_rank: Optional[int] = None) -> torch.device:
    """``--device``: a device torch knows and this machine has (``ValueError`` otherwise); with
    ``local_rank`` (a ``torchrun`` process), CUDA means that rank's GPU."""
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"--device {requested!r} is not a device; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {requested!r}: starfast runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no GPU; use --device cpu")
    return torch.device("cuda", local_rank) if device.type == "cuda" and local_rank is not None else device


def run_command(main: Callable[[], int], command: str) -> None:
    """Exit with ``main()``'s status; Ctrl-C prints one line (what was interrupted, and that the same
    command resumes: every stage keeps its finished work and checkpoints) and exits 130."""
    try:
        status = main()
    except KeyboardInterrupt:
        print(f"\ninterrupted: {command}; run the same command again to resume (finished work and checkpoints are kept)",
              file=sys.stderr)
        status = 130
    sys.exit(status)


def check_data_dir(data_dir: Optional[Path]) -> None:
    """``--data-dir``, when given, must be an existing folder (a typo would otherwise become a new,
    empty folder and a download attempt)."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise ValueError(f"--data-dir {data_dir} is not an existing folder; create it, or omit the flag to use "
                         "$STARFAST_DATA or ~/.cache/starfast")


def parse_arguments(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """``parser.parse_args``, except that ``-h``/``--help`` anywhere prints help and exits 0 (argparse
    would first reject an invalid value that stands before it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv):
        parser.print_help()
        parser.exit(0)
    return parser.parse_args(argv)
