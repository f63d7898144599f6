"""`peerd run` whose blocks perturb every output, as its own process (the attacker of
tests/integration/test_spot_check_defaults.py): ``python -m tests.integration.lying_peer run ...``
takes exactly the arguments of ``peerd run``. It also claims 3x the throughput it measured (within
what clients believe of an unmeasured claim), so that fresh clients route through it often."""

from __future__ import annotations

import sys
from dataclasses import replace

from peerd.cli.main import main
from peerd.daemon.peer import Peer
from tests.helpers.liar import PerturbedStage

_startup = Peer.startup


async def _lying_startup(self: Peer) -> None:
    await _startup(self)
    assert self.servicer is not None
    self.servicer.stage = PerturbedStage(self.servicer.stage, scale=0.5)  # type: ignore[assignment]
    assert self.capacity is not None
    claim = 3 * self.capacity.decode_tokens_per_s
    self.capacity = replace(self.capacity, decode_tokens_per_s=claim, prefill_tokens_per_s=claim)
    await self.announce()


if __name__ == "__main__":
    Peer.startup = _lying_startup  # type: ignore[method-assign]
    sys.exit(main(sys.argv[1:]))
