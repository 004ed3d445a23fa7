"""Every validation pattern matches the whole string: ``$`` also matches before a final newline."""

from __future__ import annotations

import pytest

from sdk.errors import ManifestError
from sdk.manifest import FileEntry, TensorSpec
from sdk.mqtt_contract import CommandError, parse_deploy

SHA = "ab" * 32


def test_file_entry_refuses_trailing_newline() -> None:
    FileEntry(path="model.onnx", sha256=SHA, size=1)
    with pytest.raises(ManifestError):
        FileEntry(path="model.onnx", sha256=SHA + "\n", size=1)


def test_dimension_name_refuses_trailing_newline() -> None:
    TensorSpec(name="x", dtype="float32", shape=("batch", 3))
    with pytest.raises(ManifestError):
        TensorSpec(name="x", dtype="float32", shape=("batch\n", 3))


def test_deploy_sha256_refuses_trailing_newline() -> None:
    cmd = {"schema": 1, "id": "c1", "type": "deploy", "url": "https://h/b.edgebundle", "sha256": SHA}
    assert parse_deploy(cmd, max_bundle_bytes=10).sha256 == SHA
    with pytest.raises(CommandError):
        parse_deploy({**cmd, "sha256": SHA + "\n"}, max_bundle_bytes=10)
