"""Over-the-air update on one machine: a device agent takes v2 over MQTT, then rolls back to v1.

    python examples/fleet_rollout/ota_update_local.py [OUT_DIR]

Everything runs in this process on embedded defaults: the embedded MQTT broker (amqtt, ``edgeship
broker``) on a free loopback port, an HTTP server handing out bundles from ``OUT_DIR/bundles``, and
a device ``Agent`` (A/B slots under ``OUT_DIR/device``) installed with v1. Playing the fleet, the
script publishes a ``deploy`` command for v2 on ``edgeship/v1/<fleet>/<device>/cmd`` with paho
(payload per docs/mqtt.md), prints the ``events`` as the device reports them (download, verify,
stage, health check, switch) and its retained ``status``, runs a prediction on the new model, then
sends ``rollback``. Every wait is bounded; the exit code is 0 only when both commands succeeded.

On real devices the agent is ``edgeship-device run --state-dir DIR --broker mqtt://HOST:1883
--device-id ID --trust release.pub`` (``pip install 'edgeship[device,onnxruntime]'``), the broker is
Mosquitto (docs/mosquitto/) and the bundle URL is your artifact server.
"""

from __future__ import annotations

import functools
import hashlib
import json
import queue
import socket
import sys
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

import sdk
from device_runtime import Agent, AgentConfig
from device_runtime.agent.mqtt import MqttSettings
from fleet.broker import start_broker_thread
from sdk.signing import TrustedKeys, generate_keypair

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/toy_models.py
from toy_models import digits, train_cnn  # stand-ins for your data and model (examples/toy_models.py)

FLEET, DEVICE = "home", "pi-kitchen"
ROOT = f"edgeship/v1/{FLEET}/{DEVICE}/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no access log on stderr
        pass


def wait_for(messages: queue.Queue[tuple[str, dict[str, Any]]], cmd_id: str | None, phase: str, version: int) -> bool:
    """Print events and statuses until ``cmd_id`` reached ``phase`` and the status shows ``version``.

    False when the command failed; ``queue.Empty`` (ending the script) when nothing came for 60 s.
    """
    reached, serving = cmd_id is None, False
    while not (reached and serving):
        leaf, payload = messages.get(timeout=60)
        if leaf == "status":
            model = payload.get("model") or {}
            serving = model.get("version") == version  # the status may come before or after the event
            print(f"  status: {payload['state']}, model {model.get('name')} v{model.get('version')}, "
                  f"slot {payload.get('slot')}")  # fmt: skip
        elif leaf == "events" and payload["cmd_id"] == cmd_id:
            print(f"  event {cmd_id}: {payload['phase']} ({payload['detail']['message']})")
            if payload["phase"] == "failed":
                return False
            reached = reached or payload["phase"] == phase
    return True


def main(out_dir: Path) -> int:
    # ---- host: two releases of one model ----
    x_train, x_test, y_train, y_test = digits()
    private_key, public_key = generate_keypair(out_dir / "keys", "release")
    v1, v2 = (
        sdk.package(train_cnn(x_train, y_train, steps=steps), name="digits-cnn", version=version, key=private_key,
                    out_dir=out_dir / "bundles", example_inputs={"image": x_train[:2]},
                    calibration={"image": x_train[:200]}, labels=y_train[:200])[0].bundle_path
        for version, steps in ((1, 20), (2, 60))
    )  # fmt: skip

    # ---- the fleet's side: broker and artifact server ----
    broker = start_broker_thread("127.0.0.1", free_port())
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(out_dir / "bundles")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    messages: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
    fleet = paho.Client(CallbackAPIVersion.VERSION2, client_id="example-fleet")
    fleet.on_connect = lambda c, *_: c.subscribe(ROOT + "#", qos=1)
    fleet.on_message = lambda c, u, msg: messages.put((msg.topic[len(ROOT) :], json.loads(msg.payload)))
    fleet.connect("127.0.0.1", broker.port)
    fleet.loop_start()

    # ---- the device: an agent with v1 as its factory image ----
    settings = MqttSettings("127.0.0.1", broker.port, DEVICE, fleet=FLEET)
    config = AgentConfig(state_dir=out_dir / "device", mqtt=settings, trust=TrustedKeys.from_files([public_key]),
                         initial_bundle=v1, telemetry_interval_s=60.0)  # fmt: skip
    agent = Agent(config)
    agent.start()
    try:
        print(f"device {DEVICE} serving {agent.active_model['name']} v{agent.active_model['version']}")
        wait_for(messages, None, "", version=1)  # online: the agent has subscribed to its cmd topic
        data = v2.read_bytes()
        deploy = {"schema": 1, "id": "deploy-v2", "type": "deploy", "version": 2, "allow_downgrade": False,
                  "url": f"http://127.0.0.1:{server.server_address[1]}/{v2.name}",
                  "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}  # fmt: skip
        print(f"fleet -> {ROOT}cmd: deploy {v2.name}")
        fleet.publish(ROOT + "cmd", json.dumps(deploy), qos=1)
        if not wait_for(messages, "deploy-v2", "active", version=2):
            return 1
        (logits,) = agent.predict({"image": x_test[:1]}).values()
        print(f"device predicts with v{agent.active_model['version']}: {int(logits.argmax())} (label {y_test[0]})")

        print(f"fleet -> {ROOT}cmd: rollback")
        fleet.publish(ROOT + "cmd", json.dumps({"schema": 1, "id": "rollback-1", "type": "rollback"}), qos=1)
        if not wait_for(messages, "rollback-1", "rolled_back", version=1):
            return 1
        print(f"device {DEVICE} serving {agent.active_model['name']} v{agent.active_model['version']} again")
        return 0
    finally:
        agent.stop()
        fleet.loop_stop()
        fleet.disconnect()
        server.shutdown()
        broker.stop()


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="edgeship-ota-"))))
