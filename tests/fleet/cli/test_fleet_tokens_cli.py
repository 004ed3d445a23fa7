"""`edgeship fleet token create|list|revoke` on a real database; the secret then works over real HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_parts import fleet_settings, register, serve_fleet

from fleet.db import Database
from sdk.cli.main import main


def test_create_list_revoke_and_use_over_http(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db_args = ["--state-dir", str(tmp_path / "state")]
    assert main(["fleet", "token", "create", "--name", "ci", "--scope", "write", *db_args]) == 0
    out, err = capsys.readouterr()
    secret = out.strip()
    assert out == secret + "\n" and secret.startswith("esf_")  # only the secret on stdout: T=$(... token create)
    assert err == "token 1 'ci' (write): shown once, store it now\n"
    assert main(["fleet", "token", "create", "--name", "dash", "--scope", "read", *db_args]) == 0
    capsys.readouterr()

    assert main(["fleet", "token", "list", *db_args]) == 0
    listing = capsys.readouterr().out
    assert secret not in listing
    rows = [line.split() for line in listing.splitlines()[2:]]
    assert [(r[0], r[1], r[2], r[-1]) for r in rows] == [
        ("2", "dash", "read", "active"),
        ("1", "ci", "write", "active"),
    ]

    db = Database(f"sqlite:///{tmp_path / 'state' / 'fleet.db'}")
    try:
        register(db, "cam-1")
        with serve_fleet(db, fleet_settings(tmp_path / "state", []), None) as url:
            assert main(["fleet", "tag", "cam-1", "a=1", "--server", url, "--token", secret]) == 0
            capsys.readouterr()
            assert main(["fleet", "token", "revoke", "1", *db_args]) == 0
            assert capsys.readouterr().out == "token 1 revoked\n"
            assert main(["fleet", "devices", "--server", url, "--token", secret]) == 1
            assert capsys.readouterr().err == "error: unknown or revoked token (HTTP 401 unauthorized)\n"
    finally:
        db.close()
    assert main(["fleet", "token", "list", *db_args]) == 0
    assert capsys.readouterr().out.splitlines()[3].split()[-1] == "revoked"


def test_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--db", f"sqlite:///{tmp_path / 'fleet.db'}"]
    assert main(["fleet", "token", "revoke", "99", *db]) == 1
    assert capsys.readouterr().err == "error: no token with id 99 (see `edgeship fleet token list`)\n"
    assert main(["fleet", "token", "create", "--name", " ", "--scope", "read", *db]) == 1
    assert capsys.readouterr().err == "error: a token needs a name of 1 to 100 characters\n"
    with pytest.raises(SystemExit) as usage:
        main(["fleet", "token", "create", "--name", "x", "--scope", "admin", *db])
    assert usage.value.code == 2
    assert "invalid choice: 'admin'" in capsys.readouterr().err
