"""The process's open-files limit: raised at start, read to size the stream caps below it."""

from __future__ import annotations

import resource

__all__ = ["WANTED_OPEN_FILES", "open_files_limit", "raise_open_files_limit"]

WANTED_OPEN_FILES = 65536


def open_files_limit() -> int:
    """This process's soft RLIMIT_NOFILE (what ``open`` and ``accept`` fail beyond)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_open_files_limit(wanted: int = WANTED_OPEN_FILES) -> int:
    """Raise the soft open-files limit towards ``wanted`` (at most the hard limit); return the new one.

    Many distributions start services with a soft limit of 1,024 and a hard one far above it; p2pd,
    started after this, inherits the raised limit too.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft  # a sandbox may refuse; the stream caps below still fit the old limit
        return target
    return soft
