"""``edgeship keys root create|sign|rotate``: make, co-sign and rotate a trust root (sdk/trustroot.py).

    edgeship keys root create --root-key PUB ... --bundle-key PUB ... [--root-threshold N] [--threshold N]
                              [--timestamp-key PUB ... [--timestamp-threshold N]]
                              [--expires-days D] [--pin NAME ...] [--downgrade NAME=VERSION ...]
                              [--version V] --sign KEY ... [--passphrase-file F] --out FILE
    edgeship keys root sign   FILE --sign KEY ... [--passphrase-file F]    (adds signatures, in place)
    edgeship keys root rotate --current FILE [the create options] --sign OLD.key --sign NEW.key --out FILE

``rotate`` makes version current+1 and checks it against the current root as a device will: signed by a
threshold of the current root keys and of its own. Short of signatures, it says what is missing (add
them with ``sign``, on the machines that hold the other keys). An encrypted ``--sign`` key is decrypted
with ``--passphrase-file`` or ``$EDGESHIP_KEY_PASSPHRASE`` (one passphrase for every key of a command).
"""

from __future__ import annotations

import argparse
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sdk.cli.keys import add_passphrase_argument, load_signers
from sdk.errors import InputError, TrustRootError
from sdk.manifest import format_time
from sdk.signing import load_public_key
from sdk.trustroot import TrustRoot, add_signatures, load_root, make_root, sign_root, update_root

__all__ = ["add_parser"]


def _root_from(args: argparse.Namespace, version: int) -> TrustRoot:
    downgrades: dict[str, int] = {}
    for item in args.downgrade or ():
        name, _, value = item.partition("=")
        if not name or not value.isdigit():
            raise InputError(f"--downgrade {item!r}: write NAME=VERSION")
        downgrades[name] = int(value)
    expires = format_time(datetime.now(timezone.utc) + timedelta(days=args.expires_days))
    return make_root(
        version=version, expires=expires,
        root_keys=[load_public_key(p) for p in args.root_key],
        bundle_keys=[load_public_key(p) for p in args.bundle_key],
        root_threshold=args.root_threshold, bundle_threshold=args.threshold,
        pins=args.pin or None, downgrades=downgrades,
        timestamp_keys=[load_public_key(p) for p in args.timestamp_key or ()],
        timestamp_threshold=args.timestamp_threshold,
    )  # fmt: skip


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from e


def _check(data: bytes, current: TrustRoot | None) -> str:
    now = datetime.now(timezone.utc)
    try:
        root = load_root(data, now=now) if current is None else update_root(current, data, now=now)
    except TrustRootError as e:
        return f"not yet valid: {e}; add signatures with `edgeship keys root sign`"
    return f"valid root v{root.version}, expires {root.expires}"


def _create(args: argparse.Namespace) -> int:
    data = sign_root(_root_from(args, args.version), load_signers(args.sign, args.passphrase_file))
    _write(args.out, data)
    print(f"{args.out}: {_check(data, None)}")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    current = load_root(args.current.read_bytes(), now=None)
    data = sign_root(_root_from(args, current.version + 1), load_signers(args.sign, args.passphrase_file))
    _write(args.out, data)
    print(f"{args.out}: {_check(data, current)}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    data = add_signatures(args.file.read_bytes(), load_signers(args.sign, args.passphrase_file))
    _write(args.file, data)
    print(f"{args.file}: {_check(data, None)}")
    return 0


def add_parser(keys: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``keys root ...`` under the ``keys`` subcommands."""
    root = keys.add_parser("root", help="trust roots: which keys sign bundles and roots").add_subparsers(
        dest="root_command", required=True
    )
    for name, func, helptext in (("create", _create, "a new root"), ("rotate", _rotate, "the next root")):
        p = root.add_parser(name, help=helptext)
        if name == "rotate":
            p.add_argument("--current", required=True, type=Path, help="the root devices hold now")
        else:
            p.add_argument("--version", type=int, default=1, help="root version (default 1)")
        p.add_argument("--root-key", required=True, action="append", type=Path, metavar="PUB")
        p.add_argument("--bundle-key", required=True, action="append", type=Path, metavar="PUB")
        p.add_argument("--root-threshold", type=int, default=1, metavar="N")
        p.add_argument("--threshold", type=int, default=1, metavar="N", help="bundle signatures needed")
        p.add_argument("--timestamp-key", action="append", type=Path, metavar="PUB",
                       help="a key signing fleet freshness (the timestamp role; repeatable)")  # fmt: skip
        p.add_argument("--timestamp-threshold", type=int, default=1, metavar="N", help="freshness signatures needed")
        p.add_argument("--expires-days", type=float, default=365.0, metavar="D")
        p.add_argument("--pin", action="append", metavar="NAME", help="a model name devices may run")
        p.add_argument("--downgrade", action="append", metavar="NAME=VERSION", help="allow below the floor")
        p.add_argument("--sign", required=True, action="append", type=Path, metavar="KEY")
        add_passphrase_argument(p, "the passphrase of encrypted --sign keys")
        p.add_argument("--out", required=True, type=Path)
        p.set_defaults(func=func)
    s = root.add_parser("sign", help="add signatures to a root document")
    s.add_argument("file", type=Path)
    s.add_argument("--sign", required=True, action="append", type=Path, metavar="KEY")
    add_passphrase_argument(s, "the passphrase of encrypted --sign keys")
    s.set_defaults(func=_sign)
