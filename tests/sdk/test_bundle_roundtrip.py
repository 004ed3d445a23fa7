"""What a valid bundle gives back, and the manifest's canonical form."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
from pathlib import Path

import pytest
from bundlekit import (
    NOW,
    canonical,
    default_members,
    draft_manifest,
    header,
    read_members,
    write_archive,
    write_valid_bundle,
)

from sdk.bundle import ReadLimits, bundle_filename, file_sha256, inspect_bundle, read_bundle, write_bundle
from sdk.errors import ManifestError
from sdk.manifest import FileEntry, Manifest, TensorSpec, canonical_json
from sdk.signing import key_id


def test_round_trip_preserves_members_and_manifest(tmp_path: Path, keys, site) -> None:
    path = tmp_path / "b.edgebundle"
    written = write_valid_bundle(path, [keys.signer])
    verified = read_bundle(path, keys.trust, site.dest, now=NOW)
    assert verified.manifest == written
    assert verified.root == site.dest
    members = default_members()
    on_disk = {str(p.relative_to(site.dest)): p.read_bytes() for p in site.dest.rglob("*") if p.is_file()}
    assert on_disk == members
    for name, data in members.items():
        assert verified.path(name).read_bytes() == data
        assert verified.manifest.file(name) == FileEntry(name, hashlib.sha256(data).hexdigest(), len(data))
    assert verified.keyids == (key_id(keys.signer.public_key()),)
    assert sorted(p.name for p in site.parent.iterdir()) == ["A", "B"]  # no staging folder left
    with pytest.raises(KeyError):
        verified.path("../A/model.onnx")


def test_archive_layout(bundle: Path) -> None:
    members = read_members(bundle)
    assert [m.name for m in members] == ["manifest.json", "signatures.json", *sorted(default_members())]
    manifest = Manifest.from_bytes(members[0].data)
    assert members[0].data == manifest.to_bytes()
    assert [e.path for e in manifest.files] == sorted(default_members())
    sigs = json.loads(members[1].data)
    assert list(sigs[0]) == ["keyid", "sig"] and len(bytes.fromhex(sigs[0]["sig"])) == 64


def test_sha256_is_of_the_file(bundle: Path, keys, site) -> None:
    verified = read_bundle(bundle, keys.trust, site.dest, now=NOW)
    assert verified.sha256 == hashlib.sha256(bundle.read_bytes()).hexdigest() == file_sha256(bundle)


def test_gzip_bundle_reads(bundle: Path, tmp_path: Path, keys, site) -> None:
    gz = tmp_path / "b.edgebundle"
    gz.write_bytes(gzip.compress(bundle.read_bytes(), mtime=0))
    verified = read_bundle(gz, keys.trust, site.dest, now=NOW)
    assert verified.sha256 == hashlib.sha256(gz.read_bytes()).hexdigest()
    assert verified.path("model.onnx").read_bytes() == default_members()["model.onnx"]


def test_default_limits_read_a_bundle(bundle: Path, keys, site) -> None:
    assert read_bundle(bundle, keys.trust, site.dest, now=NOW, limits=ReadLimits()).manifest.name == "digits"


def test_inspect_needs_no_trust(tmp_path: Path, keys) -> None:
    path = tmp_path / "b.edgebundle"
    written = write_valid_bundle(path, [keys.stranger])
    manifest, sigs = inspect_bundle(path)
    assert manifest == written
    assert sigs == [{"keyid": key_id(keys.stranger.public_key()), "sig": sigs[0]["sig"]}]


def test_write_is_deterministic(tmp_path: Path, keys) -> None:
    a, b = tmp_path / "a.edgebundle", tmp_path / "b.edgebundle"
    write_valid_bundle(a, [keys.signer])
    write_valid_bundle(b, [keys.signer])
    assert a.read_bytes() == b.read_bytes()  # Ed25519 is deterministic and mtimes come from `created`


def test_write_from_files(tmp_path: Path, keys, site) -> None:
    src = tmp_path / "src"
    src.mkdir()
    members: dict[str, object] = {}
    for name, data in default_members().items():
        (src / name.replace("/", "_")).write_bytes(data)
        members[name] = src / name.replace("/", "_")
    path = tmp_path / "b.edgebundle"
    write_bundle(path, draft_manifest(), members, [keys.signer])  # type: ignore[arg-type]
    verified = read_bundle(path, keys.trust, site.dest, now=NOW)
    assert {n: verified.path(n).read_bytes() for n in members} == default_members()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.edgebundle", "slots", "src"]  # no temp file left


@pytest.mark.parametrize("bad", ["../x", "manifest.json", "/abs", "Model.onnx"])
def test_write_refuses_bad_member_names(tmp_path: Path, keys, bad: str) -> None:
    members = {**default_members(), bad: b"x"}
    with pytest.raises(ManifestError):
        write_valid_bundle(tmp_path / "b.edgebundle", [keys.signer], members=members)
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_missing_model(tmp_path: Path, keys) -> None:
    members = {k: v for k, v in default_members().items() if k != "model.onnx"}
    with pytest.raises(ManifestError, match="model"):
        write_valid_bundle(tmp_path / "b.edgebundle", [keys.signer], members=members)


def test_bundle_filename() -> None:
    m = draft_manifest(precision="int8-dynamic", target="openvino", version=12)
    assert bundle_filename(m) == "digits-12-openvino-int8-dynamic.edgebundle"


# ---- canonical manifest ----------------------------------------------------------------------------
def test_canonical_bytes_stable(bundle: Path) -> None:
    m = Manifest.from_bytes(read_members(bundle)[0].data)
    data = m.to_bytes()
    assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert b" " not in data.replace(b"2026.01-rc1", b"")  # no whitespace between tokens
    keys_in_order = list(json.loads(data))
    assert keys_in_order == sorted(keys_in_order)
    assert Manifest.from_bytes(data) == m
    assert Manifest.from_bytes(data).to_bytes() == data
    assert Manifest.from_dict(m.to_dict()) == m


def test_canonical_json_rules() -> None:
    assert (
        canonical_json({"b": 1, "a": [1, 2, {"d": "é", "c": None}]}) == '{"a":[1,2,{"c":null,"d":"é"}],"b":1}'.encode()
    )
    with pytest.raises(ManifestError):
        canonical_json({"x": float("nan")})
    with pytest.raises(ManifestError):
        canonical_json({"x": "\ud800"})


def test_manifest_does_not_mutate_its_input() -> None:
    runtime = {"package": "onnxruntime", "providers": ["CPUExecutionProvider"]}
    m = draft_manifest(runtime=runtime)
    runtime["providers"].append("CUDAExecutionProvider")
    assert m.runtime["providers"] == ["CPUExecutionProvider"]
    d = m.to_dict()
    d["runtime"]["package"] = "x"
    assert m.runtime["package"] == "onnxruntime"


def test_manifest_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        draft_manifest().version = 6  # type: ignore[misc]


def test_draft_without_files_may_name_any_model_but_read_refuses_it(tmp_path: Path, keys, refused) -> None:
    draft = draft_manifest(golden={})
    assert draft.files == ()
    refused(ManifestError, write_archive(tmp_path / "b.edgebundle", header(canonical(draft.to_dict()), [keys.signer])))


def test_tensor_shapes() -> None:
    t = TensorSpec.from_dict({"name": "x", "dtype": "float32", "shape": ["batch", 3, 224, 224]})
    assert t.shape == ("batch", 3, 224, 224)
    for shape in ("NCHW", 4, {"n": 1}, None):
        with pytest.raises(ManifestError):
            TensorSpec.from_dict({"name": "x", "dtype": "float32", "shape": shape})


@pytest.mark.parametrize("name", ["tokenizer/" + "n" * 150 + ".txt", "tokenizer/café-語彙.txt"], ids=["long", "utf8"])
def test_names_needing_pax_headers_round_trip(tmp_path: Path, keys, site, name: str) -> None:
    path = tmp_path / "b.edgebundle"
    write_valid_bundle(path, [keys.signer], members={**default_members(), name: b"vocab"})
    raw = path.read_bytes()
    assert b"PaxHeader" in raw  # the writer needed an extended header for this name
    verified = read_bundle(path, keys.trust, site.dest, now=NOW)
    assert verified.path(name).read_bytes() == b"vocab"
