"""Shared pytest configuration: the opt-in flag for slow tests."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# HYPOTHESIS_PROFILE=ci (set by .ci/run): no per-example deadline on a loaded CI machine; the fuzz
# tests (tests/fuzz) also read it to run their large case counts.
settings.register_profile("ci", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=os.environ.get("PEERD_RUN_SLOW") == "1",
        help="run tests marked slow (real model, chaos, namespaces); CI passes this",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow test: pass --run-slow (or PEERD_RUN_SLOW=1) to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
