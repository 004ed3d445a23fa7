"""``edgeship demo``: from a trained model to signed bundles for every target, to devices, to a staged rollout.

Runs on embedded defaults and loopback only: Mosquitto when installed (else the embedded broker), the
fleet server on SQLite, bundles in a folder, three agents as separate processes. Each step checks what it
claims and raises ``DemoFailed`` otherwise; every process it started is stopped at the end, on failure,
on Ctrl-C and on SIGTERM (``Supervisor``, ``handle_signals``). ``keep_running`` leaves the fleet up until
Ctrl-C, to look at the dashboard.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sdk.cli.demo.build import ALL_TARGETS, BUILT_JSON, Built
from sdk.cli.demo.fleet_stage import DEVICES, start_agents, start_fleet
from sdk.cli.demo.rollouts import BROKEN_TARGET, rollout_v1, rollout_v2, upload_releases
from sdk.cli.demo.supervisor import DemoFailed, Supervisor, handle_signals, start_broker
from sdk.cli.tables import table_lines

__all__ = ["DemoOptions", "run_full_demo"]

# The converters' own chatter (TensorFlow's C++ log, absl, Python warnings) would bury the demo's lines;
# their errors still show (an exception ends the build with its message).
QUIET_CONVERTERS = {"TF_CPP_MIN_LOG_LEVEL": "2", "GLOG_minloglevel": "2", "PYTHONWARNINGS": "ignore"}


@dataclass(frozen=True)
class DemoOptions:
    """What ``edgeship demo`` does.

    Attributes:
        out_dir: working folder (keys, bundles, the fleet's and devices' state, logs); rebuilt each run.
        targets: targets version 1 is packaged for (those the devices run are always included).
        embedded_broker: use the embedded broker even when Mosquitto is installed.
        keep_running: after the summary, leave the fleet and devices up until Ctrl-C.
    """

    out_dir: Path
    targets: tuple[str, ...] = tuple(ALL_TARGETS)
    embedded_broker: bool = False
    keep_running: bool = False


@dataclass
class _Steps:
    """Step timings for the summary; ``step`` prints a header and times its block."""

    say: Callable[[str], None]
    rows: list[tuple[str, float, str]] = field(default_factory=list)

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        print(f"\n== {len(self.rows) + 1}. {title}", flush=True)
        t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            self.rows.append((title, time.perf_counter() - t0, "FAILED"))
            raise
        self.rows.append((title, time.perf_counter() - t0, "ok"))

    def summary(self) -> list[str]:
        rows = [[f"{i}. {t}", f"{s:.1f}", r] for i, (t, s, r) in enumerate(self.rows, 1)]
        rows.append(["total", f"{sum(s for _, s, _ in self.rows):.1f}", ""])
        return table_lines(["step", "seconds", "result"], rows)


def _print(lines: Sequence[str]) -> None:
    print("\n".join(lines), flush=True)


def run_full_demo(options: DemoOptions, say: Callable[[str], None]) -> list[tuple[str, float, str]]:
    """Run the demo (see the module docstring); returns ``(step, seconds, result)`` per step.

    Raises:
        DemoFailed: a step did not do what it claims (the message says which and what was seen).
        KeyboardInterrupt: Ctrl-C or SIGTERM; every process was stopped first.
    """
    out = options.out_dir.resolve()
    device_targets = [t for _, t in DEVICES]
    targets = list(dict.fromkeys([*options.targets, *device_targets]))
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown:
        raise DemoFailed(f"unknown target(s) {', '.join(unknown)}: choose among {', '.join(ALL_TARGETS)}")
    for folder in ("fleet", "devices", "logs", "work"):
        shutil.rmtree(out / folder, ignore_errors=True)
    (out / "work").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_FLEET_")}
    sup = Supervisor(out / "logs", env)
    steps = _Steps(say)
    try:
        with handle_signals():
            with steps.step(f"train digits v1 and v2, package v1 for {', '.join(targets)} (fp32 and int8)"):
                build = [sys.executable, "-m", "sdk.cli.demo.build", str(out), "--targets", ",".join(targets),
                         "--device-targets", ",".join(device_targets)]  # fmt: skip
                sup.run("training and packaging", build, timeout_s=240.0, env=QUIET_CONVERTERS)
                built = Built.from_json((out / "bundles" / BUILT_JSON).read_text())
                print(f"bundles in {out / 'bundles'}, signed with {built.private_key} (public: {built.public_key})")
            with steps.step("start the broker, the fleet server and three devices"):
                broker = start_broker(sup, out / "work" / "broker", embedded=options.embedded_broker, say=say)
                fleet = start_fleet(sup, out / "fleet", broker, built.public_key, say)
                start_agents(sup, fleet, out / "devices", broker, built.public_key, say)
                print("devices: " + ", ".join(f"{d} runs {t} only (--runtimes {t})" for d, t in DEVICES))
            with steps.step("upload the releases and roll digits v1 out to every device"):
                uploaded = upload_releases(fleet, built, out / "work", say)
                print(
                    "each device reports only its runtime, so the fleet picks per device the release's bundle "
                    "it can run (int8 first)"
                )
                rollout_v1(fleet, uploaded, say)
            with steps.step("roll digits v2 out in waves; the canary's bundle is broken"):
                print(
                    f"v2's {BROKEN_TARGET} bundle has zeroed weights and valid signatures (re-signed with the release "
                    "key, as a broken build would be): only the device's golden health check can tell"
                )
                rollout_id, audit = rollout_v2(fleet, uploaded, say)
                print(f"audit trail of rollout {rollout_id} (edgeship rollout audit {rollout_id}):")
                _print(audit)
            last = DEVICES[-1][0]
            print(f"rollout {rollout_id} stays paused: {last} keeps v1 until an operator resumes or aborts it")
            print(f"\ndashboard: {fleet.dashboard}  (API {fleet.url}/api/v1; logs in {out / 'logs'})")
            print("\nsummary:")
            _print(steps.summary())
            if options.keep_running:
                print(f"the fleet and devices keep running; Ctrl-C stops them. Meanwhile, in another shell:\n"
                      f"  export EDGESHIP_FLEET_URL={fleet.url} EDGESHIP_FLEET_TOKEN={fleet.client.token}\n"
                      f"  .venv/bin/edgeship fleet devices; .venv/bin/edgeship rollout status {rollout_id}; "
                      f".venv/bin/edgeship rollout abort {rollout_id}", flush=True)  # fmt: skip
                while True:
                    sup.check_all()
                    time.sleep(1.0)
    except DemoFailed:
        print("\nsummary (failed):", flush=True)
        _print(steps.summary())
        raise
    except KeyboardInterrupt:
        if not options.keep_running or len(steps.rows) < 4:
            print("\ninterrupted: stopping every process the demo started", file=sys.stderr, flush=True)
            raise
    finally:
        killed = sup.stop_all()
        if killed:
            say(f"needed SIGKILL: {', '.join(killed)}")
        say("stopped every process the demo started")
    return steps.rows
