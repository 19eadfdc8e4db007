"""Names a package imports on first use (module ``__getattr__``/``__dir__``, PEP 562).

A package lists its public names and the module each comes from; a process that needs
one part of the library (the tracker, the sidecar, a command) does not pay for the
modules it never uses (docs/benchmarks.md, start-up).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_names"]


def lazy_names(
    namespace: dict[str, Any], names: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of the package whose globals are ``namespace``:
    ``names`` maps each lazily imported name to its module. A name is imported once,
    then found in ``namespace`` directly."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *names})

    return __getattr__, __dir__
