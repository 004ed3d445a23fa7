"""The anti-rollback floor: per bundle name, the highest version this device has accepted.

One record and one rule for both of the device's installed-bundle records: ``store.BundleStore``
(``installed.json``, bundles installed by ``load(state_dir=...)``) and ``slots.SlotStore`` (``pointer.json``,
the agent's A/B slots). A bundle below its name's floor is refused unless a downgrade is allowed
explicitly, and the check is one call, ``sdk.bundle.read_bundle(..., installed_version=floors.floor)``,
which looks the floor up by the *verified* manifest's name before anything is extracted.

Where it is stored: inside the file each store commits with, under the key ``"floors"``
(``{"name": version}``), never in a file of its own. The floor must move in the same atomic write as the
install or activation it records: written before it, a crash would leave a floor above anything ever
accepted; written after, a crash would leave a floor below the active version, a window for a silent
downgrade. Raising is the only change (``raised``); an explicit rollback does not lower it.

Pure data: no I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["VersionFloors"]


@dataclass(frozen=True)
class VersionFloors:
    """The highest version accepted so far for each bundle name.

    Attributes:
        by_name: bundle name -> its floor (a version number >= 0).
    """

    by_name: Mapping[str, int] = field(default_factory=dict)

    def floor(self, name: str) -> int | None:
        """The floor of ``name``, None when no bundle of that name was accepted; ``read_bundle``'s
        ``installed_version``."""
        return self.by_name.get(name)

    def raised(self, name: str, version: int) -> VersionFloors:
        """These floors with ``name``'s lifted to ``version`` (a lower version leaves it as it is)."""
        current = self.by_name.get(name)
        if current is not None and current >= version:
            return self
        return VersionFloors({**self.by_name, name: version})

    @classmethod
    def of(cls, accepted: Iterable[tuple[str, int]]) -> VersionFloors:
        """The floors of a history of ``(name, version)`` accepted (files written before floors were kept)."""
        floors = cls()
        for name, version in accepted:
            floors = floors.raised(name, version)
        return floors

    def to_json(self) -> dict[str, int]:
        """The ``"floors"`` value of the store's file, names sorted."""
        return {name: self.by_name[name] for name in sorted(self.by_name)}

    @classmethod
    def from_json(cls, raw: Any) -> VersionFloors:
        """Parse a ``"floors"`` value strictly.

        Raises:
            ValueError: not an object of names to integers >= 0.
        """
        if not isinstance(raw, dict):
            raise ValueError(f"floors must be an object of bundle names to versions, got {type(raw).__name__}")
        for name, version in raw.items():
            if not name or not isinstance(version, int) or isinstance(version, bool) or version < 0:
                raise ValueError(f"floor of {name!r} must be an integer >= 0, got {version!r}")
        return cls(dict(raw))
