"""RPC handlers of a peer, one per libp2p stream protocol (see protocols/README.md).

Every handler follows the same shape: read the client's ``Hello``, then its request, validate
everything before any compute, run torch work on the compute runtime, and answer. Any failure is
answered with an ``Error`` frame carrying a code; nothing a client sends can take the peer down,
and one client's bad request never touches another client's state.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from peerd import __version__
from peerd.rpc.tensors import from_wire
from peerd.server.compute import backward as compute_backward
from peerd.server.compute import forward as compute_forward
from peerd.server.frames import result_to_wire
from peerd.server.inference import InferenceHandlers
from peerd.server.validation import (
    check_grad_output,
    check_hidden,
    check_range,
)
from protocols import (
    PROTOCOL_VERSION,
    BackwardRequest,
    BackwardResponse,
    ErrorCode,
    ForwardRequest,
    ForwardResponse,
    InfoRequest,
    InfoResponse,
    ProtocolError,
)

__all__ = ["BlockServicer"]

logger = logging.getLogger(__name__)


class BlockServicer(InferenceHandlers):
    """Serves the blocks of one :class:`Stage` over the stream protocols (see protocols/README.md)."""

    def info(self) -> InfoResponse:
        return InfoResponse(
            model_id=self.model_id,
            block_start=self.stage.start,
            block_end=self.stage.end,
            num_blocks_total=self.stage.config.num_layers,
            dtype=str(self.stage.dtype).removeprefix("torch."),
            max_batch_tokens=self.limits.max_batch_tokens,
            max_session_length=self.limits.max_session_length,
            cache_tokens_free=self.table.available_tokens(),
            cache_tokens_total=self.budget.total_tokens,
            state="offline" if self.draining else self.state,
            protocol_version=PROTOCOL_VERSION,
            package_version=__version__,
            public_name=self.public_name,
            extra={
                "sessions": len(self.sessions),
                "max_sessions": self.limits.max_sessions,
                "compute_busy_s": self.runtime.busy_s,  # lets a client measure pipeline bubbles
                "memory": self.memory.snapshot(),
                "quant": self.stage.quant,  # how the weights are stored (the record says the same)
                "weight_bytes": self.stage.weight_bytes,
            },
        )

    async def rpc_info(self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def body(owner: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            request = await self._read(reader)
            if not isinstance(request, InfoRequest):
                raise ProtocolError(
                    ErrorCode.UNEXPECTED_MESSAGE, f"expected info_request, got {type(request).__name__}"
                )
            await self._send(writer, self.info())

        await self._serve("info", stream_info, reader, writer, body)

    # --- forward / backward (stateless) ---------------------------------------------------------

    async def rpc_forward(self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def body(owner: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            request = await self._read(reader)
            if not isinstance(request, ForwardRequest):
                raise ProtocolError(
                    ErrorCode.UNEXPECTED_MESSAGE, f"expected forward_request, got {type(request).__name__}"
                )
            check_range(self.stage, request.start, request.end)
            hidden = from_wire(request.hidden)
            check_hidden(hidden, self.stage, self.limits)
            compute = functools.partial(compute_forward, self.stage, hidden, request.start, request.end)
            out = await self.runtime.run_chunks(compute, owner)
            self.metrics.tokens.labels(phase="forward").inc(hidden.shape[0] * hidden.shape[1])
            response = ForwardResponse(result_to_wire(out, request.response_compression), request.request_id)
            await self._send(writer, response)

        await self._serve("forward", stream_info, reader, writer, body)

    async def rpc_backward(self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def body(owner: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            request = await self._read(reader)
            if not isinstance(request, BackwardRequest):
                raise ProtocolError(
                    ErrorCode.UNEXPECTED_MESSAGE, f"expected backward_request, got {type(request).__name__}"
                )
            check_range(self.stage, request.start, request.end)
            hidden = from_wire(request.hidden)
            grad_output = from_wire(request.grad_output)
            check_hidden(hidden, self.stage, self.limits)
            check_grad_output(grad_output, hidden)
            compute = functools.partial(
                compute_backward, self.stage, self.memory, hidden, grad_output, request.start, request.end
            )
            grad_input = await self.runtime.run_chunks(compute, owner)
            self.metrics.tokens.labels(phase="backward").inc(hidden.shape[0] * hidden.shape[1])
            await self._send(
                writer,
                BackwardResponse(result_to_wire(grad_input, request.response_compression), request.request_id),
            )

        await self._serve("backward", stream_info, reader, writer, body)

    async def drain(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for open sessions to end, then hand the rest back with DRAINING."""
        await self.table.drain(timeout_s)
