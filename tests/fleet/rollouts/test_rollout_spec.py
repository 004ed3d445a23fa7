"""The rollout spec: what users type, parsed once; every bad input refused with the valid choices."""

from __future__ import annotations

import pytest

from fleet.rollouts.spec import RolloutSpec, parse_duration, parse_gate, parse_spec, parse_waves
from sdk.errors import InputError


def test_a_full_request_parses_and_round_trips_through_json() -> None:
    spec = parse_spec(
        "digits:5", "tag=site=lab", "1,10%,50%,100%", soak="5m",
        gates=["health_failures=0", "error_rate<=1%", "p95_latency<=1.2x", "p95_latency<=50ms", "silence=5m"],
        rate_per_s=20, wave_timeout="10m",
    )  # fmt: skip
    assert (spec.release_name, spec.release_version, spec.soak_s, spec.wave_timeout_s) == ("digits", 5, 300, 600)
    assert [w.text for w in spec.waves] == ["1", "10%", "50%", "100%"]
    gates = {g.text: g for g in spec.gates}
    assert gates["error_rate<=1%"].threshold == pytest.approx(0.01)
    assert gates["p95_latency<=1.2x"].relative and gates["p95_latency<=1.2x"].threshold == 1.2
    assert not gates["p95_latency<=50ms"].relative and gates["p95_latency<=50ms"].threshold == 50
    assert gates["silence=5m"].threshold == 300
    assert RolloutSpec.from_json(spec.to_json()) == spec
    assert spec.wave_sizes(100) == [1, 10, 50, 100]
    assert spec.wave_sizes(20) == [1, 2, 10, 20]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("latency<=5ms", ["unknown metric 'latency'", "health_failures", "error_rate", "p95_latency", "silence"]),
        ("error_rate>=1%", ["error_rate takes <= or <"]),
        ("silence<=5m", ["silence takes ="]),
        ("error_rate<=lots", ["percentage (1%) or a fraction"]),
        ("error_rate<=150%", ["at most 100%"]),
        ("p95_latency<=fast", ["ratio to the previous version"]),
        ("health_failures=0.5", ["whole number"]),
        ("silence=soon", ["not a duration"]),
        ("nonsense", ["METRIC<=VALUE"]),
    ],
)
def test_a_bad_gate_is_refused_with_the_choices(text: str, words: list[str]) -> None:
    with pytest.raises(InputError) as e:
        parse_gate(text)
    for word in words:
        assert word in str(e.value)


@pytest.mark.parametrize(
    ("waves", "words"),
    [
        ("1,,100%", "wave 2 of '1,,100%' is empty"),
        ("", "wave 1 of '' is empty"),
        ("1,10%,50%", "the last wave must reach 100%"),
        ("10%,5%,100%", "must increase: 10% then 5%"),
        ("5,2,100%", "must increase: 5 then 2"),
        ("0,100%", "count >= 1"),
        ("1,0%,100%", "above 0%"),
        ("1,abc,100%", "count >= 1 or a percentage"),
        ("1,120%", "at most 100%"),
    ],
)
def test_bad_waves_are_refused(waves: str, words: str) -> None:
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_waves(waves)


def test_waves_that_do_not_fit_the_selected_devices_are_refused_with_the_sizes() -> None:
    spec = parse_spec("m:1", "all", "1,10%,50%,100%")
    with pytest.raises(InputError, match=r"wave 2 \(10%\) adds no device: of 3 devices the waves reach 1=1, 10%=1"):
        spec.wave_sizes(3)
    with pytest.raises(InputError, match="matches no device"):
        spec.wave_sizes(0)
    with pytest.raises(InputError, match="asks for 5 devices; the selector matches 3"):
        parse_spec("m:1", "all", "5,100%").wave_sizes(3)
    with pytest.raises(InputError, match=r"reaches 2 of 3 devices; end at 100%"):
        parse_spec("m:1", "all", "1,2").wave_sizes(3)
    assert parse_spec("m:1", "all", "1,3").wave_sizes(3) == [1, 3]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"release": "digits"}, "NAME:VERSION"),
        ({"release": "digits:v5"}, "NAME:VERSION"),
        ({"release": ":5"}, "NAME:VERSION"),
        ({"devices": "  "}, "selector is required"),
        ({"soak": "forever"}, "soak 'forever' is not a duration"),
        ({"rate_per_s": 0}, "rate_per_s must be above 0"),
        ({"rate_per_s": float("nan")}, "rate_per_s must be above 0"),
        ({"wave_timeout": "0s"}, "above 0 s"),
        ({"baseline": "0"}, "the baseline must be above 0 s and at most 7d"),
        ({"baseline": "8d"}, "the baseline must be above 0 s and at most 7d"),
        ({"baseline": "soon"}, "baseline 'soon' is not a duration"),
        ({"gates": ["error_rate<=1%", "error_rate<=2%"]}, "gated twice"),
    ],
)
def test_bad_requests_are_refused(kwargs: dict[str, object], words: str) -> None:
    args: dict[str, object] = {"release": "digits:5", "devices": "all", "waves": "1,100%"}
    args.update(kwargs)
    release, devices, waves = args.pop("release"), args.pop("devices"), args.pop("waves")
    with pytest.raises(InputError, match=words):
        parse_spec(str(release), str(devices), str(waves), **args)  # type: ignore[arg-type]


def test_durations() -> None:
    assert [parse_duration(t) for t in ("30s", "5m", "1h", "250ms", "2d", "12", "1.5m")] == [
        30, 300, 3600, 0.25, 172800, 12, 90
    ]  # fmt: skip


def test_a_spec_without_a_health_failures_gate_gets_health_failures_0_stored_and_reloaded() -> None:
    spec = parse_spec("m:2", "all", "1,100%", gates=["error_rate<=1%"])
    assert [g.text for g in spec.gates] == ["health_failures=0", "error_rate<=1%"]
    assert spec.to_json()["gates"] == ["health_failures=0", "error_rate<=1%"]
    # a spec stored before the rule existed gets it when it is loaded
    stored = {**spec.to_json(), "gates": ["error_rate<=1%"]}
    assert [g.text for g in RolloutSpec.from_json(stored).gates] == ["health_failures=0", "error_rate<=1%"]
    assert RolloutSpec.from_json(spec.to_json()) == spec
    assert [g.text for g in parse_spec("m:2", "all", "1,100%", gates=["health_failures<=3"]).gates] == [
        "health_failures<=3"
    ]


def test_the_baseline_window_is_part_of_the_spec_and_survives_storage() -> None:
    assert parse_spec("m:2", "all", "1,100%").baseline_s == 3600.0
    spec = parse_spec("m:2", "all", "1,100%", baseline="30m")
    assert spec.baseline_s == 1800.0 and RolloutSpec.from_json(spec.to_json()).baseline_s == 1800.0
