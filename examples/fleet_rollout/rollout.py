"""A staged rollout driven through the fleet server's REST API, with nothing but the standard library.

    python examples/fleet_rollout/rollout.py --bundle dist/digits-2-onnxruntime-fp32.edgebundle \\
        --devices tag=site=berlin [--waves 1,50%,100%] [--soak 30s] [--gate health_failures=0 ...]

What ``edgeship fleet upload`` and ``edgeship rollout create --follow`` do, as a CI job or another
language would do it (``urllib`` here; any HTTP client works): upload the signed bundle
(``POST /api/v1/bundles``, verified by the server with its trusted keys), start a rollout of its release
to the selected devices (``POST /api/v1/rollouts``), follow it (``GET /api/v1/rollouts/{id}``) until it
completes, pauses on a breached gate, or is aborted, and print its audit log (``GET .../audit``).

The server is ``--server`` or ``EDGESHIP_FLEET_URL`` (default ``http://127.0.0.1:8800``), the token
``--token`` or ``EDGESHIP_FLEET_TOKEN`` (``edgeship fleet token create --name ci --scope write``).
Exit status: 0 when the rollout completed, 1 when it ended otherwise or the API refused a request.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ENDED = ("completed", "paused", "aborted", "failed")


class Api:
    """``/api/v1`` of one fleet server, with a bearer token; an error status raises ``SystemExit`` with its detail."""

    def __init__(self, server: str, token: str) -> None:
        self.base = server.rstrip("/") + "/api/v1"
        self.token = token

    def call(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> Any:
        request = urllib.request.Request(self.base + path, data=body, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if body is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:  # the server's errors are {"error", "detail"}
            detail = json.loads(e.read() or b"{}").get("detail", e.reason)
            raise SystemExit(f"error: {method} {path}: {detail} (HTTP {e.code})") from None
        except urllib.error.URLError as e:
            raise SystemExit(f"error: cannot reach {self.base}: {e.reason}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default=os.environ.get("EDGESHIP_FLEET_URL", "http://127.0.0.1:8800"))
    parser.add_argument("--token", default=os.environ.get("EDGESHIP_FLEET_TOKEN"))
    parser.add_argument("--bundle", required=True, type=Path, help="the signed .edgebundle to release")
    parser.add_argument("--devices", required=True, help="selector: tag=KEY=VALUE, group=NAME, id=A,B or all")
    parser.add_argument("--waves", default="1,10%,50%,100%", help="cumulative counts or percentages")
    parser.add_argument("--soak", default="5m", help="how long every gate must hold after a wave")
    parser.add_argument("--gate", action="append", default=[], help="e.g. health_failures=0, 'error_rate<=1%%'")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to follow the rollout")
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("give --token or set EDGESHIP_FLEET_TOKEN")
    api = Api(args.server, args.token)

    bundle = api.call("POST", "/bundles", args.bundle.read_bytes(), "application/octet-stream")
    release = f"{bundle['name']}:{bundle['version']}"
    print(f"uploaded {args.bundle.name}: release {release}, {bundle['target']}/{bundle['precision']}", flush=True)
    selected = api.call("GET", "/devices?" + urllib.parse.urlencode({"selector": args.devices}))["devices"]
    print(f"{len(selected)} device(s) selected by {args.devices}: {', '.join(d['device_id'] for d in selected)}")

    spec = {"release": release, "devices": args.devices, "waves": args.waves, "soak": args.soak, "gates": args.gate}
    rollout = api.call("POST", "/rollouts", json.dumps(spec).encode())
    print(f"rollout {rollout['id']} created", flush=True)
    deadline, last = time.monotonic() + args.timeout, ""
    while True:
        view = api.call("GET", f"/rollouts/{rollout['id']}")
        counts = view["waves_detail"][view["wave"] - 1]
        line = (f"rollout {view['id']} {view['state']} wave {view['wave']}/{view['waves']} "
                f"active={counts.get('active', 0)} of {counts['devices']}")  # fmt: skip
        if line != last:
            print(line, flush=True)
            last = line
        if view["state"] in ENDED or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    for row in api.call("GET", f"/rollouts/{rollout['id']}/audit"):
        print(f"  audit {row['action']} {row['device_id'] or ''} {row['reason'] or ''}".rstrip())
    if view["state"] != "completed":
        print(f"rollout {view['id']} ended {view['state']}: {view.get('paused_reason') or 'timed out'}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
