"""Which torch this is, and a clear error where a feature needs a newer one.

grokopt declares ``torch>=2.5`` (pyproject.toml): every torch API the library calls exists
there (see "Requirements" in docs/methods.md for the list and the version each appeared in).
A few things users combine with grokopt are newer; asking for them on an older torch raises
:class:`TorchTooOldError` naming the feature and the version it needs, instead of an
``AttributeError`` or ``ImportError`` from deep inside torch.

The checks look for the feature itself, not at the version number, so a nightly or a
vendor build that has it works; the version is only what the message recommends.

It also holds the spellings that only some supported torch versions accept (see
:func:`extremes`), and :data:`Tensors`, how the multi-tensor ops' results are typed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "MIN_TORCH", "Tensors", "TorchTooOldError", "check_torch_floor", "extremes", "fully_shard",
    "muon", "torch_version",
]

#: What torch's multi-tensor (``torch._foreach_*``) ops return (a tuple) or take (a list or
#: a tuple) as tensors.
Tensors = tuple[torch.Tensor, ...] | list[torch.Tensor]

#: The oldest torch grokopt supports; keep equal to the floor in pyproject.toml.
MIN_TORCH = (2, 5)

# Feature -> (the torch release that made it public, what grokopt uses it for).
FSDP2_FULLY_SHARD = ("torch.distributed.fsdp.fully_shard", (2, 6), "FSDP2 sharding")
OPTIM_MUON = ("torch.optim.Muon", (2, 9), "the Muon optimizer")


class TorchTooOldError(ImportError):
    """The installed torch lacks a feature that was asked for; the message names the version."""


def torch_version(version: str | None = None) -> tuple[int, int, int]:
    """``(major, minor, patch)`` of ``version`` (default: the installed torch).

    Local and pre-release tags are ignored: ``"2.6.0a0+git1234"`` is ``(2, 6, 0)``.

    Example:
        >>> torch_version("2.14.1+cpu")
        (2, 14, 1)
        >>> torch_version("2.6.0.dev20241201")
        (2, 6, 0)
    """
    text = str(torch.__version__ if version is None else version)
    match = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        raise ValueError(f"version must look like 'MAJOR.MINOR[.PATCH]...', got {text!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def extremes(x: torch.Tensor) -> torch.Tensor:
    """``x``'s smallest and largest entry, stacked, in one pass (``torch.aminmax``).

    The pair is unpacked before it is stacked: torch 2.5's compiler cannot iterate the
    result of ``aminmax`` itself, and a compiled step would fail there.

    Example:
        >>> extremes(torch.tensor([3.0, -1.0, 2.0]))
        tensor([-1.,  3.])
    """
    lo, hi = torch.aminmax(x)
    return torch.stack((lo, hi))


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(v) for v in version)


def check_torch_floor(version: str | None = None) -> None:
    """Raise :class:`TorchTooOldError` if ``version`` (default: the installed torch) is older
    than :data:`MIN_TORCH`.

    pip enforces the floor when it installs grokopt; this catches the environments it does
    not see (``--no-deps``, a torch swapped in later), where an old torch would otherwise
    fail far from the cause (for example ``torch.distributed.tensor`` missing before 2.5).

    Example:
        >>> check_torch_floor("2.14.1")
        >>> check_torch_floor("2.4.1")
        Traceback (most recent call last):
            ...
        grokopt._compat.TorchTooOldError: grokopt needs torch>=2.5, found torch 2.4.1. ...
    """
    found = str(torch.__version__ if version is None else version)
    if torch_version(found)[:2] < MIN_TORCH:
        raise TorchTooOldError(
            f"grokopt needs torch>={_dotted(MIN_TORCH)}, found torch {found}. Upgrade torch "
            f"(pip install 'torch>={_dotted(MIN_TORCH)}'); the torch APIs grokopt relies on "
            f"and the version each appeared in are listed under 'Requirements' in "
            f"docs/methods.md"
        )


def _require(feature: tuple[str, tuple[int, int], str], load: Callable[[], Any]) -> Any:
    name, needed, purpose = feature
    if not torch.distributed.is_available() and name.startswith("torch.distributed"):
        raise TorchTooOldError(
            f"{purpose} needs {name}, but this torch ({torch.__version__}) was built without "
            f"torch.distributed; install a build with distributed support "
            f"(torch>={_dotted(needed)})"
        )
    try:
        found = load()
    except (ImportError, AttributeError) as exc:
        raise TorchTooOldError(
            f"{purpose} needs {name}, which is public from torch {_dotted(needed)} on; this "
            f"is torch {torch.__version__}. Upgrade torch (pip install "
            f"'torch>={_dotted(needed)}')"
        ) from exc
    return found


def fully_shard() -> Callable[..., Any]:
    """``torch.distributed.fsdp.fully_shard`` (FSDP2, public from torch 2.6).

    Raises :class:`TorchTooOldError` naming torch 2.6 where it is missing.
    """

    def load() -> Any:
        # (no such name before torch 2.6, which type checkers see there)
        from torch.distributed.fsdp import fully_shard as found  # type: ignore[attr-defined, unused-ignore]

        return found

    return _require(FSDP2_FULLY_SHARD, load)


def muon() -> type[torch.optim.Optimizer]:
    """``torch.optim.Muon`` (added in torch 2.9).

    Raises :class:`TorchTooOldError` naming torch 2.9 where it is missing.
    """
    # (no such name before torch 2.9, which type checkers see there)
    return _require(OPTIM_MUON, lambda: torch.optim.Muon)  # type: ignore[attr-defined, unused-ignore]
