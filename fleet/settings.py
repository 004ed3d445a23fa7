"""The fleet server's one settings object: defaults, then ``EDGESHIP_FLEET_*`` variables, then command-line flags.

Every component of ``edgeship fleet serve`` (API, ingest, rollout driver, artifact server) reads the same
frozen ``FleetSettings``, so a value is decided once, validated once (a bad value stops the server at
start with one clear line, never later mid-rollout) and printed nowhere with its secret: the broker
password is read from a file when needed, never held in the settings or the environment.

Each field ``x`` can be set with the environment variable ``EDGESHIP_FLEET_X`` (``ENV_PREFIX`` + upper
case name); a list field (``trusted_keys``) takes paths separated by ``os.pathsep``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sdk.errors import InputError
from sdk.mqtt_contract import check_segment
from sdk.redact import redact_url

__all__ = ["ENV_PREFIX", "FleetSettings", "default_holder_id", "default_state_dir", "parse_broker"]

ENV_PREFIX = "EDGESHIP_FLEET_"


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/edgeship/fleet`` (``~/.local/state/edgeship/fleet``): the database and the bundles."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edgeship" / "fleet"


def default_holder_id() -> str:
    """``hostname-pid``: names this process in rollout leases, so an operator can tell who drives what."""
    return f"{socket.gethostname()}-{os.getpid()}"


def parse_broker(value: str) -> tuple[str, int, bool]:
    """``host``, ``host:port``, ``mqtt://host:port`` or ``mqtts://host:port`` (TLS) -> (host, port, tls).

    Raises:
        InputError: another scheme, no host or a bad port.
    """
    text = value.strip()
    url = urlsplit(text if "://" in text else f"mqtt://{text}")
    if url.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise InputError(f"broker must be host[:port] or mqtt[s]://host:port, got {value!r}")
    tls = url.scheme in ("mqtts", "ssl")
    try:
        port = url.port or (8883 if tls else 1883)
    except ValueError as e:
        raise InputError(f"broker {value!r}: {e}") from e
    if not url.hostname:
        raise InputError(f"broker {value!r} names no host")
    return url.hostname, port, tls


@dataclass(frozen=True)
class FleetSettings:
    """Everything ``edgeship fleet serve`` needs; build it with ``from_env_and_args``.

    ``None`` in ``db_url``, ``artifacts_dir`` and ``artifact_base_url`` means "derived": read them through
    ``database_url``, ``artifacts_path`` and ``artifacts_url``.
    """

    state_dir: Path = field(default_factory=default_state_dir)  # holds fleet.db (SQLite) and artifacts/
    db_url: str | None = None  # SQLAlchemy URL; None: sqlite:///<state_dir>/fleet.db
    db_wait_s: float = 60.0  # seconds start-up keeps retrying an unreachable database before giving up
    http_host: str = "127.0.0.1"  # address the API and artifact server listen on (0.0.0.0: every interface)
    http_port: int = 8800  # TCP port; 0 picks a free one (printed at start)
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    broker_tls: bool = False
    broker_ca_file: Path | None = None  # CA bundle a TLS broker is verified with; None: the system's
    broker_cert_file: Path | None = None  # client certificate for mutual TLS (with broker_key_file)
    broker_key_file: Path | None = None  # its private key (PEM, unencrypted)
    broker_username: str | None = None
    broker_password_file: Path | None = None  # read when connecting; the secret never sits in settings or env
    broker_protocol: str = "5"  # MQTT "5" (Mosquitto) or "3.1.1" (the embedded amqtt broker)
    mqtt_client_id: str = field(default_factory=lambda: f"edgeship-fleet-{socket.gethostname()}"[:128])
    # ^ the ingest's persistent session: unique per fleet process, the same across its restarts
    fleet: str = "default"  # the <fleet> segment of edgeship/v1/<fleet>/<device>/...
    share_group: str | None = "edgeship-fleet"  # $share/<group>/...: processes split the ingest; None: no sharing
    artifacts_dir: Path | None = None  # bundles by sha256; None: <state_dir>/artifacts
    artifact_base_url: str | None = None  # where devices download; None: this server's own URL
    trusted_keys: tuple[Path, ...] = ()  # public keys an uploaded bundle must be signed with
    max_upload_bytes: int = 2 * 1024**3  # bytes of one uploaded bundle (413 above)
    telemetry_retention_s: float = 30 * 86400.0  # seconds telemetry and events are kept
    lease_s: float = 15.0  # seconds a rollout lease lasts without renewal (takeover delay after a crash)
    holder_id: str = field(default_factory=default_holder_id)  # this process in rollout leases
    command_resend_s: float = 60.0  # seconds: a rollout's resend (same command id) when it names none
    timestamp_key: Path | None = None  # signs the fleet's freshness (fleet.freshness); None: none published
    freshness_interval_s: float = 3600.0  # seconds between freshness documents
    freshness_lifetime_s: float = 86400.0  # seconds each is valid (devices report stale after it)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise InputError("fleet settings: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every invalid value, described (empty when all are fine)."""
        out: list[str] = []
        if not 0 <= self.http_port <= 65535:
            out.append(f"http_port must be 0-65535, got {self.http_port}")
        if not 1 <= self.broker_port <= 65535:
            out.append(f"broker_port must be 1-65535, got {self.broker_port}")
        if self.broker_protocol not in ("5", "3.1.1"):
            out.append(f"broker_protocol must be '5' or '3.1.1', got {self.broker_protocol!r}")
        if not 0 < len(self.mqtt_client_id) <= 128:
            out.append("mqtt_client_id must be 1 to 128 characters")
        for name in ("fleet", "share_group", "holder_id"):
            if getattr(self, name) is None and name == "share_group":
                continue
            try:
                check_segment(name, getattr(self, name))
            except ValueError as e:
                out.append(str(e))
        positive = ("db_wait_s", "telemetry_retention_s", "lease_s", "command_resend_s", "max_upload_bytes",
                    "freshness_interval_s")  # fmt: skip
        out += [f"{n} must be > 0, got {getattr(self, n)}" for n in positive if not getattr(self, n) > 0]
        if self.artifact_base_url is not None and urlsplit(self.artifact_base_url).scheme not in ("http", "https"):
            out.append(f"artifact_base_url must be an http(s) URL, got {redact_url(self.artifact_base_url)!r}")
        if (self.broker_cert_file is None) != (self.broker_key_file is None):
            out.append("broker_cert_file and broker_key_file go together (mutual TLS needs both)")
        tls_files = [n for n in ("broker_ca_file", "broker_cert_file", "broker_key_file") if getattr(self, n)]
        if tls_files and not self.broker_tls:
            out.append(f"{', '.join(tls_files)} given but the broker is not TLS: use --broker mqtts://HOST[:PORT]")
        if not self.freshness_lifetime_s > self.freshness_interval_s:
            out.append("freshness_lifetime_s must be above freshness_interval_s (a missed publish is not a freeze)")
        files = [*self.trusted_keys, self.broker_password_file, self.broker_ca_file, self.broker_cert_file,
                 self.broker_key_file, self.timestamp_key]  # fmt: skip
        out += [f"no such file: {p}" for p in files if p is not None and not Path(p).is_file()]
        return out

    # ---- derived values ------------------------------------------------------------------------
    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{(self.state_dir / 'fleet.db').resolve()}"

    @property
    def artifacts_path(self) -> Path:
        return self.artifacts_dir or self.state_dir / "artifacts"

    @property
    def server_url(self) -> str:
        """The URL this server is reached at (a wildcard bind is shown as this host's name)."""
        host = socket.gethostname() if self.http_host in ("0.0.0.0", "::", "") else self.http_host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.http_port}"

    @property
    def artifacts_url(self) -> str:
        """The base devices download ``<base>/artifacts/<sha256>.edgebundle`` from."""
        return (self.artifact_base_url or self.server_url).rstrip("/")

    def broker_password(self) -> str | None:
        """The broker password, read from its file now (trailing newline stripped)."""
        if self.broker_password_file is None:
            return None
        return Path(self.broker_password_file).read_text().rstrip("\r\n")

    def broker_tls_files(self) -> tuple[str, str | None, str | None] | None:
        """``(CA file, client certificate, client key)`` for a TLS broker, None without TLS.

        The ingest and the command publisher both connect with exactly these, so a broker one of them
        can reach the other can too. The CA is ``broker_ca_file``, else the system's default CA file.

        Raises:
            InputError: TLS, no ``broker_ca_file`` and no system default CA file.
        """
        if not self.broker_tls:
            return None
        ca = str(self.broker_ca_file) if self.broker_ca_file is not None else ssl.get_default_verify_paths().cafile
        if ca is None:
            raise InputError("broker TLS: this system has no default CA file; give --broker-ca-file")
        cert = str(self.broker_cert_file) if self.broker_cert_file is not None else None
        key = str(self.broker_key_file) if self.broker_key_file is not None else None
        return ca, cert, key

    # ---- building ------------------------------------------------------------------------------
    @classmethod
    def from_env_and_args(
        cls, args: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> FleetSettings:
        """Defaults, overridden by ``EDGESHIP_FLEET_*`` in ``env`` (default ``os.environ``), overridden by ``args``.

        ``args`` holds field names (``None`` values are ignored, so an argparse namespace's ``vars()`` can be
        passed as it is) plus ``broker`` (``host:port`` or ``mqtt[s]://...``, see ``parse_broker``).

        Raises:
            InputError: a value of the wrong type, or invalid (every problem in one message).
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = _convert(name, fields[name].type, raw, ENV_PREFIX + name.upper())
        broker = env.get(ENV_PREFIX + "BROKER")
        for source in ({"broker": broker}, dict(args or {})):
            if source.get("broker"):
                values["broker_host"], values["broker_port"], tls = parse_broker(str(source["broker"]))
                values["broker_tls"] = values.get("broker_tls", False) or tls
        for name, value in (args or {}).items():
            if name in fields and value is not None:
                values[name] = _convert(name, fields[name].type, value, f"--{name.replace('_', '-')}")
        if str(values.get("share_group", "")).lower() in ("none", "off"):
            values["share_group"] = None  # one fleet process, or a broker without shared subscriptions
        return cls(**values)


def _convert(name: str, annotation: Any, value: Any, source: str) -> Any:
    """``value`` (a string from the environment, or a parsed flag) as the field's type."""
    kind = str(annotation)
    try:
        if "tuple[Path" in kind:
            items = value.split(os.pathsep) if isinstance(value, str) else list(value)
            return tuple(Path(p) for p in items if str(p))
        if "Path" in kind:
            return Path(value)
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError) as e:
        raise InputError(f"{source}: bad value {value!r} for {name}: {e}") from e
