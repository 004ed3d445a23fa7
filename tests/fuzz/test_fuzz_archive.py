"""The archive reader: a valid bundle mutated (bytes changed, cut, inserted, gzipped) is read cleanly or
refused with a ``BundleError``, within a time and memory bound, and leaves nothing behind."""

from __future__ import annotations

import gzip
import shutil
import tempfile
from pathlib import Path

from bundlekit import NOW, write_valid_bundle
from conftest import bound, budget
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from sdk.bundle import ReadLimits, read_bundle
from sdk.errors import BundleError
from sdk.signing import TrustedKeys

KEY = Ed25519PrivateKey.generate()
TRUST = TrustedKeys((KEY.public_key(),))
LIMITS = ReadLimits(max_total_bytes=1 << 20, max_member_bytes=1 << 20)  # a mangled size stays cheap
_FOLDER = Path(tempfile.mkdtemp(prefix="edgeship-fuzz-archive-"))
write_valid_bundle(_FOLDER / "good.edgebundle", [KEY])
GOOD = (_FOLDER / "good.edgebundle").read_bytes()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = gzip.compress(GOOD, mtime=0) if draw(st.booleans()) and draw(st.integers(0, 3)) == 0 else GOOD
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["byte", "truncate", "insert", "delete", "splice"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "byte":
            data = data[:pos] + bytes([draw(st.integers(0, 255))]) + data[pos + 1 :]
        elif kind == "truncate":
            data = data[:pos]
        elif kind == "insert":
            data = data[:pos] + draw(st.binary(min_size=1, max_size=600)) + data[pos:]
        elif kind == "delete":
            data = data[:pos] + data[pos + draw(st.integers(1, 600)) :]
        else:  # a 512-byte block repeated: a member header twice, a duplicate member
            block = pos - pos % 512
            data = data[: block + 512] + data[block : block + 512] + data[block + 512 :]
    return data


def _read(data: bytes) -> None:
    work = Path(tempfile.mkdtemp(prefix="case-", dir=_FOLDER))
    try:
        (work / "b.edgebundle").write_bytes(data)
        with bound(seconds=5.0, megabytes=32.0):
            try:
                read_bundle(work / "b.edgebundle", TRUST, work / "out", now=NOW, limits=LIMITS)
            except BundleError:
                assert not (work / "out").exists()  # a refusal leaves no destination
                leftovers = [p.name for p in work.iterdir() if p.name != "b.edgebundle"]
                assert leftovers == [], leftovers  # nor a staging folder
    finally:
        shutil.rmtree(work, ignore_errors=True)


@budget(150)
@given(mutated())
def test_mutated_bundle(data: bytes) -> None:
    _read(data)


@budget(50)
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    _read(data)
