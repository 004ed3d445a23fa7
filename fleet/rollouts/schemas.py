"""The API's request bodies for rollouts (responses are the plain dicts of ``service``'s read views)."""

from __future__ import annotations

from pydantic import BaseModel, Field

__all__ = ["CommandBody", "RolloutCreate"]


class RolloutCreate(BaseModel):
    """``POST /rollouts``: the words of ``edgeship rollout create``, checked by ``spec.parse_spec``."""

    release: str = Field(description="NAME:VERSION", examples=["digits:5"])
    devices: str = Field(description="device selector: tag=k=v, group=NAME, id=a,b or all")
    waves: str = Field(default="1,10%,50%,100%", description="cumulative counts or percentages, ending at 100%")
    soak: str = Field(default="5m", description="how long every gate must hold after a wave, e.g. 30s, 5m, 1h")
    gates: list[str] = Field(default_factory=list, examples=[["health_failures=0", "error_rate<=1%"]])
    rate_per_s: float = Field(default=10.0, description="deploy commands per second")
    wave_timeout: str = Field(default="30m", description="a device not active this long after its deploy failed")
    resend: str | None = Field(
        default=None,
        description="resend a command with no event after this long (same id); default: the server's "
        "command_resend_s (60s unless set)",
    )
    baseline: str = Field(
        default="1h", description="the window before a wave whose telemetry is the previous version's baseline"
    )


class CommandBody(BaseModel):
    """``POST /rollouts/{id}/pause|resume|abort``: an optional reason for the audit log."""

    reason: str = Field(default="", max_length=500)
