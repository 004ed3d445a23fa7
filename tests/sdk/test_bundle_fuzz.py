"""Seeded mutation fuzzing of a valid bundle: every mutation is refused cleanly or changes nothing."""

from __future__ import annotations

import gzip
import random
import shutil
import time
from pathlib import Path

import pytest
from bundlekit import NOW, default_members, member_offsets, write_valid_bundle

from sdk.bundle import ReadLimits, read_bundle
from sdk.errors import BundleError

MUTATIONS = 200  # per seed
LIMITS = ReadLimits(max_total_bytes=1 << 20, max_member_bytes=1 << 20)  # keeps a mangled size cheap


def _mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["flip", "flip", "byte", "truncate", "insert", "delete"])
    pos = rng.randrange(len(data))
    if kind == "flip":
        out = bytearray(data)
        out[pos] ^= 1 << rng.randrange(8)
        return f"flip@{pos}", bytes(out)
    if kind == "byte":
        out = bytearray(data)
        out[pos] = rng.randrange(256)
        return f"byte@{pos}", bytes(out)
    if kind == "truncate":
        return f"truncate@{pos}", data[:pos]
    if kind == "insert":
        return f"insert@{pos}", data[:pos] + rng.randbytes(rng.randint(1, 600)) + data[pos:]
    return f"delete@{pos}", data[:pos] + data[pos + rng.randint(1, 600) :]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("seed", "compress"), [(1, False), (2, False), (3, True)])
def test_mutations_refused_or_harmless(tmp_path: Path, keys, seed: int, compress: bool) -> None:
    original = tmp_path / "good.edgebundle"
    write_valid_bundle(original, [keys.signer])
    members = default_members()
    # Bias half the positions into the part that matters (headers and data), not the trailing padding.
    end = max(offset + size for offset, size in member_offsets(original).values())
    data = original.read_bytes()
    if compress:
        data = gzip.compress(data, mtime=0)
        end = len(data) - 8  # the CRC and length trailer
    rng = random.Random(seed)
    slots = tmp_path / "slots"
    slots.mkdir()
    outcomes: dict[str, int] = {}
    started = time.monotonic()
    for i in range(MUTATIONS):
        what, mutated = _mutate(data[:end] if i % 2 else data, rng)
        if i % 2:
            mutated += data[end:]
        path = tmp_path / "m.edgebundle"
        path.write_bytes(mutated)
        dest = slots / f"d{i}"
        t0 = time.monotonic()
        try:
            verified = read_bundle(path, keys.trust, dest, now=NOW, limits=LIMITS)
        except BundleError as e:
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
            assert not dest.exists(), what
        except Exception as e:  # any other type is the failure this test looks for
            pytest.fail(f"seed {seed} mutation {what} raised {type(e).__name__}: {e}")
        else:
            outcomes["accepted"] = outcomes.get("accepted", 0) + 1
            got = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
            assert got == members, f"seed {seed} mutation {what} changed the members"
            assert verified.manifest.files == tuple(sorted(verified.manifest.files, key=lambda f: f.path))
            shutil.rmtree(dest)
        assert time.monotonic() - t0 < 5, f"mutation {what} took too long"
        assert [p.name for p in slots.iterdir()] == [], f"{what} left {list(slots.iterdir())}"
    assert time.monotonic() - started < 20
    # The fuzzer must reach the interesting paths, not only "not a tar file".
    assert outcomes.get("IntegrityError", 0) + outcomes.get("SignatureError", 0) >= 10, outcomes


def test_gzip_header_cut_short_is_refused(tmp_path: Path, keys) -> None:
    # Found by tests/fuzz/test_fuzz_archive.py: tarfile raised TypeError (ord() of an empty read).
    path = tmp_path / "b.edgebundle"
    path.write_bytes(b"\x1f\x8b\x08")
    with pytest.raises(BundleError):
        read_bundle(path, keys.trust, tmp_path / "out", now=NOW)
