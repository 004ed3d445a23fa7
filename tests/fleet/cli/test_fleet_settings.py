"""FleetSettings: defaults, then EDGESHIP_FLEET_* variables, then flags; every bad value refused at once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fleet.settings import FleetSettings, parse_broker
from sdk.errors import InputError


def test_defaults_derive_from_the_state_folder(tmp_path: Path) -> None:
    s = FleetSettings.from_env_and_args({"state_dir": tmp_path}, env={})
    assert s.database_url == f"sqlite:///{tmp_path.resolve()}/fleet.db"
    assert s.artifacts_path == tmp_path / "artifacts"
    assert s.server_url == "http://127.0.0.1:8800" and s.artifacts_url == "http://127.0.0.1:8800"
    assert (s.fleet, s.broker_host, s.broker_port, s.broker_tls) == ("default", "127.0.0.1", 1883, False)
    assert s.holder_id.endswith(f"-{os.getpid()}")


def test_flags_override_the_environment_which_overrides_defaults(tmp_path: Path) -> None:
    key = tmp_path / "k.pub"
    key.write_text("x")
    env = {"EDGESHIP_FLEET_HTTP_PORT": "9000", "EDGESHIP_FLEET_FLEET": "plant-7", "EDGESHIP_FLEET_LEASE_S": "30",
           "EDGESHIP_FLEET_BROKER": "mqtts://broker.local", "EDGESHIP_FLEET_TRUSTED_KEYS": f"{key}{os.pathsep}{key}",
           "EDGESHIP_FLEET_ARTIFACT_BASE_URL": "https://cdn.example/b/"}  # fmt: skip
    s = FleetSettings.from_env_and_args({"http_port": 9100, "fleet": None, "state_dir": tmp_path}, env=env)
    assert (s.http_port, s.fleet, s.lease_s) == (9100, "plant-7", 30.0)
    assert (s.broker_host, s.broker_port, s.broker_tls) == ("broker.local", 8883, True)
    assert s.trusted_keys == (key, key) and s.artifacts_url == "https://cdn.example/b"
    s = FleetSettings.from_env_and_args({"broker": "10.0.0.2:1884", "state_dir": tmp_path}, env=env)
    assert (s.broker_host, s.broker_port) == ("10.0.0.2", 1884)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("h", ("h", 1883, False)), ("h:2000", ("h", 2000, False)), ("mqtt://h:1", ("h", 1, False)),
     ("mqtts://h", ("h", 8883, True)), ("ssl://h:8884", ("h", 8884, True))],
)  # fmt: skip
def test_parse_broker(value: str, expected: tuple[str, int, bool]) -> None:
    assert parse_broker(value) == expected


@pytest.mark.parametrize("value", ["http://h:1", "h:notaport", "h:99999", "mqtt://:1883"])
def test_parse_broker_refuses(value: str) -> None:
    with pytest.raises(InputError, match="broker"):
        parse_broker(value)


def test_a_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="EDGESHIP_FLEET_HTTP_PORT: bad value 'eighty'"):
        FleetSettings.from_env_and_args({"state_dir": tmp_path}, env={"EDGESHIP_FLEET_HTTP_PORT": "eighty"})
    with pytest.raises(InputError, match="EDGESHIP_FLEET_BROKER_TLS: bad value 'maybe'"):
        FleetSettings.from_env_and_args({"state_dir": tmp_path}, env={"EDGESHIP_FLEET_BROKER_TLS": "maybe"})


def test_every_invalid_value_is_reported_in_one_message(tmp_path: Path) -> None:
    with pytest.raises(InputError) as caught:
        FleetSettings(state_dir=tmp_path, http_port=70000, fleet="a/b", lease_s=0, artifact_base_url="ftp://x",
                      trusted_keys=(tmp_path / "missing.pub",), max_upload_bytes=-1)  # fmt: skip
    message = str(caught.value)
    for part in ("http_port must be 0-65535", "fleet must be a non-empty MQTT topic segment", "lease_s must be > 0",
                 "artifact_base_url must be an http(s) URL", "no such file: ", "missing.pub",
                 "max_upload_bytes must be > 0"):  # fmt: skip
        assert part in message


def test_the_broker_password_is_read_from_its_file_when_needed(tmp_path: Path) -> None:
    secret = tmp_path / "mqtt.pass"
    secret.write_text("s3cret\n")
    s = FleetSettings(state_dir=tmp_path, broker_username="fleet", broker_password_file=secret)
    assert s.broker_password() == "s3cret" and "s3cret" not in repr(s)
    assert FleetSettings(state_dir=tmp_path).broker_password() is None


def test_a_wildcard_bind_is_shown_as_the_host_name(tmp_path: Path) -> None:
    s = FleetSettings(state_dir=tmp_path, http_host="0.0.0.0", http_port=8801)
    assert s.server_url.startswith("http://") and "0.0.0.0" not in s.server_url and s.server_url.endswith(":8801")


def test_one_process_on_the_embedded_broker_turns_sharing_off(tmp_path: Path) -> None:
    env = {"EDGESHIP_FLEET_SHARE_GROUP": "none", "EDGESHIP_FLEET_BROKER_PROTOCOL": "3.1.1"}
    s = FleetSettings.from_env_and_args({"state_dir": tmp_path}, env=env)
    assert (s.share_group, s.broker_protocol) == (None, "3.1.1")
    assert s.mqtt_client_id.startswith("edgeship-fleet-")
    with pytest.raises(InputError, match=r"broker_protocol must be '5' or '3\.1\.1'"):
        FleetSettings(state_dir=tmp_path, broker_protocol="4")


def test_the_broker_tls_files_come_from_flags_and_reach_the_ingest_and_the_publisher_alike(tmp_path: Path) -> None:
    from fleet.settings import FleetSettings as Settings
    from sdk.cli.fleet import _settings
    from sdk.cli.main import build_parser

    for name in ("ca.crt", "fleet.crt", "fleet.key"):
        (tmp_path / name).write_text("x")
    args = build_parser().parse_args(
        ["fleet", "serve", "--state-dir", str(tmp_path), "--broker", "mqtts://broker.internal",
         "--broker-ca-file", str(tmp_path / "ca.crt"), "--broker-cert-file", str(tmp_path / "fleet.crt"),
         "--broker-key-file", str(tmp_path / "fleet.key")]
    )  # fmt: skip
    s: Settings = _settings(args)
    assert s.broker_tls_files() == (str(tmp_path / "ca.crt"), str(tmp_path / "fleet.crt"), str(tmp_path / "fleet.key"))
    assert FleetSettings(state_dir=tmp_path).broker_tls_files() is None
    system = FleetSettings(state_dir=tmp_path, broker_tls=True).broker_tls_files()
    assert system is not None and system[1:] == (None, None)  # the system's default CA file


def test_broker_tls_files_without_a_tls_broker_or_a_certificate_without_its_key_are_refused(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    with pytest.raises(InputError, match="broker_ca_file given but the broker is not TLS: use --broker mqtts://"):
        FleetSettings(state_dir=tmp_path, broker_ca_file=ca)
    with pytest.raises(InputError, match="broker_cert_file and broker_key_file go together"):
        FleetSettings(state_dir=tmp_path, broker_tls=True, broker_cert_file=ca)
    with pytest.raises(InputError, match=r"no such file: .*no\.key"):
        FleetSettings(state_dir=tmp_path, broker_tls=True, broker_cert_file=ca, broker_key_file=tmp_path / "no.key")


def test_command_resend_s_is_what_the_rollout_routes_resend_after_when_a_request_names_none(tmp_path: Path) -> None:
    from fastapi import FastAPI

    from fleet.rollouts.routes import RolloutWiring
    from fleet.wiring import wire_rollouts

    assert FleetSettings(state_dir=tmp_path).command_resend_s == 60.0  # what a rollout always defaulted to
    app = FastAPI()
    env = {"EDGESHIP_FLEET_COMMAND_RESEND_S": "120"}
    wire_rollouts(app, FleetSettings.from_env_and_args({"state_dir": tmp_path}, env=env), None)
    wiring: RolloutWiring = app.state.rollout_wiring
    assert wiring.resend_s == 120.0
