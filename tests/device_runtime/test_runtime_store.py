"""BundleStore through load(state_dir=...): versions recorded, no silent downgrade, failures change nothing."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from runtime_bundles import GOLDEN_X, BundleMaker, Keys, linear_reference

import device_runtime
from device_runtime import BundleStore, StateError
from device_runtime.floors import VersionFloors
from sdk.bundle import file_sha256
from sdk.errors import BackendError, EdgeshipError, IntegrityError, RollbackError, SignatureError, UnsafeArchiveError


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for a folder)."""
    return {
        p.relative_to(folder).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))
    }


def tampered(src: Path, dst: Path, member: str = "model.onnx") -> Path:
    """Copy a bundle, flipping one byte of ``member`` (same size, so only its hash is wrong)."""
    with tarfile.open(src) as tar_in, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tar_out:
        for info in tar_in.getmembers():
            data = bytearray(tar_in.extractfile(info).read())  # type: ignore[union-attr]
            if info.name == member:
                data[len(data) // 2] ^= 0xFF
            tar_out.addfile(info, io.BytesIO(bytes(data)))
    return dst


def test_install_records_the_version(linear_bundle: Path, keys: Keys, tmp_path: Path) -> None:
    state = tmp_path / "state"
    sha = file_sha256(linear_bundle)
    with device_runtime.load(linear_bundle, [keys.public], state_dir=state) as model:
        np.testing.assert_allclose(model.predict({"x": GOLDEN_X})["y"], linear_reference(GOLDEN_X), rtol=1e-6)
        assert model.root == state / "bundles" / "linear" / f"1-{sha[:12]}"
        assert model.health_check()["passed"]
    assert (state / "bundles" / "linear" / f"1-{sha[:12]}" / "model.onnx").is_file()  # close() keeps installs

    recorded = json.loads((state / "installed.json").read_bytes())
    assert recorded["schema"] == 1
    [entry] = recorded["bundles"]["linear"]
    assert entry["version"] == 1 and entry["sha256"] == sha and entry["target"] == "onnxruntime"
    assert entry["path"] == f"bundles/linear/1-{sha[:12]}"
    store = BundleStore(state)
    assert store.highest_version("linear") == 1 and store.highest_version("other") is None
    assert sorted(p.name for p in state.iterdir()) == ["bundles", "installed.json"]  # no staging left


def test_same_bundle_twice_is_idempotent(linear_bundle: Path, keys: Keys, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with device_runtime.load(linear_bundle, [keys.public], state_dir=state) as first:
        root = first.root
    before = snapshot(state)
    with device_runtime.load(linear_bundle, [keys.public], state_dir=state) as second:
        assert second.root == root
        np.testing.assert_allclose(second.predict({"x": GOLDEN_X})["y"], linear_reference(GOLDEN_X), rtol=1e-6)
    assert snapshot(state) == before


def test_lower_version_needs_allow_downgrade(make_bundle: BundleMaker, keys: Keys, tmp_path: Path) -> None:
    state = tmp_path / "state"
    v1, v2 = make_bundle(version=1), make_bundle(version=2)
    device_runtime.load(v2, [keys.public], state_dir=state).close()
    before = snapshot(state)
    with pytest.raises(RollbackError, match="older than installed v2"):
        device_runtime.load(v1, [keys.public], state_dir=state)
    assert snapshot(state) == before

    with device_runtime.load(v1, [keys.public], state_dir=state, allow_downgrade=True) as model:
        assert model.manifest.version == 1
    store = BundleStore(state)
    assert [b.version for b in store.installed("linear")] == [2, 1]
    assert store.highest_version("linear") == 2  # the floor stays: v1 again still needs allow_downgrade
    with pytest.raises(RollbackError):
        device_runtime.load(v1, [keys.public], state_dir=state)


def test_other_names_have_their_own_history(make_bundle: BundleMaker, keys: Keys, tmp_path: Path) -> None:
    state = tmp_path / "state"
    device_runtime.load(make_bundle(name="alpha", version=5), [keys.public], state_dir=state).close()
    device_runtime.load(make_bundle(name="beta", version=1), [keys.public], state_dir=state).close()
    store = BundleStore(state)
    assert store.highest_version("alpha") == 5 and store.highest_version("beta") == 1


def test_the_floor_is_recorded_with_the_install(make_bundle: BundleMaker, keys: Keys, tmp_path: Path) -> None:
    state = tmp_path / "state"
    device_runtime.load(make_bundle(version=2), [keys.public], state_dir=state).close()
    device_runtime.load(make_bundle(version=1), [keys.public], state_dir=state, allow_downgrade=True).close()
    assert json.loads((state / "installed.json").read_bytes())["floors"] == {"linear": 2}
    assert BundleStore(state).floors() == VersionFloors({"linear": 2})


def test_an_older_installed_json_without_floors_still_loads(
    make_bundle: BundleMaker, keys: Keys, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    device_runtime.load(make_bundle(version=3), [keys.public], state_dir=state).close()
    device_runtime.load(make_bundle(version=1), [keys.public], state_dir=state, allow_downgrade=True).close()
    recorded = json.loads((state / "installed.json").read_bytes())
    del recorded["floors"]  # as written before the floor was kept
    (state / "installed.json").write_bytes(json.dumps(recorded).encode())
    assert BundleStore(state).highest_version("linear") == 3  # the highest version recorded
    with pytest.raises(RollbackError, match="older than installed v3"):
        device_runtime.load(make_bundle(version=2), [keys.public], state_dir=state)
    device_runtime.load(make_bundle(version=4), [keys.public], state_dir=state).close()
    assert json.loads((state / "installed.json").read_bytes())["floors"] == {"linear": 4}


def test_a_corrupt_floor_is_refused(linear_bundle: Path, keys: Keys, tmp_path: Path) -> None:
    state = tmp_path / "state"
    device_runtime.load(linear_bundle, [keys.public], state_dir=state).close()
    recorded = json.loads((state / "installed.json").read_bytes())
    (state / "installed.json").write_bytes(json.dumps({**recorded, "floors": {"linear": "1"}}).encode())
    with pytest.raises(StateError, match="corrupt"):
        BundleStore(state).highest_version("linear")


def test_version_floors_rule() -> None:
    floors = VersionFloors().raised("m", 3)
    assert floors.floor("m") == 3 and floors.floor("other") is None
    assert floors.raised("m", 1) is floors and floors.raised("m", 5).floor("m") == 5  # only ever raised
    assert VersionFloors.of([("m", 2), ("n", 1), ("m", 7), ("m", 4)]).to_json() == {"m": 7, "n": 1}
    assert VersionFloors.from_json(floors.to_json()) == floors
    for bad in ([], {"m": -1}, {"m": True}, {"m": 1.5}, {"": 1}):
        with pytest.raises(ValueError, match="floor"):
            VersionFloors.from_json(bad)


BadCase = Callable[[BundleMaker, Keys, Path], tuple[Path, list[Path]]]
BAD_CASES: dict[str, tuple[BadCase, type[EdgeshipError]]] = {
    "tampered-model": (lambda mk, k, tmp: (tampered(mk(version=3), tmp / "t.edgebundle"), [k.public]), IntegrityError),
    "tampered-golden": (
        lambda mk, k, tmp: (tampered(mk(version=3), tmp / "g.edgebundle", "golden/outputs/y.npy"), [k.public]),
        IntegrityError,
    ),
    "truncated": (
        lambda mk, k, tmp: (_truncated(mk(version=3), tmp / "cut.edgebundle"), [k.public]),
        UnsafeArchiveError,
    ),
    "untrusted-signer": (lambda mk, k, tmp: (mk(version=3), [k.other_public]), SignatureError),
    "downgrade": (lambda mk, k, tmp: (mk(version=1), [k.public]), RollbackError),
    "junk-model": (lambda mk, k, tmp: (mk(version=3, model_bytes=b"\x08junk"), [k.public]), BackendError),
    "no-adapter": (lambda mk, k, tmp: (mk(version=3, target="coreml"), [k.public]), BackendError),
}


def _truncated(src: Path, dst: Path) -> Path:
    """Cut a bundle in the middle of model.onnx (cutting only the tar's zero padding would be harmless)."""
    with tarfile.open(src) as tar:
        model = tar.getmember("model.onnx")
    dst.write_bytes(src.read_bytes()[: model.offset_data + model.size // 2])
    return dst


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_a_bad_bundle_leaves_the_store_byte_identical(
    case: str, make_bundle: BundleMaker, keys: Keys, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    device_runtime.load(make_bundle(version=2), [keys.public], state_dir=state).close()
    before = snapshot(state)
    build, error = BAD_CASES[case]
    bundle, trust = build(make_bundle, keys, tmp_path)
    with pytest.raises(error):
        device_runtime.load(bundle, trust, state_dir=state)
    assert snapshot(state) == before


def test_a_bad_first_bundle_leaves_an_empty_store(make_bundle: BundleMaker, keys: Keys, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with pytest.raises(BackendError):
        device_runtime.load(make_bundle(model_bytes=b"junk"), [keys.public], state_dir=state)
    assert snapshot(state) == {}


def test_corrupt_state_file_is_a_state_error(linear_bundle: Path, keys: Keys, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "installed.json").write_bytes(b"{not json")
    before = snapshot(state)
    with pytest.raises(StateError, match="corrupt"):
        device_runtime.load(linear_bundle, [keys.public], state_dir=state)
    assert snapshot(state) == before


def test_unrecorded_folder_left_by_a_crash_is_replaced(linear_bundle: Path, keys: Keys, tmp_path: Path) -> None:
    state = tmp_path / "state"
    leftover = state / "bundles" / "linear" / f"1-{file_sha256(linear_bundle)[:12]}"
    leftover.mkdir(parents=True)
    (leftover / "half-written").write_bytes(b"x")
    with device_runtime.load(linear_bundle, [keys.public], state_dir=state) as model:
        assert model.root == leftover
    assert sorted(p.name for p in leftover.iterdir()) == ["golden", "model.onnx"]
    assert [b.version for b in BundleStore(state).installed("linear")] == [1]
