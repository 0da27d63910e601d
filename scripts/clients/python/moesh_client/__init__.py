"""Python client of `moesh serve` (docs/PROTOCOL.md); see client.py."""

from .client import Client, HandshakeError, MoeshError

__all__ = ["Client", "HandshakeError", "MoeshError"]
__version__ = "0.1.0"
