"""``AgentConfig``: everything an ``Agent`` needs, tuning values with their units."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from device_runtime.agent.mqtt import MqttSettings
from device_runtime.agent.ota import Limits
from sdk.signing import TrustedKeys

__all__ = ["AgentConfig"]


@dataclass(frozen=True)
class AgentConfig:
    """Everything an ``Agent`` needs; tuning values carry their units.

    Attributes:
        state_dir: the agent's folder (created if missing).
        mqtt: broker address, identity and TLS.
        trust: public keys (and threshold) bundles must be signed with: the implicit trust root (version
            0), used until a signed root is installed (``trust_root`` or a ``trust`` command; see
            ``device_runtime.agent.trust``). None: ``trust_root`` must be given.
        trust_root: a signed root document (``root.json``) to start from, when the state directory holds
            none (or an older one).
        initial_bundle: installed into slot A when no slot is active yet (a factory image).
        telemetry_interval_s: seconds between telemetry messages (a ``config`` command may change it).
        max_bundle_bytes: the download cap when a deploy command gives no ``size``.
        download_deadline_s: a whole download, retries included, must finish within this.
        download_read_timeout_s: the longest silence tolerated on the connection (also the connect timeout).
        download_attempts: tries in a row without progress before a download fails.
        download_reserve_bytes: free space a download must leave on the state directory's file system
            (checked against the announced size before any byte is written).
        allow_hosts: host names, IP addresses or CIDR networks a deploy URL (and each redirect) may reach
            besides public addresses; the broker's host (and its addresses) is always allowed.
        public_hosts: also allow hosts whose every address is public; False: only ``allow_hosts`` and
            the broker's host.
        health_timeout_s: a trial health check that has not returned by then fails (the check "hangs").
        health_latency_budget_ms: the golden run must take at most this, unless the bundle's
            ``golden.latency_budget_ms`` says otherwise.
        check_slots_on_start: re-hash the active slot's files at start (catches on-disk corruption).
        limits: how often an interrupted deployment is resumed before it is abandoned.
        max_queued_commands: deploys and rollbacks waiting behind the one running; more are refused with
            a ``failed`` event (``QueueFull``).
        max_command_age_s: a command issued longer ago than this (``issued_at``, device clock) is refused;
            finished ids are remembered this long (at most ``max_remembered_commands`` of them).
        max_remembered_commands: finished command ids kept for de-duplication.
        require_issued_at: refuse commands without ``issued_at`` (older fleets do not send it).
        outbox_max_messages: telemetry and events kept while the broker is unreachable.
        freshness_grace_s: with a root that has a ``timestamp`` role, how long after start the agent may go
            without any signed freshness before it reports itself stale (``device_runtime.agent.freshness``).
        intra_op_threads: threads inside one operator (None: the runtime's choice).
        providers: execution providers to use instead of the bundle's.
        serve: also serve the active model over HTTP (``device_runtime.serve.ModelServer``: predict,
            model, healthz, metrics) to local callers; OTA swaps happen under it without failing a request.
        serve_host: address the HTTP server binds (loopback: this machine only).
        serve_port: its TCP port (0 picks a free one; read ``Agent.server.port``).
        serve_header_timeout_s: seconds a connection may take to send its request head (``ModelServer``).
        serve_token: the HTTP API's bearer token (needed to bind beyond loopback).
        serve_allow_hosts: host names its Host header may carry besides addresses and ``localhost``.
        serve_insecure_no_auth: bind beyond loopback without a token.
        staging_process: download, verify and install new bundles in a helper process
            (``device_runtime.agent.staging``), away from the serving process's GIL; False: on the agent's
            OTA thread (also the fallback when the helper cannot be started).
        link_process: run the MQTT link and the outbox in their own process (``device_runtime.agent.linkproc``),
            away from the serving process's GIL; False: on the agent's threads.
        runtimes: use only the runtimes of these bundle targets (``onnxruntime``, ``openvino``, ...): they
            alone are reported in the capabilities (the fleet chooses bundles by them) and a bundle of
            another target is refused; None: every runtime installed.
    """

    state_dir: Path
    mqtt: MqttSettings
    trust: TrustedKeys | None
    trust_root: Path | None = None
    initial_bundle: Path | None = None
    telemetry_interval_s: float = 10.0  # seconds
    max_bundle_bytes: int = 2 * 2**30  # bytes
    download_deadline_s: float = 600.0  # seconds
    download_read_timeout_s: float = 30.0  # seconds
    download_attempts: int = 5
    download_reserve_bytes: int = 64 * 2**20  # bytes
    allow_hosts: tuple[str, ...] = ()
    public_hosts: bool = True
    health_timeout_s: float = 30.0  # seconds
    health_latency_budget_ms: float = 2000.0  # milliseconds
    check_slots_on_start: bool = True
    limits: Limits = field(default_factory=Limits)
    max_queued_commands: int = 16  # commands
    max_command_age_s: float = 7 * 86400.0  # seconds
    max_remembered_commands: int = 4096  # command ids
    require_issued_at: bool = False
    outbox_max_messages: int = 10_000  # messages
    freshness_grace_s: float = 3600.0  # seconds
    intra_op_threads: int | None = None
    providers: tuple[str, ...] | None = None
    serve: bool = False
    serve_host: str = "127.0.0.1"
    serve_port: int = 8080
    serve_header_timeout_s: float = 10.0  # seconds (device_runtime.serve.DEFAULT_HEADER_TIMEOUT_S)
    serve_token: str | None = field(default=None, repr=False)
    serve_allow_hosts: tuple[str, ...] = ()
    serve_insecure_no_auth: bool = False
    staging_process: bool = True
    link_process: bool = True
    runtimes: tuple[str, ...] | None = None  # bundle targets; None: every runtime installed
