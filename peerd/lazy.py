"""Package names that load on first use (PEP 562), so that importing one light module of a package
(``peerd.client.routing`` in the simulator, ``peerd.model.registry`` in the CLI's parser) does not
pull in torch and hivemind through the package's ``__init__``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports each name from its home module, given
    by ``homes`` (name -> module), when it is first read."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(home), name)

    return __getattr__
