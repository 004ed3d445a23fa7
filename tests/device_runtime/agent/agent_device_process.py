"""A device's MQTT link in its own process, for tests that kill it: ``python agent_device_process.py PORT ID OUTBOX``.

Prints ``connected`` once the broker accepted it and its online status is out, then idles until killed.
With a fourth argument ``die-on-command`` it SIGKILLs itself when a command reaches its handler: a
device that crashes after receiving a command but before recording it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from device_runtime.agent.mqtt import DeviceLink, MqttSettings
from device_runtime.agent.outbox import Outbox


def main() -> None:
    port, device_id, outbox_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    settings = MqttSettings("127.0.0.1", port, device_id, keepalive_s=5, backoff_base_s=0.05, backoff_cap_s=0.5)
    die = len(sys.argv) > 4 and sys.argv[4] == "die-on-command"

    def on_command(command: dict[str, Any]) -> None:
        if die:
            os.kill(os.getpid(), signal.SIGKILL)

    link = DeviceLink(settings, Outbox(outbox_path), status=lambda: {"runtime": "test"}, on_command=on_command)
    link.start()
    if not link.wait_connected(10):
        sys.exit("not connected")
    time.sleep(0.3)  # let the online status reach the broker
    print("connected", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
