"""Issue 14, item 7: a command the journal cannot store is answered, and does not poison the journal."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from device_runtime.agent import Agent


def test_a_command_the_journal_cannot_store_is_answered_and_the_journal_goes_on(
    agent_factory: Callable[..., Agent],
) -> None:
    agent = agent_factory(1, start=False, link_process=False)  # never connects: events stay in the outbox
    bad: dict[str, Any] = {"schema": 1, "id": "nan-1", "type": "deploy", "url": "http://x/b", "sha256": "ab" * 32}
    agent._on_command({**bad, "note": float("nan")})  # what a decoder letting NaN through would hand over
    agent._on_command({"schema": 1, "id": "ping-1", "type": "ping"})
    assert agent._outbox is not None
    events = [json.loads(m.payload) for m in agent._outbox.pending(100)]
    assert [(e["cmd_id"], e["phase"]) for e in events] == [("nan-1", "failed"), ("ping-1", "pong")]
    assert events[0]["detail"]["error"] == "ManifestError"
    assert agent._journal.get("ping-1") is not None and agent._journal.get("nan-1") is None
    assert agent._journal.unfinished() == []
