"""What a result was computed with: the software versions, the CPU, the threads and the device, so
that a table states where its numbers came from (issue 26: a fresh run on another CPU trains other
models, since float rounding differs)."""
from __future__ import annotations

import os
import platform
from typing import Any, Dict, Mapping, Optional

import torch

import starfast


def versions() -> Dict[str, str]:
    """torch, starfast and Python versions."""
    return {"torch": torch.__version__, "starfast": starfast.__version__, "python": platform.python_version()}


def environment(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """:func:`versions`, the CPU's name and count, torch's intra-op threads and the device (with
    the GPU's name on CUDA)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    described = str(device)
    if device.type == "cuda":
        described += f" ({torch.cuda.get_device_name(device)})"
    return {**versions(), "cpu": cpu_name(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "device": described}


def cpu_name() -> str:
    """The CPU's model name (Linux: ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def environment_line(entry: Optional[Mapping[str, Any]]) -> str:
    """One line for a table: ``environment: torch …, Python …, CPU (N cpus), T threads, device``;
    empty for results recorded before environments were."""
    if not entry:
        return ""
    threads = entry["threads"]
    return (f"environment: torch {entry['torch']}, starfast {entry['starfast']}, Python {entry['python']}, "
            f"{entry['cpu']} ({entry['cpus']} cpus), {threads} thread{'s' if threads != 1 else ''}, {entry['device']}")
