"""The ingest tests' fixtures (``ingest_parts``)."""

from ingest_parts import device_factory, ingest_factory  # noqa: F401  (shared fixtures)
