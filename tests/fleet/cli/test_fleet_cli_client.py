"""`edgeship fleet ...` / `edgeship rollout ...` as HTTP clients, over real HTTP against a real uvicorn.

The app is the real ``create_app`` (auth, error bodies) plus stand-in routes for the domains (cli_parts).
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_parts import migrated_db, serve_app, stub_app, token

from fleet.db import Database
from sdk.cli.fleet import follow_rollout
from sdk.cli.fleet_client import ApiError, FleetClient
from sdk.cli.main import main


class Server:
    def __init__(self, url: str, db: Database) -> None:
        self.url, self.db = url, db
        self.read = token(db, "read", "reader")
        self.write = token(db, "write", "writer")

    def run(self, capsys: pytest.CaptureFixture[str], *argv: str, tok: str | None = "write") -> tuple[int, str, str]:
        auth = [] if tok is None else ["--token", {"read": self.read, "write": self.write}.get(tok, tok)]
        code = main([*argv, "--server", self.url, *auth])
        out, err = capsys.readouterr()
        return code, out, err


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.delenv("EDGESHIP_FLEET_URL", raising=False)
    monkeypatch.delenv("EDGESHIP_FLEET_TOKEN", raising=False)
    db = migrated_db(tmp_path / "fleet.db")
    with serve_app(stub_app(db)) as url:
        yield Server(url, db)
    db.close()


def test_devices_table_and_json(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = server.run(capsys, "fleet", "devices", tok="read")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["device", "online", "last", "seen", "model", "slot", "state", "tags"]
    assert lines[2].split()[:2] == ["cam-1", "online"] and "digits v1" in lines[2] and "old=x,site=a" in lines[2]
    assert "offline" in lines[3] and "2h ago" in lines[3]
    code, out, _ = server.run(capsys, "fleet", "devices", "--offline", "--json", tok="read")
    assert code == 0 and [d["device_id"] for d in json.loads(out)] == ["cam-2"]


def test_device_detail_and_404(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = server.run(capsys, "fleet", "device", "cam-1", tok="read")
    assert code == 0 and "device:       cam-1  (online)" in out and "slot a" in out
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
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_tag_merges_and_removes(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = server.run(capsys, "fleet", "tag", "cam-1", "site=b", "ring=canary", "--remove", "old")
    assert (code, out) == (0, "cam-1: ring=canary,site=b\n")
    code, _, err = server.run(capsys, "fleet", "tag", "cam-1", "noequals")
    assert (code, err) == (1, "error: a tag is KEY=VALUE, got 'noequals'\n")
    code, _, err = server.run(capsys, "fleet", "tag", "cam-1")
    assert code == 1 and "give KEY=VALUE" in err
    code, _, err = server.run(capsys, "fleet", "tag", "ghost", "a=1")
    assert (code, err) == (1, "error: no device 'ghost' (HTTP 404 not_found)\n")


def test_upload_streams_the_file_and_shows_refusals(server: Server, capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:  # fmt: skip
    bundle = tmp_path / "digits.edgebundle"
    bundle.write_bytes(b"BUNDLE" + bytes(range(200)))
    code, out, _ = server.run(capsys, "fleet", "upload", str(bundle))
    assert code == 0 and hashlib.sha256(bundle.read_bytes()).hexdigest() in out and "onnxruntime/fp32" in out
    assert f"signed by {'ab' * 8}" in out
    bundle.write_bytes(b"NOTABUNDLE")
    code, _, err = server.run(capsys, "fleet", "upload", str(bundle))
    assert (code, err) == (1, "error: not an edgeship bundle: bad magic (HTTP 422 invalid)\n")
    bundle.write_bytes(b"BUNDLE" + b"x" * 5000)
    code, _, err = server.run(capsys, "fleet", "upload", str(bundle))
    assert (code, err) == (1, "error: bundle of 5006 bytes is over the 1000-byte limit (HTTP 413 too_large)\n")
    code, _, err = server.run(capsys, "fleet", "upload", str(tmp_path / "missing.edgebundle"))
    assert code == 1 and err.startswith("error: no such bundle file:")


def test_releases_table(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = server.run(capsys, "fleet", "releases", tok="read")
    assert code == 0 and out.splitlines()[2].split() == ["digits", "2", "2", "1", "-", "1m", "ago"]
    with FleetClient(server.url, server.read) as client:
        detail = client.get("/releases/digits/2")
    from sdk.cli import fleet_views as views

    assert views.releases_table([detail])[2].split()[:4] == ["digits", "2", "2", "-"]
    assert "onnxruntime/fp32, openvino/int8" in views.releases_table([detail])[2]


def test_rollout_create_refusals(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["rollout", "create", "--release", "digits:2", "--devices", "tag=site=a"]
    code, _, err = server.run(capsys, *base, "--gate", "bogus<=1")
    assert code == 1
    assert err == ("error: unknown gate metric 'bogus'; valid: health_failures, error_rate, p95_latency, silence "
                   "(HTTP 422 invalid)\n")  # fmt: skip
    code, _, err = server.run(capsys, "rollout", "create", "--release", "digits:2", "--devices", "tag=busy=1")
    assert (code, err) == (1, "error: device cam-1 is already in running rollout 3 (HTTP 409 conflict)\n")
    code, _, err = server.run(capsys, *base, "--rate", "2", tok="read")
    assert code == 1 and "HTTP 403" in err


def test_validation_error_detail_is_shown(server: Server) -> None:
    with FleetClient(server.url, server.write) as client, pytest.raises(ApiError) as caught:
        client.post("/rollouts", {"release": "digits:2"})
    assert caught.value.status == 422 and "devices" in caught.value.detail and "Field required" in caught.value.detail


def test_an_error_page_that_is_not_ours_is_shown_briefly(server: Server) -> None:
    with FleetClient(server.url, server.read) as client, pytest.raises(ApiError) as caught:
        client.get("/broken")
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
    code, out, _ = server.run(capsys, "rollout", "create", "--release", "digits:2", "--devices", "tag=site=a",
                              "--gate", "error_rate<=1%", "--follow", "--interval", "0.05")  # fmt: skip
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "rollout 7 created"
    assert lines[1:] == [  # not a TTY: one plain line per change
        "rollout 7 running wave 2/3 active=5 pending=5 gates ok",
        "rollout 7 running wave 3/3 active=10 pending=0 gates ok",
        "rollout 7 completed wave 3/3 active=10 pending=0 gates ok",
    ]


def test_rollout_status_follow_stops_at_a_breach(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = server.run(capsys, "rollout", "status", "8", "--follow", "--interval", "0.05", tok="read")
    assert code == 1
    assert out.splitlines()[-1] == "rollout 7 paused wave 3/3 active=10 pending=0 breached: error_rate<=1%"
    assert err == "error: rollout 7 is paused: error_rate 3% > 1%\n"


def test_rollout_status_list_and_actions(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = server.run(capsys, "rollout", "status", "7", tok="read")
    assert code == 0
    assert out.splitlines()[0] == "rollout 7  digits:2  state running  wave 2/3  devices tag=site=a"
    assert "error_rate<=1%  0.002  0.01       ok" in out
    code, out, _ = server.run(capsys, "rollout", "list", tok="read")
    assert code == 0 and out.splitlines()[2].split()[:4] == ["7", "digits:2", "running", "2/3"]
    code, out, _ = server.run(capsys, "rollout", "pause", "7")
    assert code == 0 and "state paused" in out
    code, _, err = server.run(capsys, "rollout", "abort", "99")
    assert (code, err) == (1, "error: no rollout 99 (HTTP 404 not_found)\n")


def test_follow_redraws_in_place_on_a_terminal(server: Server) -> None:
    out = io.StringIO()
    with FleetClient(server.url, server.read) as client:
        final = follow_rollout(client, "7", out=out, interval_s=0.01, tty=True)
    assert final["state"] == "completed"
    text = out.getvalue()
    assert text.count("\x1b[J") == 2  # three frames, the last two drawn over the previous one
    assert "wave  target  state    pending  sent  active  failed  rolled_back" in text


def test_views_show_dashes_for_fields_a_response_lacks() -> None:
    from sdk.cli import fleet_views as views

    assert views.rollout_lines({})[0] == "rollout -  -:-  state -  wave -  devices -"
    assert views.devices_table({"devices": [{}]})[2].split() == ["-", "offline", "-", "-", "-", "-", "-"]
    assert views.releases_table({"items": [{"name": "m"}]})[2].split()[:2] == ["m", "-"]
    assert views.rollout_summary({"id": 1, "state": "pending"}) == "rollout 1 pending wave - - gates ok"
    assert views.device_lines({"device_id": "d", "history": [{"phase": "active", "cmd_id": "c1"}]})[-1].split() == [
        "-", "c1", "active"]  # fmt: skip
