"""The device's freshness store (device_runtime/agent/freshness.py): grace, staleness edges, persistence
and the drop on a timestamp-key rotation, without a broker."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_runtime.agent.freshness import FRESHNESS_FILE, FreshnessStore
from device_runtime.errors import StateError
from sdk.errors import FreshnessError
from sdk.freshness import make_freshness, sign_freshness
from sdk.trustroot import TrustRoot, make_root

T0 = datetime(2026, 6, 1, tzinfo=timezone.utc)
KEY = Ed25519PrivateKey.generate()


def _root(*timestamp: Ed25519PrivateKey) -> TrustRoot:
    return make_root(version=1, expires="2099-01-01T00:00:00Z", root_keys=[KEY.public_key()],
                     bundle_keys=[KEY.public_key()], timestamp_keys=[k.public_key() for k in timestamp])  # fmt: skip


def _doc(version: int, key: Ed25519PrivateKey, issued: datetime = T0, hours: int = 24) -> dict[str, Any]:
    return json.loads(sign_freshness(make_freshness(version, issued, timedelta(hours=hours)), [key]))


def test_missing_then_stale_after_the_grace_and_edges_reported_once(tmp_path: Path) -> None:
    ts = Ed25519PrivateKey.generate()
    root = _root(ts)
    store = FreshnessStore(tmp_path, root, T0, grace_s=600)
    assert store.state(root, T0)["state"] == "missing"  # type: ignore[index]
    assert store.transition(root, T0) is None
    late = T0 + timedelta(seconds=601)
    stale = store.transition(root, late)
    assert stale is not None and stale["state"] == "stale" and stale["stale_since"] == "2026-06-01T00:10:00Z"
    assert store.transition(root, late) is None  # reported once
    fresh, new = store.accept(_doc(3, ts, issued=late), root, late)
    assert new and fresh.version == 3
    back = store.transition(root, late)
    assert back is not None and back["state"] == "fresh" and back["version"] == 3
    again, new = store.accept(_doc(3, ts, issued=late), root, late + timedelta(days=2))  # the retained one, expired
    assert not new and again == fresh
    assert store.state(root, late + timedelta(days=2))["stale_since"] == fresh.expires  # type: ignore[index]
    assert FreshnessStore(tmp_path, root, T0, grace_s=600).state(_root(), T0) is None  # no role: no state


def test_the_floor_persists_and_a_rotated_key_drops_it(tmp_path: Path) -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    root = _root(old)
    FreshnessStore(tmp_path, root, T0, 60).accept(_doc(10, old), root, T0)
    reopened = FreshnessStore(tmp_path, root, T0, 60)
    assert reopened.current is not None and reopened.current.version == 10
    with pytest.raises(FreshnessError, match="replay"):
        reopened.accept(_doc(9, old), root, T0)
    rotated = _root(new)
    reopened.root_changed(rotated)
    assert reopened.current is None and not (tmp_path / FRESHNESS_FILE).exists()
    assert reopened.accept(_doc(1, new), rotated, T0)[0].version == 1  # the new key starts where it likes


def test_a_bad_file_costs_only_the_floor_and_a_failed_write_keeps_the_old_one(tmp_path: Path) -> None:
    ts = Ed25519PrivateKey.generate()
    root = _root(ts)
    (tmp_path / FRESHNESS_FILE).write_bytes(b"{garbage")
    store = FreshnessStore(tmp_path, root, T0, 60)
    assert store.current is None
    store.accept(_doc(1, ts), root, T0)
    (tmp_path / FRESHNESS_FILE).unlink()
    (tmp_path / FRESHNESS_FILE).mkdir()  # the file cannot be replaced
    with pytest.raises(StateError):
        store.accept(_doc(2, ts), root, T0)
    assert store.current is not None and store.current.version == 1
