"""Device profiles: the shipped file parses strictly, docs/devices.md shows it, `edgeship devices` prints it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sdk.cli.main import main
from sdk.compat import why_incompatible
from sdk.errors import InputError
from sdk.profiles import get_profile, load_profiles, parse_profiles, parse_runtime_spec, profile_table

DOC = Path(__file__).resolve().parents[2] / "docs" / "devices.md"
BEGIN, END = "<!-- profiles:begin (generated from sdk/profiles.json) -->", "<!-- profiles:end -->"


def _markdown_table() -> str:
    headers, rows = profile_table()
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def test_the_shipped_profiles_parse() -> None:
    profiles = load_profiles()
    assert {"raspberry-pi-5", "raspberry-pi-4", "jetson-orin-jetpack6", "iphone-ios17", "mac-apple-silicon",
            "x86-gateway"} <= set(profiles)  # fmt: skip
    assert get_profile("raspberry-pi-5").runtimes["tflite"].package == "ai-edge-litert"


def test_the_docs_table_is_the_data_file() -> None:
    text = DOC.read_text(encoding="utf-8")
    before, _, rest = text.partition(BEGIN)
    _, _, after = rest.partition(END)
    fresh = f"{before}{BEGIN}\n{_markdown_table()}\n{END}{after}"
    if os.environ.get("EDGESHIP_WRITE_DOCS"):
        DOC.write_text(fresh, encoding="utf-8")
        return
    assert text == fresh, "docs/devices.md is stale: rerun this test with EDGESHIP_WRITE_DOCS=1"


def _file(**changes: object) -> bytes:
    raw = json.loads((Path(__file__).resolve().parents[2] / "sdk" / "profiles.json").read_bytes())
    raw["profiles"]["raspberry-pi-5"].update(changes)
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{", "not valid JSON"),
        (b'{"schema": 1, "schema": 1, "profiles": {}}', "duplicate keys"),
        (b'{"schema": 2, "profiles": {}}', '"schema": 1'),
        (_file(os="windows"), "os must be one of linux, darwin, ios"),
        (_file(glibc=None), "glibc is given for linux and only for linux"),
        (_file(runtimes={"tensorrt": {"package": "tensorrt", "version": "10", "source": "pypi"}}), "unknown targets"),
        (_file(runtimes={"onnxruntime": {"package": "onnxruntime", "version": "1.17.3", "source": "pypi"}}),
         "onnxruntime 1.17.3 needs numpy<2"),
        (_file(runtimes={"onnxruntime": {"package": "onnxruntime", "version": "latest", "source": "pypi"}}),
         "dotted release number"),
        (_file(colour="red"), "unknown keys ['colour']"),
    ],
)  # fmt: skip
def test_a_bad_profiles_file_is_refused_naming_the_field(data: bytes, reason: str) -> None:
    with pytest.raises(InputError) as err:
        parse_profiles(data)
    assert reason in str(err.value)


def test_runtime_specs() -> None:
    spec = parse_runtime_spec("onnxruntime-gpu==1.20")
    assert (spec.target, spec.package, spec.version) == ("onnxruntime", "onnxruntime-gpu", "1.20")
    with pytest.raises(InputError, match="not a release number"):
        parse_runtime_spec("onnxruntime==latest")


def test_a_profile_capabilities_pass_the_fleet_rule() -> None:
    pi = get_profile("raspberry-pi-5").capabilities()
    bundle = {"target": "onnxruntime", "package": "onnxruntime", "min_version": "1.17.0", "arch": ["aarch64"]}
    from sdk.compat import RuntimeFacts

    assert why_incompatible(RuntimeFacts.from_dict(bundle), pi) is None


def test_edgeship_devices_prints_the_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["device", "arch", "os"] and "jetson-orin-jetpack6" in out
    assert main(["devices", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["iphone-ios17"]["runtimes"]["coreml"]["source"] == "system"
