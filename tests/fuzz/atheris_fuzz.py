"""Coverage-guided fuzzing of one target with atheris (libFuzzer), for CI and by hand.

    python -m tests.fuzz.atheris_fuzz TARGET [libFuzzer flags] [CORPUS_DIR ...]

TARGET is one of ``harness.TARGETS`` (frame, tensor, info, forward, backward, inference). Only
``protocols`` and ``peerd`` (less its model code) are instrumented (torch, numpy and hivemind are imported
first, uninstrumented: coverage of them would only slow the search). libFuzzer writes new inputs to
the first corpus directory; pass a scratch directory first and ``tests/fuzz/corpus/TARGET`` after it
to start from the kept corpus without changing it. A failing input is written to
``-artifact_prefix``; keep it with ``harness.add_to_corpus`` once fixed.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    import atheris

    # Heavy dependencies first, so that instrument_imports leaves them alone.
    import msgpack  # noqa: F401
    import numpy  # noqa: F401
    import prometheus_client  # noqa: F401
    import torch  # noqa: F401

    with atheris.instrument_imports(include=["protocols", "peerd"], exclude=["peerd.model", "peerd.client"]):
        from tests.fuzz import harness

    if len(argv) < 2 or argv[1] not in harness.TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.atheris_fuzz {{{','.join(harness.TARGETS)}}} [libFuzzer args]")
    target = harness.TARGETS[argv[1]]

    def one_input(data: bytes) -> None:
        target(data)

    atheris.Setup([argv[0], *argv[2:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
