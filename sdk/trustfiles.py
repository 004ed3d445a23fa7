"""What a ``--trust`` flag names: public key files, or one signed trust root (``root.json``).

Every command that verifies bundles (``edgeship predict``, ``edgeship bundle verify``, ``edgeship-device
predict|health|serve|run``, ``edgeship fleet serve``) takes ``--trust FILE`` and tells the two kinds apart
by their content: a PEM public key (``-----BEGIN PUBLIC KEY-----``), or a JSON root document, verified on
its own signatures (``sdk.trustroot.load_root``: a threshold of its root keys, unexpired), whose
``bundles`` role then gives the keys and the threshold. A root goes alone: its threshold is the one that
counts, so it is not mixed with loose keys or a ``--threshold``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from sdk.errors import KeyFileError, TrustRootError
from sdk.signing import TrustedKeys, load_public_key
from sdk.trustroot import MAX_ROOT_BYTES, TrustRoot, load_root

__all__ = ["is_root_file", "load_root_file", "load_trust"]


def is_root_file(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` holds a JSON document (a trust root), not a PEM key.

    Raises:
        KeyFileError: it cannot be read.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise KeyFileError(f"cannot read {path}: {e.strerror or e}") from e
    return head.lstrip().startswith(b"{")


def load_root_file(path: str | os.PathLike[str], now: datetime | None = None) -> TrustRoot:
    """A signed root from a file, valid on its own signatures and unexpired at ``now`` (default: now).

    Raises:
        TrustRootError: unreadable, too large, malformed, below its own threshold, or expired.
    """
    p = Path(path)
    try:
        if p.stat().st_size > MAX_ROOT_BYTES:
            raise TrustRootError(f"{p} is larger than a root document may be ({MAX_ROOT_BYTES} bytes)")
        data = p.read_bytes()
    except OSError as e:
        raise TrustRootError(f"cannot read {p}: {e.strerror or e}") from e
    try:
        return load_root(data, now=now or datetime.now(timezone.utc))
    except TrustRootError as e:
        raise TrustRootError(f"{p}: {e}") from e


def load_trust(
    paths: Sequence[str | os.PathLike[str]], threshold: int | None = None, *, now: datetime | None = None
) -> TrustedKeys:
    """The keys (and threshold) bundles must be signed with, from ``--trust`` files.

    Args:
        paths: PEM public key files, or exactly one signed root document.
        threshold: signatures needed with key files (default 1); must be None with a root.
        now: the time a root's expiry is checked at (default: now).

    Raises:
        KeyFileError: no file, an unreadable or invalid key file, a root mixed with other files or given
            a threshold, or a threshold the keys cannot meet.
        TrustRootError: the root is invalid or expired.
    """
    if not paths:
        raise KeyFileError("no --trust file given: name public key files or one signed trust root")
    roots = [p for p in paths if is_root_file(p)]
    if roots:
        if len(paths) > 1:
            raise KeyFileError(f"the trust root {roots[0]} goes alone: its bundle keys and threshold decide")
        if threshold is not None:
            raise KeyFileError(f"--threshold does not go with the trust root {roots[0]}: the root sets it")
        return load_root_file(roots[0], now).bundle_keys()
    return TrustedKeys(tuple(load_public_key(p) for p in paths), 1 if threshold is None else threshold)
