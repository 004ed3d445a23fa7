"""The device agent: serves the active model, talks MQTT to the fleet, and applies OTA updates safely.

A subsystem beside the inference runtime (``device_runtime``'s top level), which never imports it.

    agent.py      ``Agent``: the wiring of commands, telemetry and serving around the ``Deployer``
    deployer.py   ``Deployer``: the deployment state machine (stage -> trial -> health -> commit / rollback
                  / recover), every phase transition in one place
    ota.py        the pure rules: command parsing, the ``Deployment`` record, ``recover``'s decision
    slots.py      the A/B slots and ``pointer.json`` (the commit point)
    staging.py    download, verify, install into the inactive slot (in a helper process by default)
    download.py   resumable, capped HTTP downloads
    link.py       ``Link``: the Protocol the agent talks to the fleet through
    mqtt.py       ``DeviceLink``: the MQTT link on the agent's threads
    linkproc.py   ``LinkProcess``: the same link in a helper process
    outbox.py     telemetry and events kept while the broker is unreachable
    crash.py      the crash test hook (``EDGESHIP_AGENT_CRASH_AT``)
    config.py     ``AgentConfig``
    _records.py, _serving.py, _worker.py, _backoff.py, _child.py: their internal helpers

``Agent`` and ``AgentConfig`` are imported on first use: the helper processes
(``python -m device_runtime.agent.linkproc`` / ``.staging``) import this package too, and must not pay
for numpy and the model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from device_runtime.agent.agent import Agent, AgentConfig
    from device_runtime.agent.crash import CRASH_ENV, CRASH_POINTS

_LAZY = {
    "Agent": "device_runtime.agent.agent",
    "AgentConfig": "device_runtime.agent.agent",
    "CRASH_ENV": "device_runtime.agent.crash",
    "CRASH_POINTS": "device_runtime.agent.crash",
}

__all__ = ["CRASH_ENV", "CRASH_POINTS", "Agent", "AgentConfig"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'device_runtime.agent' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
