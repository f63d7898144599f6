"""``peerd api``: an OpenAI-compatible HTTP server that is a client of the swarm (no blocks of its own)."""

from peerd.api.app import ApiSettings, build_app
from peerd.api.metrics import ApiMetrics
from peerd.api.schema import ApiError, CompletionRequest, parse_request

__all__ = ["ApiError", "ApiMetrics", "ApiSettings", "CompletionRequest", "build_app", "parse_request"]
