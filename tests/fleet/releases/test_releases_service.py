"""The bundle repository on a real SQLite file and a real artifact folder, with real signed bundles."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from releases_kit import BundleMaker, FleetKeys
from sqlalchemy import func, select

from fleet.db import Database
from fleet.releases import (
    ArtifactStore,
    Bundle,
    artifact_url,
    choose,
    choose_bundle,
    list_bundles,
    list_releases,
    release_bundles,
    retire,
    upload,
)
from fleet.releases.store import is_sha256
from fleet.rollouts.driver import deploy_payload
from sdk.bundle import file_sha256
from sdk.errors import ExpiredError, IntegrityError, SignatureError, UnsafeArchiveError
from sdk.mqtt_contract import parse_deploy

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
X86 = {"arch": "x86_64", "runtimes": {"onnxruntime": "1.20.1"}, "accelerators": [], "os": "linux"}


def _rows(db: Database) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count()).select_from(Bundle)) or 0)


def _stored(store: ArtifactStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if p.name != ".incoming")


def test_upload_stores_the_verified_bundle_once(
    db: Database, store: ArtifactStore, make_bundle: BundleMaker, fleet_keys: FleetKeys
) -> None:
    path = make_bundle(version=3, label="2026.01")
    first = upload(db, path, fleet_keys.trust, store, now=NOW)
    sha = file_sha256(path)
    assert first.created and first.bundle.sha256 == sha
    b = first.bundle
    assert (b.name, b.version, b.target, b.precision, b.label) == ("mlp", 3, "onnxruntime", "fp32", "2026.01")
    assert b.size == path.stat().st_size and b.uploaded_at == NOW and b.retired_at is None
    assert b.runtime_facts["target"] == "onnxruntime" and b.runtime_facts["package"] == "onnxruntime"
    assert len(b.keyids) == 1 and '"name":"mlp"' in b.manifest
    assert store.path(sha).read_bytes() == path.read_bytes()
    again = upload(db, path.read_bytes(), fleet_keys.trust, store, now=NOW + 5)  # bytes this time
    assert not again.created and again.bundle.uploaded_at == NOW
    assert _rows(db) == 1 and _stored(store) == [f"{sha}.edgebundle"]
    assert list(store.incoming.iterdir()) == []


def test_reupload_restores_a_lost_file(
    db: Database, store: ArtifactStore, make_bundle: BundleMaker, fleet_keys: FleetKeys
) -> None:
    path = make_bundle()
    sha = upload(db, path, fleet_keys.trust, store, now=NOW).bundle.sha256
    store.path(sha).unlink()
    assert not upload(db, path, fleet_keys.trust, store, now=NOW).created
    assert store.path(sha).read_bytes() == path.read_bytes()


def _tamper(path: Path, out: Path) -> Path:
    """Flip one byte inside the model member (after the manifest and signatures headers)."""
    data = bytearray(path.read_bytes())
    index = data.index(b"model.onnx", 3 * 512) + 1024  # into the member's data, past its header
    data[index] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("unknown_key", SignatureError),
        ("tampered", IntegrityError),
        ("truncated", UnsafeArchiveError),
        ("garbage", UnsafeArchiveError),
        ("empty", UnsafeArchiveError),
        ("expired", ExpiredError),
    ],
)
def test_refused_bundles_leave_nothing(
    case: str,
    error: type[Exception],
    db: Database,
    store: ArtifactStore,
    make_bundle: BundleMaker,
    fleet_keys: FleetKeys,
    tmp_path: Path,
) -> None:
    good = make_bundle()
    source: bytes | Path = {
        "unknown_key": lambda: make_bundle(key=fleet_keys.stranger),
        "tampered": lambda: _tamper(good, tmp_path / "tampered.edgebundle"),
        "truncated": lambda: good.read_bytes()[: good.stat().st_size // 2],
        "garbage": lambda: os.urandom(4096),
        "empty": lambda: b"",
        "expired": lambda: make_bundle(expires="2025-06-01T00:00:00Z"),
    }[case]()
    with pytest.raises(error):
        upload(db, source, fleet_keys.trust, store, now=NOW)
    assert _rows(db) == 0 and _stored(store) == [] and list(store.incoming.iterdir()) == []


def test_list_filters_retire_and_releases(
    db: Database, store: ArtifactStore, make_bundle: BundleMaker, fleet_keys: FleetKeys
) -> None:
    v1 = upload(db, make_bundle(version=1), fleet_keys.trust, store, now=NOW).bundle
    v2 = upload(db, make_bundle(version=2), fleet_keys.trust, store, now=NOW + 1).bundle
    v2_int8 = upload(db, make_bundle(version=2, precision="int8"), fleet_keys.trust, store, now=NOW + 2).bundle
    ov = upload(db, make_bundle(version=2, target="openvino", runtime={"package": "openvino"}), fleet_keys.trust,
                store, now=NOW + 3).bundle  # fmt: skip
    other = upload(db, make_bundle(name="other", version=7), fleet_keys.trust, store, now=NOW + 4).bundle
    with db.session() as session:
        assert {b.sha256 for b in list_bundles(session, name="mlp", version=2)} == {
            v2.sha256,
            v2_int8.sha256,
            ov.sha256,
        }
        assert [b.sha256 for b in list_bundles(session, target="openvino")] == [ov.sha256]
        retired = retire(session, v2.sha256, now=NOW + 10)
        assert retired is not None and retired.retired_at == NOW + 10
        assert retire(session, "0" * 64, now=NOW) is None
    with db.session() as session:
        assert retire(session, v2.sha256, now=NOW + 99).retired_at == NOW + 10  # type: ignore[union-attr]
        assert [b.sha256 for b in list_bundles(session, retired=True)] == [v2.sha256]
        assert v2.sha256 not in {b.sha256 for b in list_bundles(session, retired=False)}
        summaries = {(r.name, r.version): r for r in list_releases(session)}
        assert set(summaries) == {("mlp", 1), ("mlp", 2), ("other", 7)}
        assert (summaries["mlp", 2].bundles, summaries["mlp", 2].active) == (3, 2)
        assert summaries["mlp", 2].first_uploaded_at == NOW + 1
        assert [r.version for r in list_releases(session, name="mlp")] == [2, 1]
        assert {b.sha256 for b in release_bundles(session, "mlp", 1)} == {v1.sha256}
        assert release_bundles(session, "mlp", 3) == []
        # a retired bundle is never chosen: the int8 one is the choice now, and v2 says why it is not
        choice = choose_bundle(session, "mlp", 2, X86)
        assert choice.bundle is not None and choice.bundle.sha256 == v2_int8.sha256
        assert choice.reasons[v2.sha256] == "retired"
        assert "no openvino runtime is installed" in choice.reasons[ov.sha256]
    assert store.has(v2.sha256)  # still downloadable for devices mid-deployment
    assert other.name == "other"


def test_choice_prefers_accelerators_then_precision_order(
    db: Database, store: ArtifactStore, make_bundle: BundleMaker, fleet_keys: FleetKeys
) -> None:
    def put(**kw: object) -> Bundle:
        return upload(db, make_bundle(version=4, **kw), fleet_keys.trust, store, now=NOW).bundle

    fp32 = put(precision="fp32")
    fp16 = put(precision="fp16")
    int8 = put(precision="int8", runtime={"package": "onnxruntime", "arch": ["aarch64"]})
    cuda = put(precision="fp16", runtime={"package": "onnxruntime-gpu",
                                          "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]})  # fmt: skip
    tpu = put(target="tflite", precision="int8", runtime={"package": "ai-edge-litert", "delegates": ["edgetpu"]})
    with db.session() as session:
        bundles = release_bundles(session, "mlp", 4)
    # an x86 CPU: int8 is built for aarch64 only, the CUDA build runs on the CPU too: fp16 before fp32
    x86 = choose(bundles, X86)
    assert x86.bundle is not None and x86.bundle.precision == "fp16"
    assert "built for ['aarch64']" in x86.reasons[int8.sha256] and "no tflite runtime" in x86.reasons[tpu.sha256]
    assert [c.sha256 for c in x86.candidates[:3]] in ([fp16.sha256, cuda.sha256, fp32.sha256],
                                                      [cuda.sha256, fp16.sha256, fp32.sha256])  # fmt: skip
    # a GPU device: the CUDA build first, whatever the precision order says
    gpu = {**X86, "accelerators": ["cuda"]}
    assert choose(bundles, gpu).bundle.sha256 == cuda.sha256  # type: ignore[union-attr]
    # an aarch64 device: int8 first; an operator's order can put fp32 first
    arm = {**X86, "arch": "aarch64"}
    assert choose(bundles, arm).bundle.sha256 == int8.sha256  # type: ignore[union-attr]
    assert choose(bundles, arm, ("fp32", "fp16", "int8")).bundle.sha256 == fp32.sha256  # type: ignore[union-attr]
    # the Edge TPU bundle needs the accelerator, not only the runtime
    coral = {"arch": "aarch64", "runtimes": {"ai-edge-litert": "1.2.0"}, "accelerators": [], "os": "linux"}
    none = choose(bundles, coral)
    assert none.bundle is None and "edgetpu" in none.reasons[tpu.sha256]
    assert choose(bundles, {**coral, "accelerators": ["edgetpu"]}).bundle.sha256 == tpu.sha256  # type: ignore[union-attr]


def test_an_expired_bundle_is_not_chosen(
    db: Database, store: ArtifactStore, make_bundle: BundleMaker, fleet_keys: FleetKeys
) -> None:
    bundle = upload(db, make_bundle(version=12, expires="2026-06-01T00:00:00Z"), fleet_keys.trust, store, now=NOW)
    expiry = bundle.bundle.expires_at
    assert expiry == 1_780_272_000.0
    with db.session() as session:
        assert choose_bundle(session, "mlp", 12, X86, now=expiry - 1).bundle is not None
        late = choose_bundle(session, "mlp", 12, X86, now=expiry)
        assert late.bundle is None and "expired" in late.explain()


def test_concurrent_uploads_of_one_bundle_store_it_once(
    db: Database, store: ArtifactStore, make_bundle: BundleMaker, fleet_keys: FleetKeys
) -> None:
    path = make_bundle(version=13)
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(upload(db, path, fleet_keys.trust, store, now=NOW).created))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert _rows(db) == 1 and _stored(store) == [f"{file_sha256(path)}.edgebundle"]
    assert list(store.incoming.iterdir()) == []


@pytest.mark.parametrize(
    ("capabilities", "reason"),
    [
        ({**X86, "runtimes": {"onnxruntime": "1.16.3"}}, "needs onnxruntime >= 1.17"),
        ({**X86, "arch": "riscv64"}, "this device is riscv64"),
        ({**X86, "runtimes": {}}, "no onnxruntime runtime is installed"),
        ({"arch": "x86_64"}, "reported no runtimes"),
        ({**X86, "runtimes": ["onnxruntime"]}, "reported no runtimes"),
        ({**X86, "arch": None}, "no CPU architecture"),
        ({}, "reported no runtimes"),
    ],
)
def test_no_bundle_fits_says_why(
    capabilities: dict[str, object],
    reason: str,
    db: Database,
    store: ArtifactStore,
    make_bundle: BundleMaker,
    fleet_keys: FleetKeys,
) -> None:
    runtime = {"package": "onnxruntime", "min_version": "1.17", "arch": ["x86_64", "aarch64"]}
    upload(db, make_bundle(version=9, runtime=runtime), fleet_keys.trust, store, now=NOW)
    with db.session() as session:
        choice = choose_bundle(session, "mlp", 9, capabilities)
        assert choice.bundle is None and reason in choice.explain(), choice.explain()
        assert choose_bundle(session, "mlp", 10, X86).explain() == "the release has no bundles"


def test_coreml_bundles_only_for_macos(
    db: Database, store: ArtifactStore, make_bundle: BundleMaker, fleet_keys: FleetKeys
) -> None:
    upload(db, make_bundle(version=5, target="coreml", runtime={"package": "coremltools"}), fleet_keys.trust, store,
           now=NOW)  # fmt: skip
    mac = {"arch": "aarch64", "runtimes": {"coremltools": "8.1"}, "accelerators": [], "os": "darwin"}
    with db.session() as session:
        assert choose_bundle(session, "mlp", 5, mac).bundle is not None
        linux = choose_bundle(session, "mlp", 5, {**mac, "os": "linux"})
        assert linux.bundle is None and "do not run on linux" in linux.explain()


def test_deploy_payload_is_a_command_the_device_accepts(
    db: Database, store: ArtifactStore, make_bundle: BundleMaker, fleet_keys: FleetKeys
) -> None:
    bundle = upload(db, make_bundle(version=6), fleet_keys.trust, store, now=NOW).bundle
    url = artifact_url("http://fleet.local:8080/", bundle.sha256)
    payload = deploy_payload("rollout-1-dev-7", url, bundle.sha256, bundle.size, bundle.version)
    command = parse_deploy(payload, max_bundle_bytes=10 * 2**20)
    assert command.url == f"http://fleet.local:8080/artifacts/{bundle.sha256}.edgebundle"
    assert (command.id, command.sha256, command.size, command.version) == (
        "rollout-1-dev-7", bundle.sha256, bundle.size, 6,
    )  # fmt: skip
    assert not command.allow_downgrade
    again = deploy_payload("x", url, bundle.sha256, bundle.size, bundle.version, allow_downgrade=True)
    assert again["allow_downgrade"] is True


def test_a_device_on_an_older_onnxruntime_gets_the_bundle_built_for_it(
    db: Database, store: ArtifactStore, make_bundle: BundleMaker, fleet_keys: FleetKeys
) -> None:
    """`package --for onnxruntime==1.17` stamps min_version 1.17.0: one version rule on host, fleet and device."""
    from sdk.profiles import get_profile

    def put(precision: str, min_version: str) -> Bundle:
        runtime = {"package": "onnxruntime", "min_version": min_version, "arch": ["any"]}
        return upload(db, make_bundle(version=13, precision=precision, runtime=runtime), fleet_keys.trust, store,
                      now=NOW).bundle  # fmt: skip

    for_117 = put("int8", "1.17.0")
    newer = put("fp16", "1.20.0")
    with db.session() as session:
        old = choose_bundle(session, "mlp", 13, {**X86, "runtimes": {"onnxruntime": "1.17.3"}})
        assert old.bundle is not None and old.bundle.sha256 == for_117.sha256
        assert "needs onnxruntime >= 1.20.0" in old.reasons[newer.sha256]
        current = choose_bundle(session, "mlp", 13, X86)  # onnxruntime 1.20.1 runs both
        assert {c.sha256 for c in current.candidates} == {for_117.sha256, newer.sha256} and not current.reasons
        # a Jetson on its vendor onnxruntime-gpu 1.20.0 (the profile's own capabilities) takes either
        jetson = choose_bundle(session, "mlp", 13, get_profile("jetson-orin-jetpack6").capabilities())
        assert jetson.bundle is not None and not jetson.reasons


def test_fleet_store_name_refuses_trailing_newline() -> None:
    assert is_sha256("ab" * 32)
    assert not is_sha256("ab" * 32 + "\n")
