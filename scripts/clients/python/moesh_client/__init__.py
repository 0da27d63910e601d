"""Python client of `moesh serve` (docs/PROTOCOL.md); see client.py."""

from .client import Client, MoeshError

__all__ = ["Client", "MoeshError"]
__version__ = "0.1.0"
