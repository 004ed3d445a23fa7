"""``edgeship-device``: run a bundle on this device.

    edgeship-device predict --bundle FILE --trust PUB|ROOT [--trust PUB ...] (--input [NAME=]x.npy ... | --text T ... |
                            --image FILE ...) [--top-k K] [--state-dir DIR]
    edgeship-device health  --bundle FILE --trust PUB [--trust PUB ...] [--state-dir DIR]
    edgeship-device serve   --bundle FILE --trust PUB [--trust PUB ...] [--host 127.0.0.1] [--port N]
                            [--max-body-bytes N] [--max-connections N] [--header-timeout S] [--token-file F]
                            [--allow-host NAME ...]
                            [--insecure-no-auth] [--state-dir DIR]
    edgeship-device run     --state-dir DIR --broker mqtt://HOST:PORT --device-id ID [--fleet NAME]
                            (--trust PUB [--trust PUB ...] [--threshold N] | --trust-root FILE)
                            [--bundle FILE] [--telemetry-interval S]
                            [--tls-ca CA] [--tls-cert CERT --tls-key KEY] [--username U --password-file F]
                            [--serve [--serve-host 127.0.0.1] [--serve-port N] [--serve-header-timeout S]
                            [--serve-token-file F]
                            [--serve-allow-host NAME ...] [--serve-insecure-no-auth]]
                            [--allow-host HOST ...] [--only-allowed-hosts]

``--trust`` names public key files or one signed trust root (``root.json``, told apart by its content:
``sdk.trustfiles``); for ``run`` a root given there is taken as ``--trust-root``.

The HTTP API's token comes from the token file or ``EDGESHIP_SERVE_TOKEN``; binding beyond loopback
without one is refused unless ``--insecure-no-auth``. SIGINT (Ctrl-C) and SIGTERM stop ``serve`` and
``run`` cleanly (exit 0; ``run`` publishes its ``offline`` status).

Results go to stdout as JSON, in the shape ``edgeship predict`` and the HTTP API answer with
(``device_runtime.results``). An expected failure (any ``EdgeshipError``) prints one ``error: ...``
line to stderr and exits 1; bad usage exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from device_runtime.errors import HealthCheckError
from device_runtime.model import Model, load
from device_runtime.results import add_request_arguments, answer, model_info
from device_runtime.serve import DEFAULT_HEADER_TIMEOUT_S
from sdk.compat import RUNTIME_PACKAGES
from sdk.errors import EdgeshipError, InputError
from sdk.trustfiles import is_root_file, load_trust

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeship-device", description="Run edgeship bundles on this device.")
    sub = parser.add_subparsers(dest="command", required=True)

    def bundle_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--bundle", required=True, type=Path, help="the .edgebundle file")
        p.add_argument(
            "--trust",
            required=True,
            action="append",
            type=Path,
            metavar="FILE",
            help="a trusted public key file (repeat for several), or a signed trust root (root.json) alone",
        )
        p.add_argument("--state-dir", type=Path, help="install into this state directory (version history kept)")
        p.add_argument("--allow-downgrade", action="store_true", help="accept a version lower than installed")
        p.add_argument("--threads", type=int, help="intra-op threads (default: the runtime's choice)")

    predict = sub.add_parser("predict", help="run the model once on .npy inputs, text or images")
    bundle_args(predict)
    add_request_arguments(predict)
    health = sub.add_parser("health", help="run the bundle's golden health check")
    bundle_args(health)
    serve = sub.add_parser("serve", help="serve the model over a local HTTP API (predict, model, healthz, metrics)")
    bundle_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 picks a free one)")
    serve.add_argument(
        "--max-body-bytes", type=int, default=16 * 2**20, metavar="N", help="request body cap (default 16 MiB)"
    )
    serve.add_argument(
        "--max-connections", type=int, default=32, metavar="N", help="connections served at once (default 32)"
    )
    _header_timeout_arg(serve, "")
    _auth_args(serve, "")

    run = sub.add_parser("run", help="run the device agent: serve the model, talk to the fleet, apply updates")
    run.add_argument("--state-dir", required=True, type=Path, help="the agent's state directory")
    run.add_argument("--broker", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    run.add_argument("--device-id", required=True, help="this device's id (one MQTT topic segment)")
    run.add_argument("--fleet", default="default", help="fleet name (default: default)")
    run.add_argument(
        "--trust", action="append", type=Path, metavar="FILE",
        help="trusted public key (the implicit root, version 0); a signed root file here is --trust-root",
    )  # fmt: skip
    run.add_argument("--threshold", type=int, default=1, metavar="N", help="--trust signatures a bundle needs (1)")
    run.add_argument(
        "--trust-root",
        type=Path,
        metavar="FILE",
        help="signed trust root (root.json) when the state holds none or older",
    )
    run.add_argument("--bundle", type=Path, help="initial bundle, installed when no model is active yet")
    run.add_argument("--telemetry-interval", type=float, default=10.0, metavar="S", help="seconds (default 10)")
    run.add_argument("--tls-ca", help="CA file to verify the broker (turns TLS on)")
    run.add_argument("--tls-cert", help="client certificate (PEM)")
    run.add_argument("--tls-key", help="client certificate's private key (PEM)")
    run.add_argument("--username", help="MQTT user name")
    run.add_argument("--password-file", type=Path, help="file holding the MQTT password")
    run.add_argument("--threads", type=int, help="intra-op threads (default: the runtime's choice)")
    run.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    run.add_argument(
        "--serve", action="store_true", help="also serve the active model over the local HTTP API (as `serve`)"
    )
    run.add_argument(
        "--runtimes",
        metavar="TARGETS",
        help="use only these of the installed runtimes, by target, comma-separated (e.g. openvino); default: all",
    )
    run.add_argument("--serve-host", default="127.0.0.1", help="address the HTTP API binds (default 127.0.0.1)")
    run.add_argument("--serve-port", type=int, default=8080, help="its TCP port (default 8080; 0 picks a free one)")
    _header_timeout_arg(run, "serve-")
    _auth_args(run, "serve-")
    run.add_argument(
        "--allow-host", action="append", default=[], metavar="HOST",
        help="a host name, IP address or CIDR network deploy URLs may reach besides public addresses and the "
        "broker's host (repeatable; loopback, link-local and private addresses are refused otherwise)",
    )  # fmt: skip
    run.add_argument(
        "--only-allowed-hosts", action="store_true",
        help="deploy URLs may reach only --allow-host hosts and the broker's host, not any public address",
    )  # fmt: skip
    return parser


def _header_timeout_arg(parser: argparse.ArgumentParser, prefix: str) -> None:
    parser.add_argument(
        f"--{prefix}header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT_S, metavar="S",
        help="seconds a connection may take to send its request line and headers before it is closed "
        f"(default {DEFAULT_HEADER_TIMEOUT_S:g}; slow links may need more, exposed endpoints less)",
    )  # fmt: skip


def _check_header_timeout(value: float, flag: str) -> float:
    """Raises: InputError: not a positive number of seconds."""
    if not value > 0 or value == float("inf"):
        raise InputError(f"{flag} must be a positive number of seconds, got {value:g}")
    return value


def _auth_args(parser: argparse.ArgumentParser, prefix: str) -> None:
    parser.add_argument(
        f"--{prefix}token-file", type=Path, metavar="F",
        help="file holding the HTTP API's bearer token (default: $EDGESHIP_SERVE_TOKEN); needed beyond loopback",
    )  # fmt: skip
    parser.add_argument(
        f"--{prefix}allow-host", action="append", default=[], metavar="NAME",
        help="a host name clients may use in the Host header besides addresses and localhost (repeat; * any)",
    )  # fmt: skip
    parser.add_argument(
        f"--{prefix}insecure-no-auth", action="store_true", help="serve beyond loopback without a token"
    )


def _serve_token(path: Path | None) -> str | None:
    """The token from ``path``, else ``$EDGESHIP_SERVE_TOKEN``, else None.

    Raises:
        InputError: the file cannot be read or is empty.
    """
    if path is None:
        return os.environ.get("EDGESHIP_SERVE_TOKEN") or None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise InputError(f"cannot read the token file {path}: {e.strerror or e}") from e
    if not token:
        raise InputError(f"the token file {path} is empty")
    return token


def _load(args: argparse.Namespace) -> Model:
    return load(
        args.bundle,
        load_trust(args.trust),  # key files, or one signed root (sdk.trustfiles)
        state_dir=args.state_dir,
        allow_downgrade=args.allow_downgrade,
        intra_op_threads=args.threads,
    )


def _predict(args: argparse.Namespace) -> int:
    with _load(args) as model:
        result, _ = answer(model, args)
    print(json.dumps(result, indent=2, allow_nan=False))
    return 0


def _health(args: argparse.Namespace) -> int:
    with _load(args) as model:
        try:
            metrics = model.health_check()
        except HealthCheckError as e:
            print(json.dumps({"model": model_info(model), **e.metrics}, indent=2))
            raise
        print(json.dumps({"model": model_info(model), **metrics}, indent=2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from device_runtime.serve import ModelServer, check_exposure

    token = _serve_token(args.token_file)
    _check_header_timeout(args.header_timeout, "--header-timeout")
    try:
        check_exposure(args.host, token, args.insecure_no_auth)  # before the bundle is loaded
    except ValueError as e:
        raise InputError(str(e)) from e
    with _load(args) as model:
        try:
            server = ModelServer(
                model, args.host, args.port, max_body_bytes=args.max_body_bytes,
                max_connections=args.max_connections, header_timeout_s=args.header_timeout, token=token,
                allow_hosts=args.allow_host, insecure_no_auth=args.insecure_no_auth,
            )  # fmt: skip
        except ValueError as e:
            raise InputError(str(e)) from e
        server.start()
        stop = threading.Event()
        previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            print(json.dumps({"url": server.url, "model": model_info(model)}), flush=True)
            stop.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            server.stop()
    return 0


def _broker_address(url: str) -> tuple[str, int, bool]:
    """``mqtt://HOST:PORT`` -> (host, port, tls); ``mqtts://`` means TLS (default port 8883)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise InputError(f"--broker must look like mqtt://HOST:PORT or mqtts://HOST:PORT, got {url!r}")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as e:
        raise InputError(f"--broker {url!r}: {e}") from e
    return parts.hostname, port, tls


def _run(args: argparse.Namespace) -> int:
    # The one place the runtime reaches the agent subsystem, lazily: ``predict``/``serve`` and the runtime's
    # imports never load it (nor paho-mqtt, the ``device`` extra).
    from device_runtime.agent import Agent, AgentConfig
    from device_runtime.agent.mqtt import MqttSettings
    from device_runtime.serve import check_exposure
    from sdk.signing import TrustedKeys

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if not args.trust and args.trust_root is None:
        raise InputError("give --trust PUB (and --threshold N) or --trust-root FILE")
    if args.trust and any(is_root_file(p) for p in args.trust):  # --trust root.json: as --trust-root
        if len(args.trust) > 1 or args.trust_root is not None:
            raise InputError("a trust root given with --trust goes alone (or give it as --trust-root FILE)")
        args.trust_root, args.trust = args.trust[0], None
    host, port, tls = _broker_address(args.broker)
    if tls and not args.tls_ca:
        raise InputError("mqtts:// needs --tls-ca (the CA that signed the broker's certificate)")
    password = None
    if args.password_file is not None:
        try:
            password = args.password_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise InputError(f"cannot read --password-file {args.password_file}: {e.strerror or e}") from e
    try:
        settings = MqttSettings(
            host, port, args.device_id, fleet=args.fleet, ca_file=args.tls_ca, cert_file=args.tls_cert,
            key_file=args.tls_key, username=args.username, password=password,
        )  # fmt: skip
    except ValueError as e:
        raise InputError(str(e)) from e
    serve_token = _serve_token(args.serve_token_file) if args.serve else None
    if args.serve:
        _check_header_timeout(args.serve_header_timeout, "--serve-header-timeout")
        try:
            check_exposure(args.serve_host, serve_token, args.serve_insecure_no_auth)
        except ValueError as e:
            raise InputError(str(e).replace("--", "--serve-")) from e
    runtimes = None
    if args.runtimes is not None:
        runtimes = tuple(t.strip() for t in args.runtimes.split(",") if t.strip())
        known = sorted(set(RUNTIME_PACKAGES.values()))
        unknown = [t for t in runtimes if t not in known]
        if unknown or not runtimes:
            raise InputError(f"--runtimes {args.runtimes!r}: name targets among {', '.join(known)}")
    config = AgentConfig(
        state_dir=args.state_dir,
        mqtt=settings,
        trust=TrustedKeys.from_files(args.trust, args.threshold) if args.trust else None,
        trust_root=args.trust_root,
        initial_bundle=args.bundle,
        telemetry_interval_s=args.telemetry_interval,
        intra_op_threads=args.threads,
        serve=args.serve,
        serve_host=args.serve_host,
        serve_port=args.serve_port,
        serve_header_timeout_s=args.serve_header_timeout,
        serve_token=serve_token,
        serve_allow_hosts=tuple(args.serve_allow_host),
        serve_insecure_no_auth=args.serve_insecure_no_auth,
        runtimes=runtimes,
        allow_hosts=tuple(args.allow_host),
        public_hosts=not args.only_allowed_hosts,
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    agent = Agent(config)
    agent.start()
    logging.getLogger("edgeship-device").info(
        "agent %s running; serving %s", args.device_id, agent.active_model or "no model yet"
    )
    if agent.server is not None:  # like `serve`: one JSON line with the address, for scripts
        print(json.dumps({"url": agent.server.url, "model": agent.active_model}), flush=True)
    try:
        stop.wait()
    finally:
        agent.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``edgeship-device``; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse already printed usage (exit 2) or help (exit 0)
        return e.code if isinstance(e.code, int) else 2
    try:
        if args.command == "predict":
            return _predict(args)
        if args.command == "run":
            return _run(args)
        if args.command == "serve":
            return _serve(args)
        return _health(args)
    except EdgeshipError as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
