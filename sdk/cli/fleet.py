"""``edgeship fleet ...`` and ``edgeship rollout ...``: run the fleet server, manage tokens, call its API.

Three kinds of commands, by what they touch:

- ``fleet serve`` runs the server in the foreground (``fleet.server.serve``);
- ``fleet token create|list|revoke`` work on the database directly (``--db`` or the state folder), because
  the first token cannot be made over an API that refuses anonymous writes;
- everything else is an HTTP client of ``/api/v1`` (``--server``/``EDGESHIP_FLEET_URL``,
  ``--token``/``EDGESHIP_FLEET_TOKEN``); the rendering of each resource is in ``sdk.cli.fleet_views``.

The fleet libraries are imported inside the commands: ``edgeship package`` on a build host without the
``fleet`` extra never loads them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from sdk.cli import fleet_views as views
from sdk.cli.fleet_client import FleetClient
from sdk.cli.tables import print_table
from sdk.errors import EdgeshipError, InputError, TransportError

__all__ = ["add_parsers", "follow_rollout"]


def _seg(value: int | str) -> str:
    """A path segment, percent-encoded (a device id may hold characters a URL path does not)."""
    return quote(str(value), safe="")


def _client(args: argparse.Namespace) -> FleetClient:
    return FleetClient(args.server, args.token)


def _emit(args: argparse.Namespace, data: Any, lines: list[str]) -> int:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print("\n".join(lines))
    return 0


# ---- serve and tokens (local) ------------------------------------------------------------------
def _settings(args: argparse.Namespace) -> Any:
    from fleet.settings import FleetSettings

    return FleetSettings.from_env_and_args({
        "db_url": args.db, "state_dir": args.state_dir,
        **{k: getattr(args, k, None) for k in ("http_host", "http_port", "broker", "fleet", "trusted_keys",
                                               "artifact_base_url", "broker_username", "broker_password_file",
                                               "broker_protocol", "share_group", "broker_ca_file",
                                               "broker_cert_file", "broker_key_file", "timestamp_key",
                                               "freshness_interval_s", "freshness_lifetime_s")},
    })  # fmt: skip


def _cmd_serve(args: argparse.Namespace) -> int:
    from fleet.server import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # one line per plugin, every start
    serve(_settings(args))
    print("edgeship fleet stopped", file=sys.stderr, flush=True)
    return 0


def _local_db(args: argparse.Namespace) -> Any:
    from fleet.db import Database
    from fleet.server import migrate_with_retry

    settings = _settings(args)
    if settings.db_url is None:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.database_url)
    migrate_with_retry(db, 10.0)
    return db


def _cmd_token_create(args: argparse.Namespace) -> int:
    from fleet.auth import create_token, verify_token

    db = _local_db(args)
    try:
        with db.session() as session:
            secret = create_token(session, args.name, args.scope)
            principal = verify_token(session, secret)
    finally:
        db.close()
    token_id = principal.token_id if principal else "?"
    print(f"token {token_id} {args.name!r} ({args.scope}): shown once, store it now", file=sys.stderr)
    print(secret)
    return 0


def _cmd_token_list(args: argparse.Namespace) -> int:
    from fleet.auth import list_tokens

    db = _local_db(args)
    try:
        with db.session() as session:
            rows = [[t.id, t.name, t.scope, time.strftime("%Y-%m-%d %H:%M", time.localtime(t.created_at)),
                     "revoked" if t.revoked_at is not None else "active"] for t in list_tokens(session)]  # fmt: skip
    finally:
        db.close()
    print_table(["id", "name", "scope", "created", "state"], rows)
    return 0


def _cmd_token_revoke(args: argparse.Namespace) -> int:
    from fleet.auth import revoke_token

    db = _local_db(args)
    try:
        with db.session() as session:
            found = revoke_token(session, args.id)
    finally:
        db.close()
    if not found:
        raise InputError(f"no token with id {args.id} (see `edgeship fleet token list`)")
    print(f"token {args.id} revoked")
    return 0


# ---- devices -----------------------------------------------------------------------------------
def _cmd_devices(args: argparse.Namespace) -> int:
    online = True if args.online else False if args.offline else None
    with _client(args) as client:
        data = client.get("/devices", selector=args.selector, online=online)
    return _emit(args, data, views.devices_table(data))


def _cmd_device(args: argparse.Namespace) -> int:
    """The device with its last deployments (``/events`` gives them, read from the device's events)."""
    with _client(args) as client:
        data = client.get(f"/devices/{_seg(args.id)}")
        data["deployments"] = client.get(f"/devices/{_seg(args.id)}/events", limit=200).get("deployments", [])
    return _emit(args, data, views.device_lines(data))


def _parse_tags(pairs: list[str]) -> dict[str, str]:
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"a tag is KEY=VALUE, got {pair!r}")
        tags[key.strip()] = value.strip()
    return tags


def _cmd_tag(args: argparse.Namespace) -> int:
    """Merge KEY=VALUE into the device's tags and drop ``--remove`` keys: one PUT of the whole set (the API's
    PUT replaces it), so a refused request changes nothing; removing a tag the device lacks is an error."""
    tags = _parse_tags(args.tags)
    if not tags and not args.remove:
        raise InputError("give KEY=VALUE tags to set and/or --remove KEY")
    device = f"/devices/{_seg(args.id)}"
    with _client(args) as client:
        current = client.get(device).get("tags") or {}
        missing = [k for k in args.remove if k not in current]
        if missing:
            raise InputError(f"device {args.id!r} has no tag {', '.join(map(repr, missing))}")
        merged = {**{k: v for k, v in current.items() if k not in args.remove}, **tags}
        data = client.put(f"{device}/tags", {"tags": merged})
    return _emit(args, data, [f"{args.id}: {views._tags(data)}"])


# ---- bundles and releases ----------------------------------------------------------------------
def _cmd_releases(args: argparse.Namespace) -> int:
    """Every release, with the targets/precisions it is offered in (one detail request per release)."""
    with _client(args) as client:
        data = client.get("/releases", name=args.name)
        for release in views.items(data):
            detail = client.get(f"/releases/{_seg(release['name'])}/{release['version']}")
            release["targets"] = detail.get("targets", {})
    return _emit(args, data, views.releases_table(data))


def _cmd_upload(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise InputError(f"no such bundle file: {path}")
    with _client(args) as client:
        data = client.upload("/bundles", path)
    return _emit(args, data, ["uploaded " + path.name, *views.bundle_lines(data)])


# ---- rollouts ----------------------------------------------------------------------------------
def follow_rollout(
    client: FleetClient, rollout_id: int | str, *, out: TextIO | None = None, interval_s: float = 1.0,
    tty: bool | None = None, outage_s: float = 60.0,
) -> dict[str, Any]:  # fmt: skip
    """Show a rollout until it is completed, aborted, failed or paused; return its last state.

    On a terminal the display is redrawn in place every ``interval_s``; otherwise one plain line is printed
    per change (logs, CI). A server that stops answering (restarting) is waited for up to ``outage_s``.
    """
    out = out or sys.stdout
    tty = out.isatty() if tty is None else tty
    drawn, last, unreachable_since = 0, "", None
    while True:
        try:
            r = client.get(f"/rollouts/{_seg(rollout_id)}")
            unreachable_since = None
        except TransportError as e:
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > outage_s:
                raise
            print(f"({e}; retrying)", file=sys.stderr, flush=True)
            time.sleep(interval_s)
            continue
        if tty:
            lines = views.rollout_lines(r)
            out.write((f"\x1b[{drawn}F\x1b[J" if drawn else "") + "\n".join(lines) + "\n")
            drawn = len(lines)
        elif (line := views.rollout_summary(r)) != last:
            out.write(line + "\n")
            last = line
        out.flush()
        if r.get("state") in views.TERMINAL_STATES or r.get("state") == "paused":
            return dict(r)
        time.sleep(interval_s)


def _follow(client: FleetClient, rollout_id: int | str, interval_s: float) -> int:
    try:
        return _end_of_follow(follow_rollout(client, rollout_id, interval_s=interval_s))
    except KeyboardInterrupt:
        print(f"stopped following rollout {rollout_id}; it goes on on the server", file=sys.stderr)
        return 130


def _end_of_follow(r: dict[str, Any]) -> int:
    """Exit 0 only for a completed rollout, so ``rollout create --follow`` can gate a pipeline."""
    if r.get("state") == "completed":
        return 0
    reason = r.get("paused_reason") or r.get("reason") or "see `edgeship rollout status`"
    raise EdgeshipError(f"rollout {r.get('id')} is {r.get('state')}: {reason}")


def _cmd_rollout_create(args: argparse.Namespace) -> int:
    body = {"release": args.release, "devices": args.devices, "waves": args.waves, "soak": args.soak,
            "gates": args.gate, "rate_per_s": args.rate, "wave_timeout": args.wave_timeout,
            "resend": args.resend, "baseline": args.baseline}  # fmt: skip
    with _client(args) as client:
        data = client.post("/rollouts", {k: v for k, v in body.items() if v is not None})
        if not args.follow:
            return _emit(args, data, views.rollout_lines(data))
        print(f"rollout {data.get('id')} created", flush=True)
        return _follow(client, data["id"], args.interval)


def _cmd_rollout_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.follow:
            return _follow(client, args.id, args.interval)
        data = client.get(f"/rollouts/{_seg(args.id)}")
    return _emit(args, data, views.rollout_lines(data))


def _cmd_rollout_action(args: argparse.Namespace) -> int:
    with _client(args) as client:
        data = client.post(f"/rollouts/{_seg(args.id)}/{args.action}")
    if isinstance(data, dict) and data:
        return _emit(args, data, views.rollout_lines(data))
    print(f"rollout {args.id}: {args.action} requested")
    return 0


def _cmd_rollout_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        data = client.get("/rollouts", state=args.state)
    return _emit(args, data, views.rollouts_table(data))


def _cmd_rollout_audit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        data = client.get(f"/rollouts/{args.id}/audit", limit=args.limit)
    return _emit(args, data, views.audit_table(data))


# ---- parsers -----------------------------------------------------------------------------------
def _connection() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--server", help="fleet server URL (default: $EDGESHIP_FLEET_URL or http://127.0.0.1:8800)")
    p.add_argument("--token", help="API token (default: $EDGESHIP_FLEET_TOKEN)")
    p.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    return p


def _database() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--db", metavar="URL", help="database URL (default: $EDGESHIP_FLEET_DB_URL or sqlite in the state folder)"
    )
    p.add_argument(
        "--state-dir", type=Path, metavar="DIR", help="state folder (default: ~/.local/state/edgeship/fleet)"
    )
    return p


def _add_fleet(sub: Any) -> None:
    conn, database = _connection(), _database()
    fleet = sub.add_parser("fleet", help="the fleet server: serve, tokens, devices, releases, uploads")
    cmds = fleet.add_subparsers(dest="fleet_command", required=True)

    sv = cmds.add_parser("serve", parents=[database], help="run the fleet server in the foreground")
    sv.add_argument("--host", dest="http_host", metavar="ADDR", help="address to listen on (default 127.0.0.1)")
    sv.add_argument(
        "--port", dest="http_port", type=int, metavar="PORT", help="HTTP port (default 8800; 0 picks a free one)"
    )
    sv.add_argument(
        "--broker", metavar="URL", help="MQTT broker host[:port] or mqtts://host:port (default 127.0.0.1:1883)"
    )
    sv.add_argument("--broker-username", metavar="USER", help="MQTT username")
    sv.add_argument("--broker-password-file", type=Path, metavar="FILE", help="file holding the MQTT password")
    sv.add_argument("--broker-protocol", choices=["5", "3.1.1"], help="MQTT version (3.1.1: embedded broker)")
    sv.add_argument("--broker-ca-file", type=Path, metavar="FILE",
                    help="CA file a TLS broker is verified with (default: the system's CAs)")  # fmt: skip
    sv.add_argument("--broker-cert-file", type=Path, metavar="FILE", help="client certificate, for mutual TLS")
    sv.add_argument("--broker-key-file", type=Path, metavar="FILE", help="its private key (with --broker-cert-file)")
    sv.add_argument(
        "--share-group",
        metavar="GROUP",
        help="shared-subscription group of the ingest, or none (default edgeship-fleet)",
    )
    sv.add_argument("--fleet", metavar="NAME", help="fleet name: the <fleet> topic segment (default: default)")
    sv.add_argument("--trust", dest="trusted_keys", action="append", type=Path, metavar="FILE",
                    help="public key uploads must be signed with (repeatable), or one signed root.json")  # fmt: skip
    sv.add_argument("--artifact-base-url", metavar="URL", help="where devices download bundles (default: this server)")
    sv.add_argument("--timestamp-key", type=Path, metavar="KEY",
                    help="sign and publish fleet freshness with this key (the root's timestamp role)")  # fmt: skip
    sv.add_argument("--freshness-interval", dest="freshness_interval_s", type=float, metavar="S",
                    help="seconds between freshness documents (default 3600)")  # fmt: skip
    sv.add_argument("--freshness-lifetime", dest="freshness_lifetime_s", type=float, metavar="S",
                    help="seconds each freshness document is valid (default 86400)")  # fmt: skip
    sv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sv.set_defaults(func=_cmd_serve)

    token = cmds.add_parser("token", help="API tokens (works on the database directly)")
    tcmds = token.add_subparsers(dest="token_command", required=True)
    tc = tcmds.add_parser("create", parents=[database], help="create a token and print its secret once")
    tc.add_argument("--name", required=True, help="who or what uses it, e.g. ci or alice")
    tc.add_argument("--scope", required=True, choices=["read", "write"])
    tc.set_defaults(func=_cmd_token_create)
    tcmds.add_parser("list", parents=[database], help="list tokens (never their secrets)").set_defaults(
        func=_cmd_token_list
    )
    tr = tcmds.add_parser("revoke", parents=[database], help="revoke a token by id")
    tr.add_argument("id", type=int)
    tr.set_defaults(func=_cmd_token_revoke)

    dv = cmds.add_parser("devices", parents=[conn], help="list devices")
    dv.add_argument("--selector", help="tag=KEY=VALUE, group=NAME, id=A,B or all")
    state = dv.add_mutually_exclusive_group()
    state.add_argument("--online", action="store_true", help="only online devices")
    state.add_argument("--offline", action="store_true", help="only offline devices")
    dv.set_defaults(func=_cmd_devices)
    d1 = cmds.add_parser("device", parents=[conn], help="one device: state, tags, capabilities, history")
    d1.add_argument("id")
    d1.set_defaults(func=_cmd_device)
    tg = cmds.add_parser("tag", parents=[conn], help="set (KEY=VALUE) and remove (--remove KEY) a device's tags")
    tg.add_argument("id")
    tg.add_argument("tags", nargs="*", metavar="KEY=VALUE")
    tg.add_argument("--remove", action="append", default=[], metavar="KEY", help="tag to remove (repeatable)")
    tg.set_defaults(func=_cmd_tag)
    rl = cmds.add_parser("releases", parents=[conn], help="list releases: bundles, targets and precisions")
    rl.add_argument("--name", help="only the releases of this model name")
    rl.set_defaults(func=_cmd_releases)
    up = cmds.add_parser("upload", parents=[conn], help="upload a signed .edgebundle (verified by the server)")
    up.add_argument("file")
    up.set_defaults(func=_cmd_upload)


def _add_rollout(sub: Any) -> None:
    conn = _connection()
    follow = argparse.ArgumentParser(add_help=False)
    follow.add_argument("--follow", action="store_true", help="show progress until completed, paused or ended")
    follow.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    rollout = sub.add_parser("rollout", help="staged rollouts of a release to devices")
    cmds = rollout.add_subparsers(dest="rollout_command", required=True)

    cr = cmds.add_parser("create", parents=[conn, follow], help="start a rollout wave by wave, with gates")
    cr.add_argument("--release", required=True, metavar="NAME:VERSION")
    cr.add_argument("--devices", required=True, metavar="SELECTOR", help="tag=KEY=VALUE, group=NAME, id=A,B or all")
    cr.add_argument("--waves", default="1,10%,50%,100%", help="cumulative wave sizes (default 1,10%%,50%%,100%%)")
    cr.add_argument("--soak", default="5m", help="time every gate must hold before the next wave (default 5m)")
    gates = "e.g. error_rate<=1%%, p95_latency<=1.2x, silence=5m (repeatable; default and implied: health_failures=0)"
    cr.add_argument("--gate", action="append", metavar="GATE", help=gates)
    cr.add_argument("--rate", type=float, help="deploy commands per second (default 10)")
    cr.add_argument(
        "--wave-timeout",
        metavar="DURATION",
        help="a device not active this long after its deploy counts as failed (default 30m)",
    )
    cr.add_argument("--resend", metavar="DURATION", help="resend a command no event answered after this long, "
                    "same id (default: the server's command_resend_s, 60s)")  # fmt: skip
    cr.add_argument("--baseline", metavar="DURATION",
                    help="window before each wave whose telemetry is the latency baseline (default 1h)")  # fmt: skip
    cr.set_defaults(func=_cmd_rollout_create)
    st = cmds.add_parser("status", parents=[conn, follow], help="waves, device counts and gates of a rollout")
    st.add_argument("id", type=int)
    st.set_defaults(func=_cmd_rollout_status)
    for action, text in (("pause", "stop sending deploys"), ("resume", "continue a paused rollout"),
                         ("abort", "end a rollout for good")):  # fmt: skip
        ac = cmds.add_parser(action, parents=[conn], help=text)
        ac.add_argument("id", type=int)
        ac.set_defaults(func=_cmd_rollout_action, action=action)
    ls = cmds.add_parser("list", parents=[conn], help="every rollout, newest first")
    ls.add_argument("--state", choices=["pending", "running", "paused", "completed", "aborted", "failed"])
    ls.set_defaults(func=_cmd_rollout_list)
    au = cmds.add_parser("audit", parents=[conn], help="every decision of a rollout with its reason")
    au.add_argument("id", type=int)
    au.add_argument("--limit", type=int, default=500, help="at most this many entries (default 500)")
    au.set_defaults(func=_cmd_rollout_audit)


def add_parsers(sub: Any) -> None:
    """Register ``fleet`` and ``rollout`` on the ``edgeship`` parser's subcommands."""
    _add_fleet(sub)
    _add_rollout(sub)
