from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bundlekit import NOW, write_valid_bundle
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sdk.bundle import read_bundle
from sdk.signing import TrustedKeys


@dataclass(frozen=True)
class Keys:
    signer: Ed25519PrivateKey
    second: Ed25519PrivateKey
    stranger: Ed25519PrivateKey

    @property
    def trust(self) -> TrustedKeys:
        return TrustedKeys((self.signer.public_key(),))


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys(Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate())


@pytest.fixture
def bundle(tmp_path: Path, keys: Keys) -> Path:
    """A valid bundle signed by ``keys.signer``."""
    path = tmp_path / "in" / "digits.edgebundle"
    write_valid_bundle(path, [keys.signer])
    return path


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"", os.lstat(p).st_mode)
        for p in sorted(root.rglob("*"))
    }


@dataclass
class Site:
    """A slots folder with an installed sibling ``A``; bundles are read into ``B``."""

    parent: Path
    installed: Path
    dest: Path
    before: dict[str, tuple[bytes, int]]

    def assert_clean(self) -> None:
        """Destination absent, no staging folder left, the installed sibling untouched."""
        assert not self.dest.exists()
        assert sorted(p.name for p in self.parent.iterdir()) == [self.installed.name]
        assert _snapshot(self.installed) == self.before


@pytest.fixture
def site(tmp_path: Path) -> Site:
    parent = tmp_path / "slots"
    installed = parent / "A"
    (installed / "golden").mkdir(parents=True)
    (installed / "model.onnx").write_bytes(b"the model in service")
    (installed / "golden" / "input_0.npy").write_bytes(b"golden")
    return Site(parent, installed, parent / "B", _snapshot(installed))


@pytest.fixture
def refused(site: Site, keys: Keys) -> Callable[..., pytest.ExceptionInfo[Any]]:
    """``refused(ErrorClass, bundle_path, **read_bundle_kwargs)``: read must fail and leave nothing."""

    def check(error: type[BaseException], path: Path, **kwargs: Any) -> pytest.ExceptionInfo[Any]:
        kwargs.setdefault("now", NOW)
        trust = kwargs.pop("trust", keys.trust)
        with pytest.raises(error) as info:
            read_bundle(path, trust, site.dest, **kwargs)
        assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
        site.assert_clean()
        return info

    return check
