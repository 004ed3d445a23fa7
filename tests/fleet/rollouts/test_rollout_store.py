"""The stored side: migration = ORM, create's refusals (nothing stored), claims, leases, operator commands."""

from __future__ import annotations

import pytest
from rollout_parts import bundles, resolver
from sqlalchemy import func, select

import fleet.auth.tables  # noqa: F401  (every table of the foundation, as the app declares them)
from fleet.api import Conflict, NotFound
from fleet.db import Database
from fleet.rollouts import service
from fleet.rollouts.spec import parse_spec
from fleet.rollouts.tables import Rollout, RolloutAudit, RolloutClaim, RolloutDevice
from sdk.errors import InputError

DEVICES = [f"dev{i}" for i in range(6)]


def create(db: Database, selector: str = "all", waves: str = "1,50%,100%", **kw: object) -> int:
    with db.session() as s:
        return service.create_rollout(s, parse_spec("m:2", selector, waves), resolver(DEVICES), bundles(**kw), 100.0)  # type: ignore[arg-type]


def count(db: Database, table: type) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(table)) or 0)


def test_create_assigns_waves_command_ids_and_claims(db: Database) -> None:
    rollout_id = create(db)
    with db.session() as s:
        rows = s.scalars(select(RolloutDevice).order_by(RolloutDevice.device_id)).all()
        assert [r.wave for r in rows] == [0, 1, 1, 2, 2, 2]
        assert rows[0].deploy_cmd_id == f"ro{rollout_id}-dev0-deploy"
        assert rows[0].rollback_cmd_id == f"ro{rollout_id}-dev0-rollback"
        assert s.get(Rollout, rollout_id).state == "pending"  # type: ignore[union-attr]
        view = service.rollout_view(s, rollout_id)
    assert [w["devices"] for w in view["waves_detail"]] == [1, 2, 3]
    assert count(db, RolloutClaim) == 6


def test_an_overlapping_rollout_is_refused_and_stores_nothing(db: Database) -> None:
    first = create(db, "id=dev1,dev2", waves="1,100%")
    with pytest.raises(Conflict, match=rf"dev2 \(rollout {first}\)"):
        create(db, "id=dev2,dev3", waves="1,100%")
    assert count(db, Rollout) == 1
    with db.session() as s:
        service.command(s, first, "abort", 200.0)
    assert count(db, RolloutClaim) == 0  # an ended rollout frees its devices
    create(db, "id=dev2,dev3", waves="1,100%")


@pytest.mark.parametrize(
    ("selector", "waves", "kw", "words"),
    [
        ("id=dev1,ghost", "1,100%", {}, "unknown devices: ghost"),
        ("id=dev1,dev2", "1,10%,100%", {}, r"wave 2 \(10%\) adds no device"),
        ("all", "1,100%", {"misfits": {"dev3": "no bundle for arch riscv64"}}, "dev3: no bundle for arch riscv64"),
    ],
)
def test_bad_creates_are_refused_before_anything_is_stored(
    db: Database, selector: str, waves: str, kw: dict[str, object], words: str
) -> None:
    with pytest.raises(InputError, match=words):
        create(db, selector, waves, **kw)
    assert count(db, Rollout) == count(db, RolloutDevice) == count(db, RolloutClaim) == 0


def test_a_device_id_too_long_for_a_command_id_is_refused(db: Database) -> None:
    long_id = "d" * 120
    with pytest.raises(InputError, match="too long for a 128-character command id"), db.session() as s:
        service.create_rollout(s, parse_spec("m:2", "all", "100%"), resolver([long_id]), bundles(), 1.0)
    assert count(db, Rollout) == 0


def test_leases_go_to_one_holder_until_they_expire(db: Database) -> None:
    rollout_id = create(db)
    with db.session() as s:
        assert service.acquire_lease(s, rollout_id, "a", 100.0, 10.0)
        assert service.acquire_lease(s, rollout_id, "a", 105.0, 10.0)  # renewed to 115
    with db.session() as s:
        assert not service.acquire_lease(s, rollout_id, "b", 114.0, 10.0)
        assert service.acquire_lease(s, rollout_id, "b", 115.5, 10.0)
        assert not service.acquire_lease(s, rollout_id, "a", 116.0, 10.0)
        service.release_leases(s, "b")
        assert service.acquire_lease(s, rollout_id, "a", 116.0, 10.0)


def test_operator_commands_are_audited_and_refused_when_they_do_not_apply(db: Database) -> None:
    rollout_id = create(db)
    with db.session() as s:
        service.command(s, rollout_id, "pause", 110.0, reason="freeze")
    with pytest.raises(Conflict, match="paused: cannot pause"), db.session() as s:
        service.command(s, rollout_id, "pause", 111.0)
    with db.session() as s:
        service.command(s, rollout_id, "resume", 112.0)
        log = service.audit_log(s, rollout_id)
    assert [(e["action"], e["reason"]) for e in log] == [
        ("Create", "created"),
        ("Pause", "freeze"),
        ("Resume", "resume by operator"),
    ]
    assert count(db, RolloutAudit) == 3
    with pytest.raises(NotFound), db.session() as s:
        service.command(s, 999, "pause", 1.0)
