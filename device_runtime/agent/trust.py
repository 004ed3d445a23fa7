"""The device's trust root on disk (``STATE_DIR/root.json``) and the one way it changes.

Which root the agent starts with, first match wins:

1. ``root.json`` in the state directory: the last root it accepted. It outranks the flags, so a key that
   a newer root revoked stays revoked across restarts, whatever ``--trust`` says.
2. ``--trust-root FILE`` (``AgentConfig.trust_root``), accepted when a threshold of its own root keys
   signed it (it comes with the device's image, as ``--trust`` does). With a stored root, the file is
   applied as an update when its version is higher (TUF's rule), else ignored.
3. ``--trust PUB ... --threshold N``: an implicit root of version 0 (not written to disk), whose keys can
   sign the first real root.

A new root (the ``trust`` command) replaces the current one only by ``sdk.trustroot.update_root``: signed
by a threshold of the current root keys and of its own, a higher version, not expired. It is written
atomically before it is used; a refused one changes nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from device_runtime.errors import StateError
from sdk.errors import EdgeshipError, TrustRootError
from sdk.fsutil import atomic_write_bytes
from sdk.manifest import canonical_json
from sdk.signing import TrustedKeys
from sdk.trustroot import TrustRoot, load_root, update_root

__all__ = ["ROOT_FILE", "TrustStore"]

log = logging.getLogger(__name__)

ROOT_FILE = "root.json"
_MAX_ROOT_FILE = 64 * 2**10  # bytes


def _read(path: Path) -> bytes:
    try:
        if path.stat().st_size > _MAX_ROOT_FILE:
            raise TrustRootError(f"{path} is larger than a root document may be")
        return path.read_bytes()
    except OSError as e:
        raise TrustRootError(f"cannot read {path}: {e.strerror or e}") from e


class TrustStore:
    """The current root of one state directory; ``update`` is the only change (thread-safe).

    Args:
        state_dir: the agent's folder.
        trust: the ``--trust`` keys (the implicit root), or None.
        trust_root: the ``--trust-root`` file, or None.
        now: the device's clock (UTC) at start.

    Raises:
        StateError: ``root.json`` is there but unreadable or invalid (the agent does not fall back to
            the flags: that could trust a revoked key again), or no root at all was given.
        TrustRootError: the ``--trust-root`` file is not a valid root.
    """

    def __init__(self, state_dir: Path, trust: TrustedKeys | None, trust_root: Path | None, now: datetime) -> None:
        self._path = state_dir / ROOT_FILE
        self._lock = threading.Lock()
        stored: TrustRoot | None = None
        if self._path.exists():
            try:
                stored = load_root(_read(self._path), now=None)  # an expired root is kept and reported
            except EdgeshipError as e:
                raise StateError(f"{self._path} is not a valid trust root ({e}); restore it or remove it") from e
        if trust_root is not None:
            document = _read(trust_root)
            if stored is None:
                stored = load_root(document, now=now)
                self._write(document)
            else:
                try:
                    newer = load_root(document, now=None)
                    if newer.version > stored.version:
                        stored = update_root(stored, document, now=now)
                        self._write(document)
                        log.info("trust root v%d from %s applied", stored.version, trust_root)
                except TrustRootError as e:
                    log.error("the trust root %s is not applied (%s); keeping v%d", trust_root, e, stored.version)
        if stored is None:
            if trust is None:
                raise StateError("no trust root: give --trust-root FILE or --trust PUB")
            stored = TrustRoot.implicit(trust)
        elif trust is not None:
            log.info("trust root v%d in %s outranks the --trust keys", stored.version, self._path)
        self._root = stored

    @property
    def root(self) -> TrustRoot:
        return self._root

    def update(self, document: Mapping[str, Any], now: datetime) -> TrustRoot:
        """Replace the root with ``document`` if it follows the current one (written before it is used).

        Raises:
            TrustRootError: refused (the current root stays).
            StateError: it could not be written (the current root stays).
        """
        with self._lock:
            root = update_root(self._root, document, now=now)
            self._write(canonical_json(document))
            self._root = root
            return root

    def _write(self, data: bytes) -> None:
        try:
            atomic_write_bytes(self._path, data)
        except OSError as e:
            raise StateError(f"cannot write {self._path}: {e.strerror or e}") from e
