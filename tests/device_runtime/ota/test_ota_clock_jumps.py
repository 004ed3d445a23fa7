"""The device's wall clock jumps forward and back under a running agent (in-process, the clock injected).

What the wall clock decides, as docs/ota.md documents it ("the device's clock decides"): ``expires_at``,
the ``issued_at`` age limit and the journal's horizon. Everything timed (the telemetry interval, download
deadlines, health-check timeouts, reconnect backoff) runs on the monotonic clock and must not notice the
jumps; telemetry ``seq`` comes from the outbox's durable counter and keeps increasing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_parts import Broker, HttpServer, wait_for
from ota_parts import Fleet, assert_serves_v, deploy_cmd, serve

from device_runtime.agent import Agent

pytestmark = pytest.mark.timeout(90)
DAY = 86400.0  # seconds


class JumpingClock:
    """Unix time plus an offset the test moves: the device's clock set wrong, or corrected, while running."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def _ping(cmd_id: str, issued_at: float, **extra: float) -> dict[str, object]:
    return {"schema": 1, "id": cmd_id, "type": "ping", "issued_at": issued_at, **extra}


def _telemetry_pace(fleet: Fleet, seconds: float = 1.0) -> int:
    before = len(fleet.telemetry())
    time.sleep(seconds)
    return len(fleet.telemetry()) - before


def test_wall_clock_jumps_forward_and_back(
    broker: Broker,
    agent_factory: Callable[..., Agent],
    fleet_factory: Callable[..., Fleet],
    http_server: HttpServer,
    v1: Path,
    v2: Path,
) -> None:
    clock = JumpingClock()
    fleet = fleet_factory(broker.port)
    agent = agent_factory(broker.port, v1, wall_clock=clock, telemetry_interval_s=0.1)
    fleet.wait_status(lambda s: s["state"] == "online" and s["model"] is not None, what="online with v1")
    now = time.time()  # the fleet's clock, right
    fleet.send(_ping("p0", now))
    fleet.wait_phase("p0", "pong")
    steady = _telemetry_pace(fleet)
    assert 4 <= steady <= 15, steady  # ~10 a second

    # +1 day: the device's clock runs ahead
    clock.offset = DAY
    assert 4 <= _telemetry_pace(fleet) <= 15  # the interval is monotonic: no burst, no stall
    # an hour of validity on the fleet's clock has passed on the device's: refused, as documented
    fleet.send(_ping("p1", now, expires_at=now + 3600))
    assert fleet.wait_phase("p1", "failed")["detail"]["error"] == "Expired"
    # issued a day "ago" is within max_command_age_s (7 days): a deploy runs to the end
    serve(http_server, v2)
    fleet.send(deploy_cmd(http_server.url, v2, "d1", issued_at=now, expires_at=now + 2 * DAY))
    fleet.wait_phase("d1", "active", 30)
    assert_serves_v(agent, 2)
    fleet.send(_ping("p0", now))  # a redelivery is a duplicate, not a second pong
    wait_for(lambda: any(e["detail"].get("duplicate") for e in fleet.events("p0")), 10, "p0 a duplicate")

    # +8 days: p0 is older than max_command_age_s on the device's clock; a replay of it is refused
    # (forgotten by age, then refused by age), never answered again
    clock.offset = 8 * DAY
    fleet.send(_ping("p2", time.time() + 8 * DAY))  # a command stamped by the device's own clock: fine
    fleet.wait_phase("p2", "pong")
    fleet.send(_ping("p0", now))
    assert fleet.wait_phase("p0", "failed")["detail"]["error"] == "Replay"
    assert fleet.phases("p0").count("pong") == 1

    # -1 day: the device's clock behind; commands "from the future" are accepted (docs/ota.md)
    clock.offset = -DAY
    assert 4 <= _telemetry_pace(fleet) <= 15
    fleet.send({"schema": 1, "id": "r1", "type": "rollback", "issued_at": time.time()})
    assert fleet.wait_phase("r1", "rolled_back", 30)["detail"]["model"]["version"] == 1
    assert_serves_v(agent, 1)
    fleet.send({"schema": 1, "id": "r1", "type": "rollback", "issued_at": time.time()})  # de-duplicated by id
    wait_for(lambda: any(e["detail"].get("duplicate") for e in fleet.events("r1")), 10, "r1 a duplicate")
    # d1 was forgotten by age while the clock ran 8 days ahead; now its issued_at is within the age limit
    # again: the journal's horizon refuses its replay (before the fix it ran a second time)
    fleet.send(deploy_cmd(http_server.url, v2, "d1", issued_at=now, expires_at=now + 2 * DAY))
    assert fleet.wait_phase("d1", "failed")["detail"]["error"] == "Replay"
    time.sleep(0.5)
    assert fleet.phases("r1").count("rolled_back") == 1 and fleet.phases("d1").count("active") == 1
    assert_serves_v(agent, 1)

    # telemetry seq: strictly increasing in the order the fleet got it, across every jump
    seqs: list[int] = []
    for t in fleet.telemetry():
        if not seqs or t["seq"] > seqs[-1]:
            seqs.append(int(t["seq"]))
        else:
            assert t["seq"] in seqs, (t["seq"], seqs[-5:])  # only a redelivery may come out of order
    assert len(seqs) >= 30, len(seqs)
