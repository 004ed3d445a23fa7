"""The pure parts: pointer, deployment record, restart decisions, command parsing, slots on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runtime_bundles import Keys

from device_runtime._sysinfo import (
    RUNTIME_PACKAGES,
    arch_compatible,
    capabilities,
    machine_arch,
    target_runs_here,
    version_at_least,
)
from device_runtime.agent.ota import Deployment, Limits, deployment_from_command, recover
from device_runtime.agent.slots import _FOLDER_RE, Pointer, SlotInfo, SlotStore
from device_runtime.errors import StateError
from sdk.bundle import read_bundle
from sdk.errors import IntegrityError
from sdk.mqtt_contract import CommandError
from sdk.signing import TrustedKeys

SHA = "ab" * 32
INFO = SlotInfo("m", 3, "onnxruntime", SHA, ("k",))


def test_pointer_round_trip_and_floors() -> None:
    p = Pointer().with_slot("A", INFO).activate("A")
    assert p.active == "A" and p.inactive == "B" and p.floor("m") == 3
    q = Pointer.from_bytes(p.to_bytes())
    assert q == p
    older = SlotInfo("m", 1, "onnxruntime", "cd" * 32)
    r = q.with_slot("B", older).activate("B", raise_floor=False)  # an explicit rollback keeps the floor
    assert r.active == "B" and r.floor("m") == 3
    with pytest.raises(StateError):
        Pointer(active="B")  # active slot without a bundle
    with pytest.raises(StateError):
        Pointer.from_bytes(b"{not json")
    older = json.loads(p.to_bytes())
    del older["floors"]  # a pointer written before floors were kept
    assert Pointer.from_bytes(json.dumps(older).encode()).floor("m") is None
    with pytest.raises(StateError, match="floor"):
        Pointer.from_bytes(json.dumps({**older, "floors": {"m": "3"}}).encode())


def _dep(phase: str, **kw: object) -> Deployment:
    return Deployment(cmd_id="c", kind="deploy", sha256=SHA, url="http://x/b", **kw).at(phase)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("record", "active", "action", "resume_at", "bad"),
    [
        (_dep("received"), None, "resume", "downloading", False),
        (_dep("downloading"), None, "resume", "downloading", False),
        (_dep("verifying"), None, "resume", "verifying", False),
        (_dep("staged"), None, "resume", "verifying", False),
        (_dep("downloading", resumes=3), None, "abandon", None, False),
        (_dep("health_check", attempts=1), None, "resume", "health_check", False),
        (_dep("health_check", attempts=2), None, "abandon", None, True),
        (_dep("health_check", attempts=1), SHA, "committed", None, False),  # the pointer write is the commit
        (_dep("health_check", attempts=2), SHA, "committed", None, False),
        (_dep("switching", attempts=1), SHA, "committed", None, False),
        (_dep("switching", attempts=1), "ef" * 32, "resume", "health_check", False),
        (_dep("active"), SHA, "report", None, False),
        (Deployment("r", "rollback", sha256=SHA).at("health_check"), SHA, "committed", None, False),
        (Deployment("r", "rollback", sha256=SHA).at("health_check"), None, "abandon", None, False),
    ],
)
def test_recover(record: Deployment, active: str | None, action: str, resume_at: str | None, bad: bool) -> None:
    decision = recover(record, active, Limits(max_trial_attempts=2, max_resumes=3))
    assert (decision.action, decision.resume_at, decision.bad) == (action, resume_at, bad)
    assert Deployment.from_bytes(record.to_bytes()) == record


def test_command_parsing() -> None:
    ok = {"id": "d", "type": "deploy", "url": "https://h/b", "sha256": SHA.upper(), "size": 10, "version": 2}
    dep = deployment_from_command(ok, max_bundle_bytes=100)
    assert dep.sha256 == SHA and dep.size == 10 and not dep.allow_downgrade
    for bad in (
        {"url": "file:///etc/passwd"},
        {"sha256": "xyz"},
        {"size": 101},
        {"size": True},
        {"allow_downgrade": "yes"},
    ):
        with pytest.raises(CommandError):
            deployment_from_command({**ok, **bad}, max_bundle_bytes=100)
    with pytest.raises(CommandError):
        deployment_from_command({"type": "deploy"}, max_bundle_bytes=100)
    with pytest.raises(CommandError):
        deployment_from_command({"id": "p", "type": "ping"}, max_bundle_bytes=100)
    assert deployment_from_command({"id": "r", "type": "rollback"}, max_bundle_bytes=100).kind == "rollback"


def test_sysinfo() -> None:
    assert machine_arch("AMD64") == "x86_64" and machine_arch("arm64") == "aarch64"
    assert arch_compatible(None, "x86_64") and arch_compatible(["any"], "riscv64")
    assert arch_compatible(["amd64"], "x86_64") and not arch_compatible(["aarch64"], "x86_64")
    assert version_at_least("1.20.1", "1.17") and not version_at_least("1.16.3", "1.17")
    assert version_at_least("1.17.0rc1", "1.17")
    assert target_runs_here("coreml", "darwin") and not target_runs_here("coreml", "linux")
    assert target_runs_here("onnxruntime", "linux")
    caps = capabilities()
    assert set(caps) >= {"arch", "runtimes", "accelerators"} and "onnxruntime" in caps["runtimes"]
    # a device told to run one target reports only that target's runtime (`edgeship-device run --runtimes`)
    assert set(capabilities(["onnxruntime"])["runtimes"]) <= {
        p for p, t in RUNTIME_PACKAGES.items() if t == "onnxruntime"
    }
    assert "onnxruntime" in capabilities(["onnxruntime"])["runtimes"] and not capabilities(["coreml"])["runtimes"]


def test_slot_install_open_and_tamper(tmp_path: Path, linear_bundle: Path, keys: Keys) -> None:
    store = SlotStore(tmp_path)
    verified = read_bundle(linear_bundle, TrustedKeys.from_files([keys.public]), store.incoming / "bundle")
    staged = store.install("B", verified)
    folder = staged.root.parent
    assert not store.incoming.exists() and staged.root.name == "bundle" and folder.parent == tmp_path / "slots"
    assert folder.name.startswith(f"B.{verified.sha256[:12]}.")
    info = SlotInfo.of(staged)
    assert info.folder == folder.name
    store.write_pointer(Pointer().with_slot("B", info).activate("B"))
    assert json.loads(store.pointer_path.read_text())["slots"]["B"]["folder"] == folder.name
    assert store.open_slot("B", store.read_pointer().slots["B"]).manifest.name == "linear"  # type: ignore[arg-type]
    assert store.open_staged("B", folder.name, info.sha256).sha256 == info.sha256
    (staged.root / "model.onnx").write_bytes(b"corrupt")
    with pytest.raises(IntegrityError):
        store.open_slot("B", info)
    store.clean_unlisted(Pointer())
    assert not folder.exists()


def test_a_new_install_leaves_the_listed_folder_of_its_slot_alone(
    tmp_path: Path, linear_bundle: Path, keys: Keys
) -> None:
    store = SlotStore(tmp_path)
    trust = TrustedKeys.from_files([keys.public])
    first = store.install("B", read_bundle(linear_bundle, trust, store.incoming / "bundle"))
    pointer = Pointer().with_slot("B", SlotInfo.of(first))
    store.write_pointer(pointer)
    second = store.install("B", read_bundle(linear_bundle, trust, store.incoming / "bundle"))
    assert second.root != first.root and first.root.exists()
    store.clean_unlisted(pointer, keep=second.root.parent.name)  # a staged folder is kept
    assert first.root.exists() and second.root.exists()
    store.clean_unlisted(pointer)  # e.g. the deployment failed: its folder goes, the listed one stays
    assert first.root.exists() and not second.root.exists()
    assert store.open_slot("B", SlotInfo.of(first)).sha256 == SlotInfo.of(first).sha256


def test_pointer_of_an_older_agent_names_the_folders_by_slot(tmp_path: Path, linear_bundle: Path, keys: Keys) -> None:
    store = SlotStore(tmp_path)
    verified = read_bundle(linear_bundle, TrustedKeys.from_files([keys.public]), store.incoming / "bundle")
    staged = store.install("A", verified)
    staged.root.parent.rename(tmp_path / "slots" / "A")  # the layout older agents wrote
    legacy = SlotInfo.of(verified)
    assert legacy.folder == ""  # (rooted in .incoming: no folder)
    raw = json.loads(Pointer().with_slot("A", legacy).activate("A").to_bytes())
    assert "folder" not in raw["slots"]["A"]
    store.pointer_path.write_text(json.dumps(raw))
    pointer = store.read_pointer()
    assert store.open_slot("A", pointer.slots["A"]).manifest.name == "linear"  # type: ignore[arg-type]
    store.clean_unlisted(pointer)
    assert (tmp_path / "slots" / "A").exists()


@pytest.mark.parametrize("folder", ["../A", "A/../../x", "C", "A.zz", ".incoming"])
def test_pointer_with_a_foreign_folder_is_refused(folder: str) -> None:
    raw = json.loads(Pointer().with_slot("A", SlotInfo("m", 1, "onnxruntime", "0" * 64)).activate("A").to_bytes())
    raw["slots"]["A"]["folder"] = folder
    with pytest.raises(StateError):
        Pointer.from_bytes(json.dumps(raw).encode())


@pytest.mark.parametrize("name", ["A\n", "B.0123456789ab.01234567\n"])
def test_slot_folder_refuses_trailing_newline(name: str) -> None:
    assert _FOLDER_RE.fullmatch(name.rstrip("\n"))
    assert not _FOLDER_RE.fullmatch(name)
