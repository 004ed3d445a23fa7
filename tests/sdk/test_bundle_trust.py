"""Signatures, thresholds, expiry and rollback, all through ``read_bundle``."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from bundlekit import NOW, canonical, read_members, resigned, write_archive, write_valid_bundle

from sdk.bundle import inspect_bundle, read_bundle
from sdk.errors import ExpiredError, RollbackError, SignatureError, UnsafeArchiveError
from sdk.manifest import format_time
from sdk.signing import TrustedKeys, key_id, sign_manifest


def _with_signatures(bundle: Path, tmp_path: Path, signatures: bytes) -> Path:
    members = read_members(bundle)
    members[1].data = signatures
    return write_archive(tmp_path / "b.edgebundle", members)


def test_manifest_edited_after_signing(bundle: Path, tmp_path: Path, keys, refused) -> None:
    members = read_members(bundle)
    d = json.loads(members[0].data)
    d["version"] = 99
    members[0].data = canonical(d)
    refused(SignatureError, write_archive(tmp_path / "b.edgebundle", members))


def test_manifest_reformatted_after_signing(bundle: Path, tmp_path: Path, refused) -> None:
    # Same JSON value, different bytes: signatures cover the exact bytes.
    members = read_members(bundle)
    members[0].data = json.dumps(json.loads(members[0].data), indent=1).encode()
    refused(SignatureError, write_archive(tmp_path / "b.edgebundle", members))


def test_signed_by_untrusted_key(bundle: Path, tmp_path: Path, keys, refused) -> None:
    refused(SignatureError, write_archive(tmp_path / "b.edgebundle", resigned(bundle, [keys.stranger])))


def test_untrusted_signature_under_trusted_keyid(bundle: Path, tmp_path: Path, keys, refused) -> None:
    manifest = read_members(bundle)[0].data
    forged = [{"keyid": key_id(keys.signer.public_key()), "sig": keys.stranger.sign(manifest).hex()}]
    refused(SignatureError, _with_signatures(bundle, tmp_path, json.dumps(forged).encode()))


def test_signature_without_domain_prefix_is_refused(bundle: Path, tmp_path: Path, keys, refused) -> None:
    # The trusted key's own signature over the bare manifest bytes (no "edgeship-manifest-v1" prefix),
    # as it might have signed the same JSON for another purpose, must not count.
    manifest = read_members(bundle)[0].data
    bare = [{"keyid": key_id(keys.signer.public_key()), "sig": keys.signer.sign(manifest).hex()}]
    refused(SignatureError, _with_signatures(bundle, tmp_path, json.dumps(bare).encode()))


@pytest.mark.parametrize(
    "signatures",
    [
        b"[]",
        b"",
        b"{}",
        b'{"keyid": "00", "sig": "00"}',
        b"[1]",
        b'[{"keyid": "00"}]',
        b'[{"keyid": "00", "sig": "00", "extra": 1}]',
        b'[{"keyid": 1, "sig": "00"}]',
        b'[{"keyid": "00", "sig": "00", "keyid": "00"}]',
        b"\xff\xfe",
        b"[NaN]",
        b"null",
    ],
    ids=[
        "empty-list",
        "empty-file",
        "object",
        "one-object",
        "number",
        "missing-sig",
        "extra-key",
        "keyid-int",
        "duplicate-key",
        "not-utf8",
        "nan",
        "null",
    ],
)
def test_malformed_signatures_json(bundle: Path, tmp_path: Path, refused, signatures: bytes) -> None:
    refused(SignatureError, _with_signatures(bundle, tmp_path, signatures))


@pytest.mark.parametrize("bad_sig", ["zz" * 64, "", "00" * 64, "abc"], ids=["non-hex", "empty", "zeros", "odd"])
def test_bad_signature_value(bundle: Path, tmp_path: Path, keys, refused, bad_sig: str) -> None:
    entry = {"keyid": key_id(keys.signer.public_key()), "sig": bad_sig}
    refused(SignatureError, _with_signatures(bundle, tmp_path, json.dumps([entry]).encode()))


def test_missing_signatures_member(bundle: Path, tmp_path: Path, refused) -> None:
    members = read_members(bundle)
    del members[1]
    refused(UnsafeArchiveError, write_archive(tmp_path / "b.edgebundle", members))


def _two_key_trust(keys) -> TrustedKeys:
    return TrustedKeys((keys.signer.public_key(), keys.second.public_key()), threshold=2)


def test_below_threshold(bundle: Path, keys, refused) -> None:
    info = refused(SignatureError, bundle, trust=_two_key_trust(keys))
    assert "1 valid signature" in str(info.value)


def test_same_key_twice_counts_once(bundle: Path, tmp_path: Path, keys, refused) -> None:
    sigs = json.loads(read_members(bundle)[1].data)
    assert len(sigs) == 1
    path = _with_signatures(bundle, tmp_path, json.dumps(sigs * 2).encode())
    refused(SignatureError, path, trust=_two_key_trust(keys))


def test_untrusted_key_does_not_count_toward_threshold(bundle: Path, tmp_path: Path, keys, refused) -> None:
    path = write_archive(tmp_path / "b.edgebundle", resigned(bundle, [keys.signer, keys.stranger]))
    refused(SignatureError, path, trust=_two_key_trust(keys))


def test_threshold_met_by_two_keys(tmp_path: Path, keys, site) -> None:
    path = tmp_path / "b.edgebundle"
    write_valid_bundle(path, [keys.signer, keys.second])
    verified = read_bundle(path, _two_key_trust(keys), site.dest, now=NOW)
    assert sorted(verified.keyids) == sorted(key_id(k.public_key()) for k in (keys.signer, keys.second))


def test_extra_garbage_and_untrusted_entries_ignored_when_threshold_met(bundle: Path, tmp_path, keys, site) -> None:
    manifest = read_members(bundle)[0].data
    sigs = json.loads(sign_manifest(manifest, [keys.signer, keys.stranger]))
    sigs.append({"keyid": "ab" * 32, "sig": "not hex"})
    verified = read_bundle(
        _with_signatures(bundle, tmp_path, json.dumps(sigs).encode()), keys.trust, site.dest, now=NOW
    )
    assert verified.keyids == (key_id(keys.signer.public_key()),)


# ---- expiry and rollback -------------------------------------------------------------------------
@pytest.fixture
def expiring(tmp_path: Path, keys) -> Path:
    path = tmp_path / "exp.edgebundle"
    write_valid_bundle(path, [keys.signer], expires=format_time(NOW + timedelta(days=30)))
    return path


@pytest.mark.parametrize("later", [timedelta(days=30), timedelta(days=30, seconds=1), timedelta(days=400)])
def test_expired(expiring: Path, refused, later: timedelta) -> None:
    refused(ExpiredError, expiring, now=NOW + later)


def test_not_yet_expired(expiring: Path, keys, site) -> None:
    verified = read_bundle(expiring, keys.trust, site.dest, now=NOW + timedelta(days=30, seconds=-1))
    assert verified.manifest.expires == format_time(NOW + timedelta(days=30))


def test_expiry_checked_only_after_signature(expiring: Path, tmp_path: Path, keys, refused) -> None:
    path = write_archive(tmp_path / "b.edgebundle", resigned(expiring, [keys.stranger]))
    refused(SignatureError, path, now=NOW + timedelta(days=400))


def test_rollback_refused(bundle: Path, refused) -> None:  # the bundle is version 5
    info = refused(RollbackError, bundle, installed_version=6)
    assert "v5" in str(info.value) and "v6" in str(info.value)


def test_rollback_floor_looked_up_by_the_verified_name(bundle: Path, keys, site, refused) -> None:
    name = inspect_bundle(bundle)[0].name  # the bundle is version 5
    asked: list[str] = []

    def floor(of: str) -> int | None:
        asked.append(of)
        return {name: 6}.get(of)

    refused(RollbackError, bundle, installed_version=floor)
    assert asked == [name]
    assert read_bundle(bundle, keys.trust, site.dest, now=NOW, installed_version=lambda _: 5).manifest.version == 5


def test_rollback_allowed_explicitly(bundle: Path, keys, site) -> None:
    verified = read_bundle(bundle, keys.trust, site.dest, now=NOW, installed_version=6, allow_downgrade=True)
    assert verified.manifest.version == 5


@pytest.mark.parametrize("installed", [None, 0, 4, 5])
def test_same_or_newer_version_allowed(bundle: Path, keys, site, installed: int | None) -> None:
    assert read_bundle(bundle, keys.trust, site.dest, now=NOW, installed_version=installed).manifest.version == 5
