"""The demo's fleet: ``edgeship fleet serve``, three ``edgeship-device run`` agents, and two rollouts.

Every part is a separate process started through the ``Supervisor`` and spoken to as a user would: the
fleet through its REST API (``FleetClient``), the agents only through the fleet. The CLI does not import
the fleet package (contract ``kernel``): the server and its token come from ``edgeship fleet ...``
subprocesses.

The three devices run one target each (``edgeship-device run --runtimes TARGET``), so each reports one
runtime and the fleet picks, per device, the bundle of a release that device can run. Version 2's
OpenVINO bundle is the broken one (``build.break_weights``): the device it goes to fails its health check
and rolls back, and the gate ``health_failures=0`` pauses the rollout before the next wave.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdk.cli.demo.supervisor import Broker, DemoFailed, Process, Supervisor, free_port
from sdk.cli.fleet_client import FleetClient
from sdk.errors import TransportError

__all__ = ["DEVICES", "FLEET_NAME", "Fleet", "start_agents", "start_fleet"]

# device id -> the one target it runs; sorted ids are the rollout's wave order (the canary first)
DEVICES: tuple[tuple[str, str], ...] = (("cam-1", "onnxruntime"), ("cam-2", "openvino"), ("cam-3", "tflite"))
FLEET_NAME = "demo"
Say = Callable[[str], None]


@dataclass
class Fleet:
    """The running fleet server: its URL, a write token's client, and its process."""

    url: str
    client: FleetClient
    process: Process
    sup: Supervisor

    @property
    def dashboard(self) -> str:
        return f"{self.url}/dashboard/"

    def devices(self) -> dict[str, dict[str, Any]]:
        body = self.client.get("/devices")
        return {d["device_id"]: d for d in body["devices"]}

    def version_of(self, device_id: str) -> int | None:
        model = self.client.get(f"/devices/{device_id}").get("model")
        return None if model is None else int(model["version"])

    def wait(self, what: str, ready: Callable[[], bool], timeout_s: float) -> None:
        """Poll ``ready`` (processes checked alive each time) until true.

        Raises:
            DemoFailed: a process exited, or ``ready`` stayed false for ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            self.sup.check_all()
            try:
                if ready():
                    return
            except TransportError:
                pass  # the server busy for a moment: ask again
            if time.monotonic() > deadline:
                raise DemoFailed(f"timed out after {timeout_s:.0f}s waiting for {what}")
            time.sleep(0.25)

    def upload(self, bundle: Path) -> dict[str, Any]:
        body: dict[str, Any] = self.client.upload("/bundles", bundle)
        return body

    def rollout(self, release: str, waves: str, soak: str, gates: Sequence[str]) -> int:
        body = {"release": release, "devices": "all", "waves": waves, "soak": soak, "gates": list(gates),
                "rate_per_s": 100, "wave_timeout": "90s", "resend": "20s"}  # fmt: skip
        return int(self.client.post("/rollouts", body)["id"])

    def wait_rollout(self, rollout_id: int, states: Sequence[str], timeout_s: float, say: Say) -> dict[str, Any]:
        """Poll the rollout until its state is one of ``states``, printing a line per change; returns it."""
        from sdk.cli.fleet_views import rollout_summary

        last: dict[str, Any] = {}
        shown = ""

        def reached() -> bool:
            nonlocal last, shown
            last = self.client.get(f"/rollouts/{rollout_id}")
            line = rollout_summary(last)
            if line != shown:
                say(line)
                shown = line
            return last.get("state") in states or last.get("state") in ("aborted", "failed", "completed")

        self.wait(f"rollout {rollout_id} to reach {'/'.join(states)}", reached, timeout_s)
        if last.get("state") not in states:
            raise DemoFailed(f"rollout {rollout_id} ended {last.get('state')!r}, expected {'/'.join(states)}: {last}")
        return last


def _token(state_dir: Path, env: dict[str, str]) -> str:
    """A write token created in the server's database, as ``edgeship fleet token create`` prints it."""
    args = [sys.executable, "-m", "sdk.cli", "fleet", "token", "create", "--name", "demo", "--scope", "write",
            "--state-dir", str(state_dir)]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    if done.returncode != 0 or not done.stdout.strip():
        raise DemoFailed(f"edgeship fleet token create failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def start_fleet(sup: Supervisor, state_dir: Path, broker: Broker, public_key: Path, say: Say) -> Fleet:
    """``edgeship fleet serve`` on SQLite in ``state_dir``, a free loopback port, the demo's broker.

    Raises:
        DemoFailed: the server exited or did not print its ``serving`` line within 90 s.
    """
    port = free_port()
    args = [
        sys.executable, "-m", "sdk.cli", "fleet", "serve", "--state-dir", str(state_dir), "--port", str(port),
        "--broker", f"127.0.0.1:{broker.port}", "--broker-protocol", broker.protocol, "--share-group", "none",
        "--fleet", FLEET_NAME, "--trust", str(public_key),
    ]  # fmt: skip
    process = sup.start("fleet", args)
    say(f"starting the fleet server (SQLite in {state_dir}; log {process.log})")
    line = sup.wait_for_line(process, "edgeship fleet serving", 90.0)
    say(line.strip())
    url = f"http://127.0.0.1:{port}"
    client = FleetClient(url, _token(state_dir, sup.env), timeout_s=30.0)
    return Fleet(url, client, process, sup)


def start_agents(
    sup: Supervisor, fleet: Fleet, root: Path, broker: Broker, public_key: Path, say: Say, timeout_s: float = 120.0
) -> None:
    """One ``edgeship-device run`` per device of ``DEVICES``, each in its own state folder, no model yet.

    Waits until every one is online in the fleet's registry, reporting exactly its runtime, with a line per
    device as it comes up.

    Raises:
        DemoFailed: an agent exited, or not every device came online within ``timeout_s``.
    """
    for device_id, target in DEVICES:
        args = [
            sys.executable, "-m", "device_runtime.cli", "run", "--state-dir", str(root / device_id),
            "--broker", f"mqtt://127.0.0.1:{broker.port}", "--device-id", device_id, "--fleet", FLEET_NAME,
            "--trust", str(public_key), "--runtimes", target, "--telemetry-interval", "1", "--threads", "1",
        ]  # fmt: skip
        process = sup.start(f"agent-{device_id}", args)
        say(f"started edgeship-device run --device-id {device_id} --runtimes {target} (pid {process.popen.pid})")
    seen: set[str] = set()
    wanted = dict(DEVICES)

    def all_online() -> bool:
        for device_id, d in fleet.devices().items():
            if device_id in wanted and device_id not in seen and d["online"] and d["capabilities"]:
                runtimes = d["capabilities"].get("runtimes", {})
                say(f"{device_id} online: runtimes {runtimes}, model {d['model'] or 'none yet'}")
                seen.add(device_id)
        return seen == set(wanted)

    fleet.wait("every device online", all_online, timeout_s)
