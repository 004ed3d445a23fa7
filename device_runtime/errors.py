"""The device runtime's errors; they live in ``sdk.errors``' one tree and are re-exported here."""

from __future__ import annotations

from sdk.errors import HealthCheckError, ModelClosedError, StateError

__all__ = ["HealthCheckError", "ModelClosedError", "StateError"]
