"""A fleet of simulated devices speaking the real MQTT contract, many per process (asyncio + aiomqtt).

    .venv/bin/python benchmarks/fleet_sim.py --port 1883 [--devices 1000] [--rate 10] [--duration 10]
        [--fleet default] [--first 1] [--failing 3,7-9] [--slow sim-00002] [--step 0.05] [--json]

Why it exists: the fleet server's scale targets (issue 11, "Scale": ingest at >= 0.8x a bare subscriber, a
gate breach handled within 1 s, 1,000 devices) cannot be measured with real agents on a 2-core machine (an
``edgeship-device run`` process costs ~100 MB and a core while it starts). A simulated device costs one
asyncio task group and one TCP connection, so 1,000 fit in one process.

What a device does is what ``device_runtime.agent`` does on the wire, with the payloads built and checked by
``sdk.mqtt_contract`` (so the fleet sees the same topics, keys and QoS; docs/mqtt.md):

- connects as ``edgeship-<device_id>`` with ``clean_session=false`` and the retained ``offline`` Last Will,
  subscribes to its ``cmd`` topic (QoS 1) and publishes a retained ``online`` status with ``model``,
  ``slot``, ``runtime`` and ``capabilities``;
- publishes telemetry every ``1 / rate`` seconds (``count`` messages, or for ``duration``) with a monotonic
  ``seq`` (QoS 1, awaited: like the agent's outbox, a device that is not acknowledged slows down instead of
  piling up messages);
- answers ``deploy`` like the OTA agent (``received``, ``downloading``, ``verifying``, ``staged``,
  ``health_check``, ``active``; a device in ``failing`` reports ``failed`` + ``rolled_back`` instead), runs
  deploys and rollbacks one at a time in arrival order, re-publishes its status after each, reports the
  new model in its telemetry (a device in ``slow`` reports ``slow_latency_ms`` for any version it was
  deployed, so a latency gate can breach), answers ``rollback`` (``received``, ``health_check``,
  ``rolled_back``), ``ping`` (``pong``) and ``config`` (``applied``; a new telemetry interval takes effect),
  and de-duplicates commands by id (a known id gets ``received`` with ``duplicate: true``);
- at the end publishes the retained ``offline`` status itself (a clean disconnect suppresses the will);
- when the link drops (the broker restarted), reconnects after a delay from the agent's own rule:
  full-jitter exponential backoff (``device_runtime.agent._backoff.Backoff``) with the agent's defaults
  (``MqttSettings.backoff_base_s`` 0.5 s, ``backoff_cap_s`` 60 s), the counter reset on each connect, then
  re-subscribes and re-announces; every CONNACK's time is kept (``Simulator.connect_times``) to measure a
  reconnect storm (``benchmarks/reliability.py``). ``SimConfig.reconnect=False`` ends the device instead.

Nothing is downloaded: the simulation covers the fleet's side of the conversation, not the device's OTA.
Device ids are deterministic (``sim-00001``, ...), so a rollout can select them by id.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import random
import resource
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `sdk` as a script

# The agent's reconnect rule itself, so a simulated fleet reconnects as a real one would (light: no numpy).
from device_runtime.agent._backoff import Backoff
from device_runtime.agent.mqtt import MqttSettings
from sdk.mqtt_contract import (
    QOS,
    CommandError,
    ContractError,
    Topics,
    client_id,
    decode_payload,
    encode_payload,
    event_payload,
    offline_status,
    parse_command,
    parse_config,
    parse_deploy,
)

__all__ = ["SimConfig", "SimReport", "Simulator", "device_id", "main", "parse_devices", "raise_fd_limit"]

MODEL_NAME = "sim"
TARGET = "onnxruntime"
CAPABILITIES = {
    "arch": "x86_64",
    "runtimes": {"onnxruntime": "1.20.1"},
    "accelerators": [],
    "os": "linux",
    "python": "3.11.7",
}
RUNTIME = {"agent": "sim", "backend": TARGET, "version": "1.20.1"}
MAX_BUNDLE_BYTES = 2**31  # the simulated device's download cap


def device_id(index: int) -> str:
    """The id of simulated device ``index`` (1-based): ``sim-00001``."""
    return f"sim-{index:05d}"


def parse_devices(text: str) -> frozenset[str]:
    """A device list from the command line: ids or 1-based numbers and ranges, comma-separated
    (``"sim-00003,7,10-12"``); empty text is no device.

    Raises:
        ValueError: an item that is none of these, or a range that runs backwards.
    """
    out: set[str] = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item.startswith("sim-"):
            out.add(item)
        elif "-" in item:
            low, high = (int(x) for x in item.split("-", 1))
            if high < low:
                raise ValueError(f"device range {item!r} runs backwards")
            out.update(device_id(i) for i in range(low, high + 1))
        else:
            out.add(device_id(int(item)))
    return frozenset(out)


def raise_fd_limit(needed: int) -> int:
    """Raise this process's soft limit of open files towards ``needed`` (one socket per device), up to the
    hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    return soft


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class SimConfig:
    """What to simulate. Rates are per device; times are seconds."""

    port: int
    host: str = "127.0.0.1"
    devices: int = 1000
    first: int = 1  # index of the first device: processes of one fleet take disjoint ranges
    rate: float = 10.0  # telemetry messages per second per device
    duration: float = 10.0  # seconds of telemetry once every device is connected; <= 0: until stop()
    count: int = 0  # telemetry messages per device, then the run ends (duration stays a cap); 0: no count
    fleet: str = "default"
    failing: frozenset[str] = frozenset()  # these fail every deploy's health check
    slow: frozenset[str] = frozenset()  # these report slow_latency_ms once deployed
    latency_ms: float = 3.0  # p95 every device reports for its first model
    slow_latency_ms: float = 12.0  # p95 of a slow device's deployed model
    step_s: float = 0.05  # between two events of one deployment
    connect_batch: int = 100  # connections opened at once (the broker's listen backlog)
    connect_timeout_s: float = 60.0
    keepalive_s: int = 60
    record: bool = False  # keep every message published (topic, payload) in the report
    reconnect: bool = True  # a dropped link is retried with the agent's backoff; False: the device ends
    backoff_base_s: float = MqttSettings.backoff_base_s  # seconds, the agent's default
    backoff_cap_s: float = MqttSettings.backoff_cap_s  # seconds, the agent's default
    seed: int | None = None  # of the backoff jitter (None: unseeded, as on real devices)

    def ids(self) -> list[str]:
        return [device_id(i) for i in range(self.first, self.first + self.devices)]


@dataclass
class SimReport:
    """What the simulator did. ``telemetry_acked`` counts telemetry the broker acknowledged (PUBACK): what
    a subscriber with a persistent QoS 1 subscription must receive. Times are ``time.time()``."""

    devices: int = 0
    connected: int = 0
    errors: list[str] = field(default_factory=list)  # devices that failed to connect or lost their link
    reconnects: int = 0  # connections made again after a dropped link
    telemetry_acked: int = 0
    telemetry_failed: int = 0
    events_acked: int = 0
    commands: int = 0
    malformed_commands: int = 0
    first_telemetry: float | None = None  # the first telemetry publish began
    last_telemetry_ack: float | None = None
    ready_at: float | None = None  # every device connected
    last_seq: dict[str, int] = field(default_factory=dict)
    sent: list[tuple[str, bytes]] = field(default_factory=list)  # with SimConfig.record

    def summary(self) -> dict[str, Any]:
        """The report without the per-message record, as JSON-ready values."""
        out = {k: v for k, v in self.__dict__.items() if k != "sent"}
        out["telemetry_s"] = (
            self.last_telemetry_ack - self.first_telemetry
            if self.first_telemetry is not None and self.last_telemetry_ack is not None
            else None
        )
        return out


class _Device:
    """One simulated device on one aiomqtt connection."""

    def __init__(self, sim: Simulator, index: int, dev_id: str) -> None:
        self.sim = sim
        self.cfg = sim.config
        self.id = dev_id
        self.index = index
        self.topics = Topics(self.cfg.fleet, dev_id)
        self.model: dict[str, Any] = {"name": MODEL_NAME, "version": 1, "target": TARGET, "sha256": _sha("sim-1")}
        self.previous: dict[str, Any] | None = None
        self.slot = "A"
        self.deployed = False  # serving a model the fleet deployed (slow devices get slow on it)
        self.seq = 0
        self.interval = 1.0 / self.cfg.rate if self.cfg.rate > 0 else 0.0
        self.done: dict[str, str] = {}  # command id -> outcome, for de-duplication
        self.deployment: dict[str, Any] | None = None
        self.ota: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.started = time.monotonic()
        self.client: aiomqtt.Client | None = None
        self.announced = False  # connected, subscribed and online status acknowledged
        self.counted = False  # told the simulator its telemetry is done

    # -- publishing --------------------------------------------------------------------------------

    async def publish(self, topic: str, payload: dict[str, Any], retain: bool = False) -> None:
        data = encode_payload(payload)
        assert self.client is not None
        # no per-message timeout (it would cost a task per message): Simulator.run bounds the whole run
        await self.client.publish(topic, data, qos=QOS, retain=retain, timeout=math.inf)
        if self.cfg.record:
            self.sim.report.sent.append((topic, data))

    def status(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "state": "online",
            "ts": time.time(),
            "model": dict(self.model),
            "slot": self.slot,
            "runtime": RUNTIME,
            "capabilities": CAPABILITIES,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "system_uptime_s": None,
            "deployment": self.deployment,
        }

    async def event(self, cmd_id: str | None, phase: str, message: str, **detail: Any) -> None:
        if cmd_id is not None and phase not in ("pong", "applied"):
            self.deployment = {"cmd_id": cmd_id, "phase": phase}
        await self.publish(self.topics.events, event_payload(cmd_id, phase, message, time.time(), **detail))
        self.sim.report.events_acked += 1

    def telemetry(self) -> dict[str, Any]:
        self.seq += 1
        p95 = self.cfg.slow_latency_ms if (self.deployed and self.id in self.cfg.slow) else self.cfg.latency_ms
        window = self.interval or 1.0
        return {
            "schema": 1,
            "seq": self.seq,
            "ts": time.time(),
            "window_s": window,
            "count": max(1, int(window * 100)),
            "errors": 0,
            "latency_ms": {"p50": round(p95 * 0.6, 3), "p95": p95, "p99": round(p95 * 1.3, 3)},
            "rss_mb": 150.0,
            "cpu_pct": 20.0,
            "temperature_c": None,
            "model": dict(self.model),
            "dropped": 0,
        }

    # -- the device's tasks ------------------------------------------------------------------------

    async def run_telemetry(self, stop: asyncio.Event) -> None:
        """Telemetry on a fixed schedule, each device offset by a deterministic fraction of its interval
        (so 1,000 devices do not publish in bursts); late ticks are not made up (like a real window)."""
        if self.interval <= 0:
            return
        report = self.sim.report
        next_at = time.monotonic() + (self.index * 0.618034 % 1.0) * self.interval
        while not stop.is_set() and not (self.cfg.count and self.seq >= self.cfg.count):
            delay = next_at - time.monotonic()
            if delay > 0:  # a plain sleep: wait_for(stop.wait()) would cost a task per message
                await asyncio.sleep(min(delay, 0.25))
                continue
            next_at = max(next_at + self.interval, time.monotonic())
            if report.first_telemetry is None:
                report.first_telemetry = time.time()
            payload = self.telemetry()
            try:
                await self.publish(self.topics.telemetry, payload)
            except (aiomqtt.MqttError, asyncio.TimeoutError):
                report.telemetry_failed += 1
                continue
            report.telemetry_acked += 1
            report.last_telemetry_ack = time.time()
            report.last_seq[self.id] = payload["seq"]
        if not self.counted:  # once, though a reconnect runs this again
            self.counted = True
            self.sim.telemetry_done()

    async def run_commands(self) -> None:
        """Read ``cmd``: answer ping/config at once, queue deploy/rollback for the OTA worker."""
        assert self.client is not None
        async for message in self.client.messages:
            self.sim.report.commands += 1
            try:
                cmd = decode_payload(message.payload if isinstance(message.payload, bytes) else b"")
            except ContractError:
                self.sim.report.malformed_commands += 1
                continue
            try:
                cmd_id, kind = parse_command(cmd)
            except CommandError as e:
                bad_id = cmd.get("id") if isinstance(cmd.get("id"), str) else None
                await self.event(bad_id, "failed", str(e), error="CommandError", bad=False, model=self.model)
                continue
            if cmd_id in self.done:
                await self.event(cmd_id, "received", "duplicate command", duplicate=True, state="done",
                                 outcome=self.done[cmd_id])  # fmt: skip
            elif kind == "ping":
                self.done[cmd_id] = "pong"
                await self.event(cmd_id, "pong", "pong", model=self.model, uptime_s=time.monotonic() - self.started)
            elif kind == "config":
                await self.config(cmd_id, cmd)
            else:
                self.done[cmd_id] = "queued"
                await self.event(cmd_id, "received", f"{kind} queued")
                self.ota.put_nowait(cmd)

    async def config(self, cmd_id: str, cmd: dict[str, Any]) -> None:
        try:
            settings = parse_config(cmd)
        except CommandError as e:
            self.done[cmd_id] = "failed"
            await self.event(cmd_id, "failed", str(e), error="CommandError", bad=False, model=self.model)
            return
        if "telemetry_interval_s" in settings:
            self.interval = settings["telemetry_interval_s"]
        self.done[cmd_id] = "applied"
        await self.event(cmd_id, "applied", "settings applied", settings=settings)

    async def run_ota(self) -> None:
        """Deploys and rollbacks, one at a time in arrival order (as the agent's OTA thread)."""
        while True:
            cmd = await self.ota.get()
            cmd_id = str(cmd["id"])
            if cmd["type"] == "deploy":
                self.done[cmd_id] = await self.deploy(cmd)
            else:
                self.done[cmd_id] = await self.rollback(cmd_id)
            self.deployment = None
            await self.publish(self.topics.status, self.status(), retain=True)

    async def step(self) -> None:
        if self.cfg.step_s > 0:
            await asyncio.sleep(self.cfg.step_s)

    async def deploy(self, cmd: dict[str, Any]) -> str:
        try:
            deploy = parse_deploy(cmd, max_bundle_bytes=MAX_BUNDLE_BYTES)
        except CommandError as e:
            await self.event(str(cmd["id"]), "failed", str(e), error="CommandError", bad=False, model=self.model)
            return "failed"
        version = deploy.version if deploy.version is not None else int(self.model["version"]) + 1
        new = {"name": MODEL_NAME, "version": version, "target": TARGET, "sha256": deploy.sha256}
        other = "B" if self.slot == "A" else "A"
        await self.step()
        await self.event(deploy.id, "downloading", "download started", url=deploy.url, size=deploy.size)
        await self.step()
        await self.event(deploy.id, "verifying", "verifying the bundle")
        await self.step()
        await self.event(deploy.id, "staged", f"staged in slot {other}", slot=other, version=version)
        await self.step()
        await self.event(deploy.id, "health_check", "checking the new model", attempt=1)
        await self.step()
        if self.id in self.cfg.failing:
            await self.event(deploy.id, "failed", "health check failed: simulated", error="HealthCheckError",
                             bad=True, model=self.model)  # fmt: skip
            await self.event(deploy.id, "rolled_back", "previous model kept", model=self.model)
            return "failed"
        self.previous, self.model, self.slot, self.deployed = self.model, new, other, True
        await self.event(deploy.id, "active", f"{MODEL_NAME} v{version} active", model=self.model,
                         previous=self.previous, health={"ok": True})  # fmt: skip
        return "active"

    async def rollback(self, cmd_id: str) -> str:
        if self.previous is None:
            await self.event(cmd_id, "failed", "no previous model to roll back to", error="CommandError",
                             bad=False, model=self.model)  # fmt: skip
            return "failed"
        await self.step()
        await self.event(cmd_id, "health_check", "checking the previous model", attempt=1)
        await self.step()
        self.model, self.previous = self.previous, self.model
        self.slot = "B" if self.slot == "A" else "A"
        self.deployed = self.model["version"] != 1
        await self.event(cmd_id, "rolled_back", f"rolled back to v{self.model['version']}", model=self.model)
        return "rolled_back"

    async def run(self, stop: asyncio.Event, connected: Callable[[], None]) -> None:
        """Connect, announce, then serve commands and publish telemetry until ``stop``; a dropped link is
        retried after a full-jitter delay (``SimConfig.reconnect``), as the agent does."""
        backoff = Backoff(self.cfg.backoff_base_s, self.cfg.backoff_cap_s, self.sim.rng)
        while True:
            try:
                if await self.session(stop, connected, backoff):
                    return
            except (aiomqtt.MqttError, asyncio.TimeoutError, OSError):
                if not (self.cfg.reconnect and self.announced) or stop.is_set():
                    raise
            await asyncio.sleep(backoff.next_delay())

    async def session(self, stop: asyncio.Event, connected: Callable[[], None], backoff: Backoff) -> bool:
        """One connection: True when the run ended (``stop``); raises when the link dropped."""
        will = aiomqtt.Will(self.topics.status, encode_payload(offline_status(time.time())), qos=QOS, retain=True)
        client = aiomqtt.Client(
            self.cfg.host,
            self.cfg.port,
            identifier=client_id(self.id),
            clean_session=False,
            will=will,
            keepalive=self.cfg.keepalive_s,
            timeout=self.cfg.connect_timeout_s,
        )
        async with client:
            self.sim.connect_times.append(time.monotonic())
            backoff.reset()
            self.client = client
            await client.subscribe(self.topics.cmd, qos=QOS)
            await self.publish(self.topics.status, self.status(), retain=True)
            if self.announced:
                self.sim.report.reconnects += 1
            else:
                self.announced = True
                connected()
            commands = asyncio.create_task(self.run_commands())
            tasks = [asyncio.create_task(self.run_ota()), asyncio.create_task(self.work(stop))]
            try:
                # run_commands ends only when the link drops (its exception is re-raised here)
                await asyncio.wait([commands, tasks[1]], return_when=asyncio.FIRST_COMPLETED)
                if commands.done():
                    commands.result()
                    raise aiomqtt.MqttError("the command stream ended")
            finally:
                for task in (commands, *tasks):
                    task.cancel()
                await asyncio.gather(commands, *tasks, return_exceptions=True)
            await self.publish(self.topics.status, offline_status(time.time()), retain=True)
        return True

    async def work(self, stop: asyncio.Event) -> None:
        await self.sim.go.wait()
        await self.run_telemetry(stop)
        await stop.wait()


class Simulator:
    """Runs ``config.devices`` simulated devices in this process's event loop."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.report = SimReport(devices=config.devices)
        self._stop: asyncio.Event | None = None
        self._finished = 0  # devices that sent their telemetry count
        self.go = asyncio.Event()
        self.ready = asyncio.Event()  # every device connected (or failed to)
        self.connect_times: list[float] = []  # time.monotonic() of every CONNACK, reconnects included
        self.rng = random.Random(config.seed)  # the backoff jitter of every device

    def telemetry_done(self) -> None:
        """A device sent its ``count``: the run ends when every connected device has."""
        self._finished += 1
        if self.config.count and self._finished >= self.report.connected:
            self.stop()

    def stop(self) -> None:
        """End the run early (e.g. from a signal handler); the devices go offline cleanly."""
        if self._stop is not None:
            self._stop.set()

    async def run(self, on_ready: Callable[[SimReport], None] | None = None) -> SimReport:
        """Connect every device (``connect_batch`` at a time), call ``on_ready``, publish telemetry for
        ``duration`` seconds (or until ``stop()``), then disconnect every device."""
        cfg = self.config
        raise_fd_limit(cfg.devices + 256)
        stop = self._stop = asyncio.Event()
        report = self.report
        tasks: list[asyncio.Task[None]] = []
        pending = {"n": 0}

        def connected() -> None:
            report.connected += 1
            pending["n"] -= 1

        async def one(device: _Device) -> None:
            try:
                await device.run(stop, connected)
            except (aiomqtt.MqttError, asyncio.TimeoutError, OSError) as e:
                report.errors.append(f"{device.id}: {type(e).__name__}: {e}")
                if not device.announced:
                    pending["n"] -= 1

        for start in range(0, cfg.devices, max(1, cfg.connect_batch)):
            batch = [_Device(self, cfg.first + i, device_id(cfg.first + i))
                     for i in range(start, min(cfg.devices, start + cfg.connect_batch))]  # fmt: skip
            pending["n"] += len(batch)
            tasks += [asyncio.create_task(one(d)) for d in batch]
            deadline = time.monotonic() + cfg.connect_timeout_s
            while pending["n"] > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        report.ready_at = time.time()
        self.ready.set()
        if on_ready is not None:
            on_ready(report)
        self.go.set()
        if cfg.duration > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), cfg.duration)
            stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=120)
        return report


def _parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--first", type=int, default=1, help="index of the first device (sim-00001 is 1)")
    p.add_argument("--rate", type=float, default=10.0, help="telemetry messages/s per device (0: none)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of telemetry; 0: until SIGTERM/SIGINT")
    p.add_argument("--count", type=int, default=0, help="telemetry messages per device, then stop (0: no count)")
    p.add_argument("--fleet", default="default")
    p.add_argument("--failing", default="", help="devices whose deploys fail: ids, numbers, ranges (3,7-9)")
    p.add_argument("--slow", default="", help="devices whose deployed model reports --slow-latency-ms")
    p.add_argument("--latency-ms", type=float, default=3.0)
    p.add_argument("--slow-latency-ms", type=float, default=12.0)
    p.add_argument("--step", type=float, default=0.05, help="seconds between a deployment's events")
    p.add_argument("--connect-batch", type=int, default=100)
    return p.parse_args(list(argv) if argv is not None else None)


def main(argv: Iterable[str] | None = None) -> int:
    """CLI: prints ``{"ready": ...}`` once every device is connected and ``{"report": ...}`` at the end,
    one JSON line each (what ``fleet_scale.py`` reads)."""
    args = _parse_args(argv)
    config = SimConfig(
        port=args.port,
        host=args.host,
        devices=args.devices,
        first=args.first,
        rate=args.rate,
        duration=args.duration,
        count=args.count,
        fleet=args.fleet,
        failing=parse_devices(args.failing),
        slow=parse_devices(args.slow),
        latency_ms=args.latency_ms,
        slow_latency_ms=args.slow_latency_ms,
        step_s=args.step,
        connect_batch=args.connect_batch,
    )
    sim = Simulator(config)

    def ready(report: SimReport) -> None:
        print(json.dumps({"ready": {"connected": report.connected, "at": report.ready_at}}), flush=True)

    async def run() -> SimReport:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sim.stop)
        return await sim.run(ready)

    report = asyncio.run(run())
    print(json.dumps({"report": report.summary()}), flush=True)
    return 0 if report.connected == config.devices else 1


if __name__ == "__main__":
    sys.exit(main())
