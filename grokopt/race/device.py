"""Where the tools run: the one device resolver and the one environment probe that the race
and ``grokopt bench`` write beside their numbers."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import torch

import grokopt

__all__ = ["cuda_ids", "environment", "resolve_device", "sync"]

_ALLOWED = "'auto', 'cpu', 'cuda' or 'cuda:N'"


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"``/``"cuda:N"`` fail clearly
    without a GPU (``ValueError`` naming the argument), and ``"cuda"`` becomes the current
    CUDA device.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device("tpu")
        Traceback (most recent call last):
        ...
        ValueError: device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'
    """
    text = str(device) if isinstance(device, torch.device) else device
    if not isinstance(text, str):
        raise TypeError(f"device must be {_ALLOWED} or a torch.device, got "
                        f"{type(device).__name__}: {device!r}")
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be {_ALLOWED}, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {text!r} requested but torch.cuda.is_available() is False")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA) before a clock is read."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_ids(device: torch.device) -> list[int]:
    """The CUDA device indices whose random state ``torch.random.fork_rng`` must keep."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """The machine and versions behind a set of numbers (written beside them in JSON).

    Example:
        >>> env = environment(torch.device("cpu"))
        >>> env["device"], env["torch"] == torch.__version__
        ('cpu', True)
    """
    env: dict[str, Any] = {
        "grokopt": grokopt.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, device_memory_bytes=props.total_memory,
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return env
