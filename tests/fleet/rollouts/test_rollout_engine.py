"""The pure engine, driven by a fake clock and fake devices: no broker, no database."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pytest

from fleet.rollouts.engine import (
    Abort,
    Action,
    AdvanceWave,
    Complete,
    DeviceDone,
    DeviceState,
    ModelStats,
    Observations,
    Pause,
    Resume,
    RollbackDone,
    RolloutState,
    SendDeploy,
    SendRollback,
    SoakStarted,
    TransitionError,
    apply,
    decide,
    deploy_cmd_id,
    operator,
    rollback_cmd_id,
)
from fleet.rollouts.spec import parse_spec


def make_state(n: int = 10, waves: str = "1,50%,100%", gates: Sequence[str] = (), **kw: object) -> RolloutState:
    args: dict[str, object] = {"soak": "60s", "rate_per_s": 1000, "wave_timeout": "10m", "resend": "30s"}
    args.update(kw)
    spec = parse_spec("m:2", "all", waves, gates=gates, **args)  # type: ignore[arg-type]
    sizes = spec.wave_sizes(n)
    devices = tuple(DeviceState(f"d{i:02d}", next(w for w, s in enumerate(sizes) if i < s)) for i in range(n))
    return RolloutState(7, spec, "pending", devices)


@dataclass
class Sim:
    """Devices that answer deploys with events (``active`` unless told otherwise), and a clock."""

    state: RolloutState
    now: float = 1000.0
    phases: dict[str, frozenset[str]] = field(default_factory=dict)
    outcome: dict[str, str | None] = field(default_factory=dict)  # device -> "failed" | None (silent) | "active"
    seen: dict[str, float] = field(default_factory=dict)
    new: ModelStats = field(default_factory=ModelStats)
    previous: ModelStats = field(default_factory=ModelStats)
    log: list[Action] = field(default_factory=list)

    def step(self, dt: float = 1.0) -> list[Action]:
        self.now += dt
        obs = Observations(self.phases, self.seen, self.new, self.previous)
        actions = decide(self.state, obs, self.now)
        self.state = apply(self.state, actions, self.now)
        self.log += actions
        for a in actions:  # devices answer at once
            if isinstance(a, SendDeploy):
                answer = self.outcome.get(a.device_id, "active")
                if answer is not None:
                    self.phases[a.cmd_id] = frozenset({"received", answer})
                    self.seen[a.device_id] = self.now
            if isinstance(a, SendRollback):
                self.phases[a.cmd_id] = frozenset({"received", "rolled_back"})
        return actions

    def run(self, until: float, dt: float = 1.0) -> None:
        while self.now < until and self.state.state in ("pending", "running"):
            self.step(dt)
            for d in self.state.devices:  # devices keep talking
                if d.status == "active" and self.outcome.get(d.device_id, "active") is not None:
                    self.seen[d.device_id] = self.now

    def kinds(self) -> list[str]:
        return [type(a).__name__ for a in self.log]


def test_a_clean_rollout_goes_wave_by_wave_to_100_percent() -> None:
    sim = Sim(make_state(10, gates=["health_failures=0", "error_rate<=1%", "p95_latency<=1.2x", "silence=5m"]))
    sim.new, sim.previous = ModelStats(1000, 2, 11.0), ModelStats(1000, 3, 10.0)
    sim.run(until=2000)
    assert sim.state.state == "completed"
    assert all(d.status == "active" for d in sim.state.devices)
    advances = [a for a in sim.log if isinstance(a, AdvanceWave)]
    assert [a.wave for a in advances] == [0, 1, 2]
    # each wave soaked 60 s with its gates recorded as evidence
    assert advances[1].evidence["soaked_s"] >= 60
    assert advances[1].evidence["gates"]["p95_latency<=1.2x"]["value"] == pytest.approx(1.1)
    assert advances[1].evidence["gates"]["error_rate<=1%"]["ok"]
    complete = next(a for a in sim.log if isinstance(a, Complete))
    assert complete.evidence["statuses"] == {"active": 5}
    # the canary alone was sent in the first wave, before any other device
    sends = [a.device_id for a in sim.log if isinstance(a, SendDeploy)]
    assert sends[0] == "d00" and len(sends) == len(set(sends)) == 10
    assert sim.kinds().count("SoakStarted") == 3


def test_a_canary_health_failure_pauses_at_once_and_sends_no_further_deploy() -> None:
    sim = Sim(make_state(10, gates=["health_failures=0"]), outcome={"d00": "failed"})
    sim.run(until=1100)
    assert sim.state.state == "paused"
    pause = next(a for a in sim.log if isinstance(a, Pause))
    assert "health_failures=0 breached: 1.0" in pause.reason
    assert pause.evidence["gates"]["health_failures=0"] == {
        "value": 1.0,
        "threshold": 0.0,
        "ok": False,
        "failed": ["d00"],
    }
    # the canary already kept its previous model (failed), so nothing to roll back, nothing else sent
    assert pause.rollback == ()
    assert [a.device_id for a in sim.log if isinstance(a, SendDeploy)] == ["d00"]
    assert sim.state.devices[0].status == "failed"


def test_a_latency_breach_pauses_and_rolls_back_the_waves_updated_devices() -> None:
    sim = Sim(make_state(10, gates=["p95_latency<=1.2x"]))
    sim.previous = ModelStats(1000, 0, 10.0)
    sim.new = ModelStats(1000, 0, 11.0)
    sim.run(until=1070)  # canary soaked: wave 1 (to 50%) is going
    assert sim.state.wave == 1
    sim.new = ModelStats(1000, 0, 15.0)  # the wave's devices are slower
    actions = sim.step()
    pause = next(a for a in actions if isinstance(a, Pause))
    assert pause.evidence["gates"]["p95_latency<=1.2x"]["value"] == pytest.approx(1.5)
    wave1 = [d.device_id for d in sim.state.in_wave(1)]
    assert sorted(pause.rollback) == wave1
    assert sorted(a.device_id for a in actions if isinstance(a, SendRollback)) == wave1  # same tick
    assert all(a.cmd_id == rollback_cmd_id(7, a.device_id) for a in actions if isinstance(a, SendRollback))
    sim.step()  # the rollbacks are reported done
    assert {d.status for d in sim.state.in_wave(1)} == {"rolled_back"}
    assert sim.state.in_wave(0)[0].status == "active"  # the canary's wave is not touched


def test_an_absolute_latency_gate() -> None:
    sim = Sim(make_state(4, waves="1,100%", gates=["p95_latency<=50ms"]))
    sim.new = ModelStats(10, 0, 80.0)
    sim.run(until=1100)
    assert sim.state.state == "paused"
    assert sim.state.paused_reason == "gate p95_latency<=50ms breached: 80.0"


def test_an_error_rate_breach() -> None:
    sim = Sim(make_state(4, waves="1,100%", gates=["error_rate<=1%"]))
    sim.new = ModelStats(200, 5, 10.0)
    sim.run(until=1100)
    pause = next(a for a in sim.log if isinstance(a, Pause))
    assert pause.evidence["gates"]["error_rate<=1%"]["value"] == pytest.approx(0.025)
    assert pause.rollback == ("d00",)
    assert rollback_cmd_id(7, "d00") in [a.cmd_id for a in sim.log if isinstance(a, SendRollback)]


def test_a_gate_without_data_holds() -> None:
    sim = Sim(make_state(4, waves="1,100%", gates=["error_rate<=1%", "p95_latency<=1.2x"]))
    sim.run(until=1300)
    assert sim.state.state == "completed"
    advance = next(a for a in sim.log if isinstance(a, AdvanceWave) and a.wave == 1)
    assert advance.evidence["gates"]["error_rate<=1%"]["value"] is None


def test_an_advance_names_the_wave_it_starts_and_the_one_that_soaked_in_the_audit_log() -> None:
    sim = Sim(make_state(4, waves="1,2,100%"))
    sim.run(until=2000)
    assert sim.state.state == "completed"
    rows = [a.audit() for a in sim.log if isinstance(a, AdvanceWave)]
    assert [(r[3]["wave"], r[3].get("soaked_wave")) for r in rows] == [(0, None), (1, 0), (2, 1)]
    complete = next(a for a in sim.log if isinstance(a, Complete))
    assert complete.audit()[3]["soaked_wave"] == 2


def test_a_device_silent_after_its_update_breaches_the_silence_gate() -> None:
    sim = Sim(make_state(4, waves="1,100%", gates=["silence=30s"], soak="5m"))
    sim.outcome["d00"] = "active"
    sim.step()  # start
    sim.step()  # canary sent, answers active
    sim.step()  # canary active
    assert sim.state.devices[0].status == "active"
    for _ in range(35):  # the canary says nothing more
        sim.now += 1.0
        sim.log += (actions := decide(sim.state, Observations(sim.phases, sim.seen), sim.now))
        sim.state = apply(sim.state, actions, sim.now)
    pause = next(a for a in sim.log if isinstance(a, Pause))
    assert pause.evidence["gates"]["silence=30s"]["silent"] == ["d00"]
    assert pause.evidence["gates"]["silence=30s"]["value"] > 30


def test_a_device_not_active_within_the_wave_timeout_counts_as_failed() -> None:
    sim = Sim(make_state(4, waves="1,100%", gates=["health_failures=0"], wave_timeout="2m"), outcome={"d00": None})
    sim.run(until=1200)
    done = next(a for a in sim.log if isinstance(a, DeviceDone))
    assert (done.device_id, done.status, done.reason) == ("d00", "failed", "not active within the wave timeout")
    assert sim.state.state == "paused"
    # silent device: the deploy was resent with the same id while waiting
    sends = [a for a in sim.log if isinstance(a, SendDeploy)]
    assert {a.cmd_id for a in sends} == {deploy_cmd_id(7, "d00")} and any(a.resend for a in sends)


def test_without_gates_a_wave_whose_every_deploy_failed_pauses_and_never_advances() -> None:
    sim = Sim(make_state(10, waves="1,50%,100%"), outcome={f"d{i:02d}": "failed" for i in range(10)})
    assert [g.text for g in sim.state.spec.gates] == ["health_failures=0"]  # implied, and shown as such
    sim.run(until=2000)
    assert sim.state.state == "paused" and sim.state.wave == 0
    assert "health_failures=0 breached: 1.0" in (sim.state.paused_reason or "")
    assert "SoakStarted" not in sim.kinds() and sim.kinds().count("AdvanceWave") == 1  # the start, no more
    assert [a.device_id for a in sim.log if isinstance(a, SendDeploy)] == ["d00"]


def test_without_gates_a_device_timing_out_pauses_the_rollout() -> None:
    sim = Sim(make_state(4, waves="1,100%", wave_timeout="2m", gates=["error_rate<=1%"]), outcome={"d00": None})
    sim.run(until=1400)
    assert sim.state.state == "paused" and sim.state.devices[0].status == "failed"


def test_a_health_failures_gate_allowing_some_lets_those_fail_and_the_rollout_complete() -> None:
    sim = Sim(make_state(4, waves="1,100%", wave_timeout="2m", gates=["health_failures<=1"]), outcome={"d00": None})
    sim.run(until=1400)
    assert [g.text for g in sim.state.spec.gates] == ["health_failures<=1"]  # no implied gate beside it
    assert sim.state.state == "completed"
    assert [d.status for d in sim.state.devices] == ["failed", "active", "active", "active"]


def test_the_rate_limit_spreads_the_deploys() -> None:
    sim = Sim(make_state(40, waves="1,100%", rate_per_s=4, soak="0s"))
    sim.run(until=1005, dt=1.0)  # start, canary, soak, advance
    start = sim.now
    sim.run(until=start + 5, dt=0.5)
    per_tick = [len([a for a in sim.log if isinstance(a, SendDeploy)])]
    sent = per_tick[0] - 1  # without the canary
    assert 16 <= sent <= 24  # ~4/s over ~5 s, bursts of at most one second's worth
    sim.run(until=start + 30, dt=0.5)
    assert sim.state.state == "completed"


def test_operator_pause_resume_and_abort() -> None:
    sim = Sim(make_state(10))
    sim.run(until=1070)
    with pytest.raises(TransitionError, match="cannot resume"):
        operator(sim.state, "resume")
    with pytest.raises(TransitionError, match="unknown command"):
        operator(sim.state, "explode")
    pause = operator(sim.state, "pause", "night freeze")
    sim.state = apply(sim.state, [pause], sim.now)
    assert (sim.state.state, sim.state.paused_reason) == ("paused", "night freeze")
    before = len([a for a in sim.log if isinstance(a, SendDeploy)])
    for _ in range(100):
        sim.step()
    assert len([a for a in sim.log if isinstance(a, SendDeploy)]) == before  # nothing sent while paused
    resume = operator(sim.state, "resume")
    assert isinstance(resume, Resume)
    sim.state = apply(sim.state, [resume], sim.now)
    sim.run(until=sim.now + 300)
    assert sim.state.state == "completed"
    aborted = apply(make_state(3), [operator(make_state(3), "abort")], 0.0)
    assert aborted.state == "aborted" and decide(aborted, Observations(), 1.0) == []
    with pytest.raises(TransitionError, match="aborted: cannot pause"):
        operator(aborted, "pause")
    assert isinstance(operator(make_state(3), "abort"), Abort)


def test_resume_after_a_breach_acknowledges_the_failures_and_goes_on() -> None:
    sim = Sim(make_state(10, gates=["health_failures=0"]), outcome={"d00": "failed"})
    sim.run(until=1100)
    assert sim.state.state == "paused"
    sim.state = apply(sim.state, [operator(sim.state, "resume")], sim.now)
    assert sim.state.failures_ack == 1
    sim.run(until=1500)
    assert sim.state.state == "completed"
    assert sim.state.devices[0].status == "failed"
    # the failed canary was never sent a second deploy
    assert [a.cmd_id for a in sim.log if isinstance(a, SendDeploy) and a.device_id == "d00"] == [
        deploy_cmd_id(7, "d00")
    ]


def test_a_device_still_deploying_at_a_breach_is_rolled_back_once_it_becomes_active() -> None:
    state = make_state(4, waves="1,100%", gates=["error_rate<=1%"])
    sim = Sim(state, outcome={"d01": None})  # d01 is slow to answer
    sim.run(until=1070)
    assert sim.state.wave == 1
    sim.new = ModelStats(100, 50)
    actions = sim.step()
    pause = next(a for a in actions if isinstance(a, Pause))
    assert "d01" in pause.rollback
    assert "d01" not in [a.device_id for a in actions if isinstance(a, SendRollback)]
    sim.phases[deploy_cmd_id(7, "d01")] = frozenset({"active"})  # it finishes later
    actions = sim.step()
    assert SendRollback("d01", rollback_cmd_id(7, "d01")) in actions
    sim.step()
    assert sim.state.devices[1].status == "rolled_back"
    assert any(isinstance(a, RollbackDone) and a.ok for a in sim.log)


def test_a_rollback_without_an_answer_is_resent_with_the_same_id() -> None:
    state = make_state(2, waves="1,100%", gates=["error_rate<=1%"])
    sim = Sim(state)
    sim.new = ModelStats(100, 50)
    sim.run(until=1010)
    assert sim.state.state == "paused"
    # the first rollback got lost: stored as sent, no event came back
    sim.state = replace(
        sim.state,
        devices=tuple(replace(d, status="active", rollback="sent") if d.rollback else d for d in sim.state.devices),
    )
    quiet = decide(sim.state, Observations(), sim.now + 5)
    assert not any(isinstance(a, SendRollback) for a in quiet)
    later = decide(sim.state, Observations(), sim.now + 31)
    assert SendRollback("d00", rollback_cmd_id(7, "d00"), resend=True) in later


def test_a_lost_active_event_is_made_up_for_by_the_devices_status() -> None:
    """A fleet process that died took the device's ``active`` event with it (its share of the shared
    subscription); the status, which every fleet process receives, shows the bundle running."""
    state = make_state(2, waves="1,100%")
    sim = Sim(state, outcome={"d00": None})  # d00 installs the bundle, but its events never arrive
    sim.run(until=1003)
    assert next(d for d in sim.state.devices if d.device_id == "d00").status == "sent"
    done = decide(sim.state, Observations(serving=frozenset({"d00"})), sim.now + 1)
    assert DeviceDone("d00", "active", "the device's status reports the bundle active") in done


def test_a_lost_rolled_back_event_is_made_up_for_by_the_devices_status() -> None:
    state = make_state(2, waves="1,100%", gates=["error_rate<=1%"])
    sim = Sim(state)
    sim.new = ModelStats(100, 50)
    sim.run(until=1010)
    sent = replace(
        sim.state,
        devices=tuple(replace(d, status="active", rollback="sent") if d.rollback else d for d in sim.state.devices),
    )
    assert not any(isinstance(a, RollbackDone) for a in decide(sent, Observations(), sim.now + 1))
    done = decide(sent, Observations(reverted=frozenset({"d00"})), sim.now + 1)
    assert RollbackDone("d00", True, "the device's status reports the previous model") in done


def test_a_state_stored_mid_rollout_resumes_where_it_was() -> None:
    sim = Sim(make_state(10))
    sim.run(until=1070)
    stored = sim.state  # what the database holds when the server dies
    restarted = Sim(stored, now=sim.now + 5, phases=dict(sim.phases), seen=dict(sim.seen))
    restarted.run(until=restarted.now + 400)
    assert restarted.state.state == "completed"
    first_ids = {a.device_id for a in sim.log if isinstance(a, SendDeploy)}
    again = [a for a in restarted.log if isinstance(a, SendDeploy) and a.device_id in first_ids]
    assert again == []  # nothing sent twice: the devices already sent were known as sent
    assert not any(isinstance(a, AdvanceWave) and a.wave == 0 for a in restarted.log)


def test_pending_starts_with_the_plan_as_evidence() -> None:
    actions = decide(make_state(10), Observations(), 5.0)
    assert actions == [AdvanceWave(0, "rollout started", {"devices": 10, "devices_per_wave": [1, 4, 5]})]
    name, device, reason, evidence = actions[0].audit()
    assert (name, device, reason, evidence["devices"]) == ("AdvanceWave", None, "rollout started", 10)
    assert SoakStarted(0).audit()[0] == "SoakStarted"
