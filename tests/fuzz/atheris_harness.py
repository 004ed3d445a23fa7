"""Coverage-guided fuzzing with atheris (libFuzzer) of the parsers hypothesis mutates blindly: the archive
reader (``read_bundle``), the serving body decoders (``.npy`` / ``.npz``), and the trust documents (roots,
signed freshness). Not a test (no ``test_`` prefix): run by hand, it is not in the CI budget.

    pip install --target /tmp/atheris atheris==3.0.0      # a wheel; not a dependency of edgeship
    PYTHONPATH=$PWD:/tmp/atheris python tests/fuzz/atheris_harness.py archive -max_total_time=120
    (targets: archive, npy, npz, trust; libFuzzer flags after the target: -runs=N, -max_total_time=S, ...)

The property is the suite's: a typed error or a result, nothing else. Another exception is a crash:
atheris prints the input that caused it (and libFuzzer writes it as ``crash-<sha1>``). The corpus starts
from one valid input, so the fuzzer grows coverage from real structure (tar headers, zip directories,
signed JSON) instead of random bytes. docs/reliability.md ("Fuzzing") has the runs so far.
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sdk"))  # bundlekit

with atheris.instrument_imports(include=["sdk", "device_runtime", "tarfile", "gzip", "zipfile", "json"]):
    import numpy as np
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_runtime.serve import _HTTPError, _read_npy, _read_npz
    from sdk.bundle import ReadLimits, read_bundle
    from sdk.errors import BundleError, FreshnessError, TrustRootError
    from sdk.freshness import verify_freshness
    from sdk.signing import TrustedKeys
    from sdk.trustroot import load_root

KEY = Ed25519PrivateKey.generate()
TRUST = TrustedKeys((KEY.public_key(),))
LIMITS = ReadLimits(max_total_bytes=1 << 20, max_member_bytes=1 << 20)
WORK = Path(tempfile.mkdtemp(prefix="edgeship-atheris-"))


def _archive(data: bytes) -> None:
    from bundlekit import NOW

    work = Path(tempfile.mkdtemp(dir=WORK))
    try:
        (work / "b.edgebundle").write_bytes(data)
        try:
            read_bundle(work / "b.edgebundle", TRUST, work / "out", now=NOW, limits=LIMITS)
        except BundleError:
            assert not (work / "out").exists(), "a refusal left its destination"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _npy(data: bytes) -> None:
    try:
        _read_npy(data, "body")
    except _HTTPError as e:
        assert 400 <= e.status < 500, e.status


def _npz(data: bytes) -> None:
    try:
        _read_npz(data, 1 << 20)
    except _HTTPError as e:
        assert 400 <= e.status < 500, e.status


def _trust(data: bytes) -> None:
    from datetime import datetime, timezone

    from sdk.trustroot import make_root

    now = datetime(2026, 6, 1, tzinfo=timezone.utc)
    try:
        load_root(data, now=now)
    except TrustRootError:
        pass
    root = make_root(version=1, expires="2099-01-01T00:00:00Z", root_keys=[KEY.public_key()],
                     bundle_keys=[KEY.public_key()], timestamp_keys=[KEY.public_key()])  # fmt: skip
    try:
        verify_freshness(data, root, now=now, current=None)
    except FreshnessError:
        pass


def _seed(target: str) -> bytes:
    if target == "archive":
        from bundlekit import write_valid_bundle

        write_valid_bundle(WORK / "seed.edgebundle", [KEY])
        return (WORK / "seed.edgebundle").read_bytes()
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = io.BytesIO()
    if target == "npz":
        np.savez_compressed(out, x=array)
    elif target == "npy":
        np.save(out, array)
    else:
        from datetime import datetime, timedelta, timezone

        from sdk.freshness import make_freshness, sign_freshness

        return sign_freshness(make_freshness(1, datetime(2026, 6, 1, tzinfo=timezone.utc), timedelta(days=1)), [KEY])
    return out.getvalue()


TARGETS: dict[str, Callable[[bytes], None]] = {"archive": _archive, "npy": _npy, "npz": _npz, "trust": _trust}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: atheris_harness.py {{{','.join(TARGETS)}}} [libFuzzer flags]")
    target = sys.argv[1]
    corpus = WORK / "corpus"
    corpus.mkdir()
    (corpus / "seed").write_bytes(_seed(target))
    atheris.Setup([sys.argv[0], *sys.argv[2:], str(corpus)], TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
