"""Every domain's tables on one ``MetaData``: what the migrations, taken together, must create.

Import this (not one domain's ``tables``) where the whole schema matters: the tests that compare the
migrated database with the ORM, and Alembic's autogenerate when a new revision is written.
"""

from __future__ import annotations

import fleet.auth.tables
import fleet.devices.tables
import fleet.releases.tables
import fleet.rollouts.tables  # noqa: F401  (each registers its tables on Base.metadata)
from fleet.db import Base

__all__ = ["METADATA"]

METADATA = Base.metadata
