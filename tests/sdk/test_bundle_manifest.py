"""Signed but malformed manifests: signatures pass, so the manifest's own checks must refuse them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bundlekit import NOW, canonical, file_entry, read_members, resigned, write_archive

from sdk.bundle import inspect_bundle, read_bundle
from sdk.errors import ManifestError


def _raw(bundle: Path) -> bytes:
    return read_members(bundle)[0].data


def _set(key: str, value: Any) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        d[key] = value

    return edit


def _tensor(**changes: Any) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        d["inputs"][0].update(changes)

    return edit


def _file_path(path: str) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        d["files"][-1]["path"] = path

    return edit


def _add_file(path: str, data: bytes = b"") -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        d["files"].append(file_entry(path, data))

    return edit


def _drop(key: str) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        del d[key]

    return edit


EDITS: dict[str, Callable[[dict], None]] = {
    "unknown-field": _set("signed_by", "me"),
    "missing-name": _drop("name"),
    "missing-version": _drop("version"),
    "missing-inputs": _drop("inputs"),
    "missing-created": _drop("created"),
    "missing-model": _drop("model"),
    "name-empty": _set("name", ""),
    "name-slash": _set("name", "a/b"),
    "name-dotdot": _set("name", ".."),
    "name-int": _set("name", 7),
    "name-trailing-newline": _set("name", "abc\n"),
    "version-negative": _set("version", -1),
    "version-string": _set("version", "5"),
    "version-float": _set("version", 5.0),
    "version-bool": _set("version", True),
    "version-huge": _set("version", 2**64),
    "target": _set("target", "tensorrt"),
    "precision": _set("precision", "int3"),
    "schema-future": _set("schema", 2),
    "schema-zero": _set("schema", 0),
    "created-format": _set("created", "2026-01-31 12:00:00"),
    "expires-format": _set("expires", "tomorrow"),
    "label-int": _set("label", 3),
    "runtime-list": _set("runtime", []),
    "golden-inputs-list": _set("golden", {"inputs": ["golden/input_0.npy"]}),
    "golden-path-int": _set("golden", {"inputs": {"input": 3}}),
    "golden-unlisted": _set("golden", {"inputs": {"input": "golden/nope.npy"}}),
    "dtype": _tensor(dtype="float128"),
    "dtype-object": _tensor(dtype="object"),
    "shape-negative": _tensor(shape=[-1, 4]),
    "shape-float": _tensor(shape=[1.5, 4]),
    "shape-bad-name": _tensor(shape=["batch size", 4]),
    "shape-name-trailing-newline": _tensor(shape=["batch\n", 4]),
    "shape-string": _tensor(shape="NCHW"),
    "shape-int": _tensor(shape=4),
    "shape-null": _tensor(shape=None),
    "tensor-extra-key": _tensor(layout="NCHW"),
    "inputs-empty": _set("inputs", []),
    "inputs-object": _set("inputs", {"name": "input", "dtype": "float32", "shape": [1]}),
    "inputs-duplicate": lambda d: d["inputs"].append(dict(d["inputs"][0])),
    "model-unlisted": _set("model", "other.onnx"),
    "model-traversal": _set("model", "../model.onnx"),
    "files-empty": _set("files", []),
    "files-object": _set("files", {}),
    "file-sha-upper": lambda d: d["files"][0].update(sha256=d["files"][0]["sha256"].upper()),
    "file-sha-trailing-newline": lambda d: d["files"][0].update(sha256=d["files"][0]["sha256"] + "\n"),
    "file-size-negative": lambda d: d["files"][0].update(size=-1),
    "file-extra-key": lambda d: d["files"][0].update(mode=420),
    "path-dotdot": _file_path("../x"),
    "path-absolute": _file_path("/etc/passwd"),
    "path-inner-dotdot": _file_path("a/../../x"),
    "path-dot": _file_path("./x"),
    "path-backslash": _file_path("a\\b"),
    "path-drive": _file_path("C:x"),
    "path-nul": _file_path("a\0b"),
    "path-empty-part": _file_path("a//b"),
    "path-trailing-slash": _file_path("a/"),
    "path-reserved": _file_path("manifest.json"),
    "path-too-long": _file_path("a" * 256),
    "path-surrogate": _file_path("a\udcffb"),
    "path-duplicate": lambda d: d["files"].append(dict(d["files"][0])),
    "path-case-clash": _add_file("MODEL.onnx"),
    "path-unicode-form-clash": lambda d: (
        d["files"].append(file_entry("caf\u00e9", b"")),
        d["files"].append(file_entry("cafe\u0301", b"")),
    ),
    "path-file-and-folder": _add_file("model.onnx/inner"),
    "path-folder-of-golden": _add_file("golden"),
    "runtime-surrogate": _set("runtime", {"package": "\ud800"}),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_signed_bad_manifest(bundle: Path, tmp_path: Path, keys, refused, case: str) -> None:
    members = resigned(bundle, [keys.signer], EDITS[case])
    refused(ManifestError, write_archive(tmp_path / "b.edgebundle", members))


def _raw_cases(raw: bytes) -> dict[str, bytes]:
    assert raw.startswith(b'{"created":')
    return {
        "duplicate-key": b'{"name":"evil",' + raw[1:],  # "name" appears twice; parsers disagree on which wins
        "duplicate-nested-key": raw.replace(b'"package":"onnxruntime"', b'"package":"a","package":"b"', 1),
        "nan": raw.replace(b'"samples":8', b'"samples":NaN', 1),
        "infinity": raw.replace(b'"samples":8', b'"samples":-Infinity', 1),
        "huge-float": raw.replace(b'"samples":8', b'"samples":1e999', 1),
        "invalid-utf8": raw.replace(b'"digits"', b'"digits\xff"', 1),
        "utf8-bom": b"\xef\xbb\xbf" + raw,
        "utf16": raw.decode().encode("utf-16"),
        "escaped-surrogate": raw.replace(b'"2026.01-rc1"', b'"\\ud800"', 1),
        "truncated": raw[:-1],
        "trailing-garbage": raw + b"x",
        "list": b"[" + raw + b"]",
        "empty": b"",
        "deep-nesting": raw.replace(b'"samples":8', b'"samples":' + b"[" * 100_000 + b"]" * 100_000, 1),
    }


RAW_CASES = [
    "deep-nesting",
    "duplicate-key",
    "duplicate-nested-key",
    "empty",
    "escaped-surrogate",
    "huge-float",
    "infinity",
    "invalid-utf8",
    "list",
    "nan",
    "trailing-garbage",
    "truncated",
    "utf16",
    "utf8-bom",
]


@pytest.mark.parametrize("case", RAW_CASES)
def test_signed_bad_manifest_bytes(bundle: Path, tmp_path: Path, keys, refused, case: str) -> None:
    cases = _raw_cases(_raw(bundle))
    assert sorted(cases) == RAW_CASES
    raw = cases[case]
    assert raw != _raw(bundle)
    members = resigned(bundle, [keys.signer], raw=raw)
    refused(ManifestError, write_archive(tmp_path / "b.edgebundle", members))


@pytest.mark.parametrize("case", ["duplicate-key", "escaped-surrogate", "nan", "invalid-utf8"])
def test_inspect_refuses_bad_manifest_too(bundle: Path, tmp_path: Path, keys, case: str) -> None:
    members = resigned(bundle, [keys.stranger], raw=_raw_cases(_raw(bundle))[case])
    with pytest.raises(ManifestError):
        inspect_bundle(write_archive(tmp_path / "b.edgebundle", members))


def test_valid_edit_still_reads(bundle: Path, tmp_path: Path, keys, site) -> None:
    """Control: the editing machinery itself does not break a manifest."""
    members = resigned(bundle, [keys.signer], _set("label", "re-signed"))
    verified = read_bundle(write_archive(tmp_path / "b.edgebundle", members), keys.trust, site.dest, now=NOW)
    assert verified.manifest.label == "re-signed"
    assert canonical(verified.manifest.to_dict()) == members[0].data
