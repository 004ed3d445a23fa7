"""`edgeship fleet ...` / `edgeship rollout ...` as HTTP clients of the real fleet app over real HTTP (uvicorn).

The app is ``create_fleet_app`` with the rollout routes wired as ``edgeship fleet serve`` wires them, on a
migrated SQLite file; devices are registered through the devices service, bundles are real signed bundles
uploaded by the CLI, and the rollouts that must move are driven by the real rollout driver (cli_parts).
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_parts import (
    Devices,
    driving,
    fleet_settings,
    keypair,
    make_bundle,
    migrated_db,
    register,
    serve_app,
    serve_fleet,
    token,
)
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from fleet_parts import incoming, offline

from fleet.db import Database
from fleet.devices.service import record_messages, set_tags
from sdk.cli.fleet import follow_rollout
from sdk.cli.fleet_client import ApiError, FleetClient
from sdk.cli.main import main


class Server:
    def __init__(self, url: str, db: Database, folder: Path, key: Path) -> None:
        self.url, self.db, self.folder, self.key = url, db, folder, key
        self.read = token(db, "read", "reader")
        self.write = token(db, "write", "writer")

    def run(self, capsys: pytest.CaptureFixture[str], *argv: str, tok: str | None = "write") -> tuple[int, str, str]:
        auth = [] if tok is None else ["--token", {"read": self.read, "write": self.write}.get(tok, tok)]
        code = main([*argv, "--server", self.url, *auth])
        out, err = capsys.readouterr()
        return code, out, err

    def bundle(self, version: int = 2, key: Path | None = None) -> Path:
        out = self.folder / f"digits-{version}-{time.monotonic_ns()}.edgebundle"
        return make_bundle(out, key or self.key, version=version)

    def upload(self, capsys: pytest.CaptureFixture[str], version: int = 2) -> None:
        code, _, err = self.run(capsys, "fleet", "upload", str(self.bundle(version)))
        assert code == 0, err


@pytest.fixture
def devices() -> list[str]:
    return []  # a test puts device ids here that fail their deploy


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, devices: list[str]) -> Iterator[Server]:
    """The fleet app with cam-1 (online, tags site=a old=x) and cam-2, cam-3 (site=b; cam-2 offline 2h);
    the rollout driver runs with ``Devices`` answering its commands."""
    monkeypatch.delenv("EDGESHIP_FLEET_URL", raising=False)
    monkeypatch.delenv("EDGESHIP_FLEET_TOKEN", raising=False)
    private, public = keypair(tmp_path / "keys")
    db = migrated_db(tmp_path / "fleet.db")
    long_ago = time.time() - 7200
    register(db, "cam-1")
    register(db, "cam-2", at=long_ago)
    register(db, "cam-3")
    with db.session() as s:
        record_messages(s, [incoming("cam-2", "status", offline(long_ago + 1), long_ago + 1)])
        set_tags(s, "cam-1", {"site": "a", "old": "x"})
        set_tags(s, "cam-2", {"site": "b"})
        set_tags(s, "cam-3", {"site": "b"})
    settings = fleet_settings(tmp_path / "state", [public])
    with driving(db, Devices(db, failing=devices)) as driver, serve_fleet(db, settings, driver) as url:
        yield Server(url, db, tmp_path, private)
    db.close()


def test_devices_table_and_json(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = server.run(capsys, "fleet", "devices", tok="read")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["device", "online", "last", "seen", "model", "slot", "state", "tags"]
    assert lines[2].split()[:2] == ["cam-1", "online"] and "digits v1" in lines[2] and "old=x,site=a" in lines[2]
    assert lines[2].split()[-3:-1] == ["A", "online"]
    assert lines[3].split()[:2] == ["cam-2", "offline"] and "2h ago" in lines[3]
    code, out, _ = server.run(capsys, "fleet", "devices", "--offline", "--json", tok="read")
    assert code == 0 and [d["device_id"] for d in json.loads(out)["devices"]] == ["cam-2"]
    code, out, _ = server.run(capsys, "fleet", "devices", "--selector", "tag=site=b", "--online", tok="read")
    assert code == 0 and [line.split()[0] for line in out.splitlines()[2:]] == ["cam-3"]
    code, _, err = server.run(capsys, "fleet", "devices", "--selector", "id=cam-1,ghost", tok="read")
    assert code == 1 and "ghost" in err and "(HTTP 422 invalid)" in err


def test_device_detail_with_deployments_and_404(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = server.run(capsys, "fleet", "device", "cam-1", tok="read")
    assert code == 0 and "device:       cam-1  (online)" in out and "slot A" in out and "digits v1" in out
    assert '"arch": "x86_64"' in out and "deployments:" not in out
    server.upload(capsys)
    code, _, err = server.run(capsys, "rollout", "create", "--release", "digits:2", "--devices", "id=cam-1",
                              "--waves", "100%", "--soak", "0s", "--follow", "--interval", "0.05")  # fmt: skip
    assert code == 0, err
    code, out, _ = server.run(capsys, "fleet", "device", "cam-1", tok="read")
    assert "digits v2" in out.splitlines()[2]
    history = out[out.index("deployments:") :].splitlines()
    assert history[1].split() == ["started", "command", "model", "outcome", "last", "phase"]
    assert history[3].split()[2:] == ["ro1-cam-1-deploy", "digits", "v2", "active", "active"]
    code, out, err = server.run(capsys, "fleet", "device", "nope", tok="read")
    assert (code, out) == (1, "")
    assert err == "error: no device 'nope' (HTTP 404 not_found)\n"


def test_no_token_unknown_token_and_read_token_on_write(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = server.run(capsys, "fleet", "devices", tok=None)
    assert code == 1
    assert err == (
        "error: a bearer token is required (HTTP 401 unauthorized); give a token with --token or EDGESHIP_FLEET_TOKEN\n"
    )
    code, _, err = server.run(capsys, "fleet", "devices", tok="esf_not-a-real-token")
    assert (code, err) == (1, "error: unknown or revoked token (HTTP 401 unauthorized)\n")
    code, _, err = server.run(capsys, "fleet", "tag", "cam-1", "site=b", tok="read")
    assert code == 1 and err.startswith("error: token 'reader' has read scope; this needs write (HTTP 403 forbidden)")


def test_env_supplies_server_and_token(server: Server, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("EDGESHIP_FLEET_URL", server.url)
    monkeypatch.setenv("EDGESHIP_FLEET_TOKEN", server.read)
    assert main(["fleet", "devices", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["devices"]) == 3


def test_tag_merges_and_removes(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = server.run(capsys, "fleet", "tag", "cam-1", "site=b", "ring=canary", "--remove", "old")
    assert (code, out) == (0, "cam-1: ring=canary,site=b\n")
    code, out, _ = server.run(capsys, "fleet", "device", "cam-1", "--json", tok="read")
    assert json.loads(out)["tags"] == {"ring": "canary", "site": "b"}
    code, _, err = server.run(capsys, "fleet", "tag", "cam-1", "a=1", "--remove", "old")
    assert (code, err) == (1, "error: device 'cam-1' has no tag 'old'\n")
    code, _, err = server.run(capsys, "fleet", "tag", "cam-1", "noequals")
    assert (code, err) == (1, "error: a tag is KEY=VALUE, got 'noequals'\n")
    code, _, err = server.run(capsys, "fleet", "tag", "cam-1")
    assert code == 1 and "give KEY=VALUE" in err
    code, _, err = server.run(capsys, "fleet", "tag", "ghost", "a=1")
    assert (code, err) == (1, "error: no device 'ghost' (HTTP 404 not_found)\n")


def test_upload_verifies_and_shows_refusals(server: Server, capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:  # fmt: skip
    bundle = server.bundle()
    sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
    code, out, _ = server.run(capsys, "fleet", "upload", str(bundle))
    assert code == 0 and sha in out and "digits v2  onnxruntime/fp32" in out
    assert f"url:        http://artifacts.test/artifacts/{sha}.edgebundle" in out
    code, out, _ = server.run(capsys, "fleet", "upload", str(bundle), "--json")  # again: the stored one
    assert code == 0 and json.loads(out)["sha256"] == sha
    stranger, _ = keypair(tmp_path / "stranger")
    code, _, err = server.run(capsys, "fleet", "upload", str(server.bundle(3, key=stranger)))
    assert code == 1 and err.startswith("error: bundle refused: SignatureError") and "(HTTP 422 invalid)" in err
    tampered = tmp_path / "tampered.edgebundle"
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    code, _, err = server.run(capsys, "fleet", "upload", str(tampered))
    assert code == 1 and err.startswith("error: bundle refused:") and "(HTTP 422 invalid)" in err
    huge = tmp_path / "huge.edgebundle"
    huge.write_bytes(b"x" * 1_000_001)
    code, _, err = server.run(capsys, "fleet", "upload", str(huge))
    assert code == 1 and "over the 1000000-byte upload limit (HTTP 413" in err
    code, _, err = server.run(capsys, "fleet", "upload", str(tmp_path / "missing.edgebundle"))
    assert code == 1 and err.startswith("error: no such bundle file:")
    code, out, _ = server.run(capsys, "fleet", "releases", tok="read")
    assert code == 0 and out.splitlines()[2].split() == ["digits", "2", "1", "1", "onnxruntime/fp32", "0s", "ago"]


def test_rollout_create_refusals(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    server.upload(capsys)
    base = ["rollout", "create", "--release", "digits:2"]
    code, _, err = server.run(capsys, *base, "--devices", "tag=site=b", "--gate", "bogus<=1")
    assert code == 1 and "unknown metric 'bogus'" in err and err.endswith("(HTTP 422 invalid)\n")
    code, _, err = server.run(capsys, *base, "--devices", "id=cam-1,ghost")
    assert code == 1 and "unknown devices in selector: ghost (HTTP 422 invalid)" in err
    code, _, err = server.run(capsys, *base, "--devices", "tag=site=b", "--waves", "1,,100%")
    assert code == 1 and "is empty" in err and "HTTP 422" in err
    code, _, err = server.run(capsys, "rollout", "create", "--release", "digits:9", "--devices", "tag=site=b")
    assert code == 1 and "HTTP 422" in err
    code, _, err = server.run(capsys, *base, "--devices", "tag=site=b", "--rate", "2", tok="read")
    assert code == 1 and "HTTP 403" in err
    code, out, err = server.run(capsys, *base, "--devices", "tag=site=b", "--waves", "1,100%", "--soak", "1h",
                               "--json")  # fmt: skip
    assert code == 0 and json.loads(out)["state"] in ("pending", "running"), err
    code, _, err = server.run(capsys, *base, "--devices", "id=cam-2", "--waves", "100%")
    assert code == 1 and "cam-2" in err and "(HTTP 409 conflict)" in err
    register(server.db, "cam-9", capabilities={"arch": "riscv64", "runtimes": {}, "accelerators": []})
    code, _, err = server.run(capsys, *base, "--devices", "id=cam-9", "--waves", "100%")
    assert code == 1 and "cam-9" in err and "HTTP 422" in err


def test_validation_error_detail_is_shown(server: Server) -> None:
    with FleetClient(server.url, server.write) as client, pytest.raises(ApiError) as caught:
        client.post("/rollouts", {"release": "digits:2"})
    assert caught.value.status == 422 and "devices" in caught.value.detail and "Field required" in caught.value.detail


def test_an_error_page_that_is_not_ours_is_shown_briefly() -> None:
    proxy = FastAPI()
    proxy.get("/api/v1/devices")(lambda: PlainTextResponse("<html>Bad Gateway from a proxy</html>", 502))
    with serve_app(proxy) as url, FleetClient(url, "esf_x") as client, pytest.raises(ApiError) as caught:
        client.get("/devices")
    assert str(caught.value) == "<html>Bad Gateway from a proxy</html> (HTTP 502)"


def test_connection_refused_names_the_url(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        assert main(["fleet", "devices", "--server", url, "--token", "esf_x"]) == 1
    assert capsys.readouterr().err == f"error: cannot reach the fleet server at {url}: connection refused\n"
    assert main(["fleet", "devices", "--server", "ftp://x"]) == 1
    assert "must start with http://" in capsys.readouterr().err


def test_rollout_create_follow_until_completed(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    server.upload(capsys)
    code, out, err = server.run(capsys, "rollout", "create", "--release", "digits:2", "--devices", "all",
                                "--waves", "1,100%", "--soak", "0.3s", "--gate", "health_failures=0",
                                "--gate", "error_rate<=1%", "--follow", "--interval", "0.05")  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "rollout 1 created"
    assert any(line == "rollout 1 running wave 1/2 pending=2 active=1 gates ok" for line in lines[1:]), out
    assert lines[-1] == "rollout 1 completed wave 2/2 active=3 gates ok"
    code, out, _ = server.run(capsys, "rollout", "status", "1", tok="read")
    assert out.splitlines()[0] == "rollout 1  digits:2  state completed  wave 2/2  devices all"
    table = out.splitlines()[1:5]
    assert table[0].split() == ["wave", "size", "devices", "pending", "sent", "active", "failed", "rolled_back"]
    assert (table[2].split(), table[3].split()) == (["1", "1", "1", "0", "0", "1", "0", "0"],
                                                    ["2", "100%", "2", "0", "0", "2", "0", "0"])  # fmt: skip
    assert "health_failures=0  0      0          ok" in out
    assert "error_rate<=1%     -      1.00%      no data" in out  # a finished rollout observes nothing more
    code, out, _ = server.run(capsys, "rollout", "audit", "1", tok="read")
    actions = [line.split()[2] for line in out.splitlines()[2:]]
    assert code == 0 and actions[0] == "Create" and "AdvanceWave" in actions and actions[-1] == "Complete"


@pytest.mark.parametrize("devices", [["cam-1"]])
def test_rollout_status_follow_stops_at_a_breach(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    server.upload(capsys)
    code, out, _ = server.run(capsys, "rollout", "create", "--release", "digits:2", "--devices", "id=cam-1,cam-3",
                              "--waves", "1,100%", "--soak", "1h", "--gate", "health_failures=0", "--json")  # fmt: skip
    assert code == 0
    code, out, err = server.run(capsys, "rollout", "status", "1", "--follow", "--interval", "0.05", tok="read")
    assert code == 1
    assert out.splitlines()[-1] == "rollout 1 paused wave 1/2 pending=1 failed=1 breached: health_failures=0"
    assert err.startswith("error: rollout 1 is paused: ") and "health_failures=0" in err
    code, out, _ = server.run(capsys, "rollout", "status", "1", tok="read")
    assert "reason: " in out and "health_failures=0  1      0          BREACH" in out


def test_rollout_status_list_and_actions(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    server.upload(capsys)
    code, _, _ = server.run(capsys, "rollout", "create", "--release", "digits:2", "--devices", "tag=site=b",
                            "--waves", "1,100%", "--soak", "1h", "--gate", "p95_latency<=1.2x")  # fmt: skip
    assert code == 0
    code, out, _ = server.run(capsys, "rollout", "pause", "1")
    assert code == 0 and "state paused" in out
    code, out, _ = server.run(capsys, "rollout", "status", "1", tok="read")
    assert out.splitlines()[0] == "rollout 1  digits:2  state paused  wave 1/2  devices tag=site=b"
    assert "p95_latency<=1.2x" in out and "1.2x" in out
    code, out, _ = server.run(capsys, "rollout", "list", "--state", "paused", tok="read")
    assert code == 0 and out.splitlines()[2].split()[:5] == ["1", "digits:2", "paused", "1/2", "tag=site=b"]
    code, _, err = server.run(capsys, "rollout", "pause", "1")
    assert code == 1 and "(HTTP 409 conflict)" in err
    code, out, _ = server.run(capsys, "rollout", "resume", "1")
    assert code == 0 and "state running" in out
    code, out, _ = server.run(capsys, "rollout", "abort", "1")
    assert code == 0 and "state aborted" in out
    code, _, err = server.run(capsys, "rollout", "abort", "99")
    assert (code, err) == (1, "error: rollout 99 does not exist (HTTP 404 not_found)\n")


def test_follow_redraws_in_place_on_a_terminal(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    server.upload(capsys)
    assert server.run(capsys, "rollout", "create", "--release", "digits:2", "--devices", "all", "--waves", "100%",
                      "--soak", "0.2s")[0] == 0  # fmt: skip
    out = io.StringIO()
    with FleetClient(server.url, server.read) as client:
        final = follow_rollout(client, 1, out=out, interval_s=0.02, tty=True)
    assert final["state"] == "completed"
    text = out.getvalue()
    assert "\x1b[J" in text  # later frames drawn over the previous one
    assert "wave  size  devices  pending  sent  active  failed  rolled_back" in text


def test_views_show_dashes_for_fields_a_response_lacks() -> None:
    from sdk.cli import fleet_views as views

    assert views.rollout_lines({})[0] == "rollout -  -:-  state -  wave -  devices -"
    assert views.devices_table({"devices": [{}]})[2].split() == ["-", "offline", "-", "-", "-", "-", "-"]
    assert views.releases_table([{"name": "m"}])[2].split()[:2] == ["m", "-"]
    assert views.rollout_summary({"id": 1, "state": "pending"}) == "rollout 1 pending wave - - gates ok"
    assert views.device_lines({"device_id": "d", "deployments": [{"outcome": "active", "cmd_id": "c1"}]})[-1].split()[
        :3] == ["-", "c1", "-"]  # fmt: skip


def test_rollout_create_takes_the_baseline_and_the_resend(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    server.upload(capsys)
    code, out, _ = server.run(capsys, "rollout", "create", "--release", "digits:2", "--devices", "tag=site=b",
                              "--waves", "100%", "--baseline", "2h", "--resend", "15s", "--json")  # fmt: skip
    assert code == 0
    assert (json.loads(out)["spec"]["baseline_s"], json.loads(out)["spec"]["resend_s"]) == (7200.0, 15.0)
    code, _, err = server.run(capsys, "rollout", "create", "--release", "digits:2", "--devices", "tag=site=b",
                              "--baseline", "30d")  # fmt: skip
    assert code == 1 and "the baseline must be above 0 s and at most 7d" in err
