"""The one message for a missing optional dependency of the tools (``pip install grokopt[race]``).

A leaf module (it imports nothing of grokopt), so that the tasks and the race can both use
it without either importing the other for it.
"""

from __future__ import annotations

from typing import NoReturn

__all__ = ["require_race_extra"]


def require_race_extra(module: str) -> NoReturn:
    """Raise a clear ImportError naming the missing optional package and how to install it.

    Example:
        >>> require_race_extra("rich")
        Traceback (most recent call last):
        ...
        ImportError: grokopt's race needs the optional package 'rich'; install it with: pip install grokopt[race]
    """
    raise ImportError(
        f"grokopt's race needs the optional package {module!r}; "
        "install it with: pip install grokopt[race]"
    )
