"""Errors raised only by the device runtime, all inside ``sdk.errors``' one tree.

They live here until the kernel adopts them; each subclasses the ``sdk.errors`` class a caller
would already catch, so ``except EdgeshipError`` (the CLIs) and ``except IntegrityError`` keep working.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdk.errors import EdgeshipError, IntegrityError

__all__ = ["HealthCheckError", "ModelClosedError", "StateError"]


class ModelClosedError(EdgeshipError):
    """``predict`` or ``health_check`` was called on a ``Model`` after ``close()``."""


class HealthCheckError(IntegrityError):
    """The model did not reproduce its bundle's golden outputs on this device.

    Attributes:
        metrics: what was measured, the same dict ``Model.health_check`` returns on success.
    """

    def __init__(self, message: str, metrics: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.metrics: dict[str, Any] = dict(metrics or {})


class StateError(EdgeshipError):
    """The device's state directory is unreadable, corrupt or cannot be written."""
