"""Python client of the upstream sandbox API (``upstream serve``).

Synchronous and standard-library only. Every method maps to one route of the API, which
``crates/server/openapi.json`` describes; command output and files are ``bytes``.
"""

from ._client import (
    Client,
    ExecResult,
    Process,
    Sandbox,
    StreamEvent,
    UpstreamError,
)

__all__ = [
    "Client",
    "ExecResult",
    "Process",
    "Sandbox",
    "StreamEvent",
    "UpstreamError",
]
__version__ = "0.1.0"
