"""Helpers for the bundle-kernel tests: a valid signed bundle, and hand-made hostile archives.

``write_valid_bundle`` goes through ``sdk.bundle.write_bundle``. Everything else builds tar files
member by member with ``tarfile`` (or raw 512-byte blocks), so tests can order, name, type and
size members freely and re-sign an edited manifest with any key.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sdk.bundle import write_bundle
from sdk.manifest import Manifest, TensorSpec, format_time
from sdk.signing import sign_manifest

NOW = datetime(2026, 1, 31, 12, 0, 0, tzinfo=timezone.utc)
MTIME = int(NOW.timestamp())


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def default_members() -> dict[str, bytes]:
    """A model, golden input/output arrays and a tokenizer file; all differ in size."""
    rng = np.random.default_rng(7)
    return {
        "model.onnx": bytes(rng.integers(0, 256, 3000, dtype=np.uint8)),
        "golden/input_0.npy": npy_bytes(rng.standard_normal((1, 4), dtype=np.float32)),
        "golden/output_0.npy": npy_bytes(rng.standard_normal((1, 2), dtype=np.float32)),
        "tokenizer/vocab.txt": b"[PAD]\n[UNK]\nhello\nworld\n",
    }


def draft_manifest(**overrides: Any) -> Manifest:
    """A manifest without files, as a packager builds it before hashing."""
    fields: dict[str, Any] = {
        "name": "digits",
        "version": 5,
        "label": "2026.01-rc1",
        "target": "onnxruntime",
        "precision": "fp32",
        "model": "model.onnx",
        "task": "image-classification",
        "inputs": (TensorSpec("input", "float32", ("batch", 4)),),
        "outputs": (TensorSpec("logits", "float32", ("batch", 2)),),
        "runtime": {
            "package": "onnxruntime",
            "min_version": "1.17",
            "arch": ["x86_64", "aarch64"],
            "providers": ["CPUExecutionProvider"],
        },
        "preprocessing": {"tokenizer": {"files": ["tokenizer/vocab.txt"], "max_length": 16}},
        "validation": {
            "reference": "torch",
            "samples": 8,
            "metrics": {"max_abs": 1e-6, "cosine": 1.0},
            "tolerances": {"atol": 1e-4, "rtol": 1e-3},
            "passed": True,
            "accepted_drift": False,
        },
        "golden": {
            "inputs": {"input": "golden/input_0.npy"},
            "outputs": {"logits": "golden/output_0.npy"},
            "tolerance": {"atol": 1e-4, "rtol": 1e-3, "min_cosine": 0.999},
        },
        "created": format_time(NOW),
        "expires": None,
    }
    fields.update(overrides)
    return Manifest(**fields)


def write_valid_bundle(
    path: Path,
    keys: Sequence[Ed25519PrivateKey],
    members: dict[str, bytes] | None = None,
    **overrides: Any,
) -> Manifest:
    return write_bundle(path, draft_manifest(**overrides), members or default_members(), keys)


# ---- hand-made archives --------------------------------------------------------------------------
@dataclass
class Member:
    """One archive member as a test wants it, whatever tar or the bundle rules say."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    pax: dict[str, str] = field(default_factory=dict)

    def tarinfo(self) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self.name)
        info.type = self.type
        info.size = len(self.data) if self.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
        info.linkname = self.linkname
        info.mode = 0o644
        info.mtime = MTIME
        info.pax_headers = dict(self.pax)
        return info


def archive_bytes(members: Iterable[Member], compress: bool = False) -> bytes:
    """A pax tar (optionally gzip) holding ``members`` in the given order, names untouched."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = m.tarinfo()
            tar.addfile(info, io.BytesIO(m.data) if info.size else None)
    data = buf.getvalue()
    return gzip.compress(data, mtime=0) if compress else data


def write_archive(path: Path, members: Iterable[Member], compress: bool = False) -> Path:
    path.write_bytes(archive_bytes(members, compress))
    return path


def read_members(path: Path) -> list[Member]:
    """The members of a (trusted, test-made) bundle, in archive order."""
    out = []
    with tarfile.open(path, "r:*") as tar:
        for info in tar:
            f = tar.extractfile(info)
            out.append(Member(info.name, f.read() if f else b"", info.type, info.linkname))
    return out


def manifest_dict(path: Path) -> dict[str, Any]:
    return json.loads(read_members(path)[0].data)


def header(manifest_bytes: bytes, keys: Sequence[Ed25519PrivateKey]) -> list[Member]:
    """manifest.json and signatures.json members, the manifest signed by ``keys`` as given."""
    return [Member("manifest.json", manifest_bytes), Member("signatures.json", sign_manifest(manifest_bytes, keys))]


def canonical(d: dict[str, Any]) -> bytes:
    try:
        return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate: write it as a JSON escape, as an attacker would
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def resigned(
    path: Path,
    keys: Sequence[Ed25519PrivateKey],
    edit: Any = None,
    raw: bytes | None = None,
    extra: Sequence[Member] = (),
) -> list[Member]:
    """Members of the bundle at ``path`` with its manifest edited (``edit(dict)`` or ``raw``) and re-signed."""
    members = read_members(path)
    d = copy.deepcopy(json.loads(members[0].data))
    if edit is not None:
        edit(d)
    manifest_bytes = raw if raw is not None else canonical(d)
    return [*header(manifest_bytes, keys), *members[2:], *extra]


def file_entry(path: str, data: bytes) -> dict[str, Any]:
    return {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Archive member name -> (offset of its data, size) in an uncompressed bundle."""
    with tarfile.open(path, "r:") as tar:
        return {info.name: (info.offset_data, info.size) for info in tar}


# ---- raw 512-byte blocks, for headers tarfile will not write ------------------------------------
def raw_header(name: str, size: int, typeflag: bytes = tarfile.REGTYPE) -> bytearray:
    """A ustar header block; ``size`` may be anything, even negative (base-256)."""
    info = tarfile.TarInfo(name)
    info.type = typeflag
    info.mtime = MTIME
    block = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    if size >= 0:
        block[124:136] = b"%011o\0" % size
    else:  # GNU base-256: first byte 0xff, two's complement
        block[124:136] = b"\xff" + (size % 256**11).to_bytes(11, "big")
    return fix_checksum(block)


def fix_checksum(block: bytearray) -> bytearray:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return block


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def pax_block(records: dict[str, str], typeflag: bytes = tarfile.XHDTYPE) -> bytes:
    data = b"".join(pax_record(k, v) for k, v in records.items())
    return bytes(raw_header("././@PaxHeader", len(data), typeflag)) + padded(data)


def file_blocks(name: str, data: bytes) -> bytes:
    return bytes(raw_header(name, len(data))) + padded(data)


END_OF_ARCHIVE = b"\0" * 1024
