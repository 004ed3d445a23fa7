"""Mosquitto killed with SIGKILL (three times) while a real agent publishes telemetry at a high rate.

The fleet plays a persistent-session subscriber (QoS 1). Afterwards every telemetry ``seq`` the agent's
outbox handed out and then deleted on the broker's PUBACK (all of them, once the outbox has drained) must
have reached the fleet: no accepted seq is lost; duplicates are allowed (the fleet de-duplicates by seq).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_parts import Broker, wait_for
from ota_parts import AgentProcess, Fleet, unique_seqs
from runtime_bundles import Keys

from sdk.mqtt_contract import decode_payload

pytestmark = pytest.mark.timeout(120)
INTERVAL_S = 0.02  # seconds between telemetry messages: ~50 a second
KILLS = 3


@pytest.fixture
def agent(tmp_path: Path, broker: Broker, keys: Keys, v1: Path) -> Iterator[AgentProcess]:
    proc = AgentProcess(tmp_path / "state-dev1", broker.port, "dev1", keys.public, v1)
    proc.args[proc.args.index("--telemetry-interval") + 1] = str(INTERVAL_S)
    yield proc
    proc.kill()


def _outbox(state_dir: Path) -> tuple[int, set[int]]:
    """(the last telemetry seq handed out, the telemetry seqs still waiting for a PUBACK)."""
    db = sqlite3.connect(f"file:{state_dir / 'outbox.sqlite'}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute("SELECT value FROM counters WHERE name = 'seq:telemetry'").fetchone()
        rows = db.execute("SELECT topic, payload FROM messages").fetchall()
    finally:
        db.close()
    waiting = {int(decode_payload(bytes(p))["seq"]) for t, p in rows if t.endswith("/telemetry")}
    return (int(row[0]) if row else 0), waiting


def test_broker_killed_under_telemetry_load_loses_no_acknowledged_seq(
    agent: AgentProcess, broker: Broker, fleet_factory: Callable[..., Fleet]
) -> None:
    fleet = fleet_factory(broker.port)
    agent.start()
    wait_for(lambda: len(fleet.telemetry()) >= 50, 30, "telemetry flowing", 0.05)
    time.sleep(1.5)  # past Mosquitto's autosave (1 s): the fleet's persistent session is on disk
    for _ in range(KILLS):
        before = len(fleet.telemetry())
        broker.kill9()
        time.sleep(0.5)  # the agent queues in its outbox meanwhile
        broker.start()
        wait_for(lambda b=before: len(fleet.telemetry()) >= b + 50, 30, "telemetry flowing again", 0.05)
        time.sleep(1.5)  # load on the restarted broker, past its next autosave
    assert agent.alive, agent.tail()
    assert agent.terminate() == 0, agent.tail()  # graceful: the link drains what it can, then stops
    last, waiting = _outbox(agent.state_dir)
    assert last > 200, last
    acknowledged = set(range(1, last + 1)) - waiting  # deleted from the outbox on the broker's PUBACK
    missing = acknowledged - set(unique_seqs(fleet.telemetry()))
    wait_for(lambda: not (acknowledged - set(unique_seqs(fleet.telemetry()))), 10, f"seqs {sorted(missing)[:20]}", 0.1)
