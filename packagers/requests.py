"""What a ``package`` call asks for, checked before any work: the (target, precision) pairs, and the refusals.

Precisions come as one list for every target (``"fp32,int8"``), per target (``{"onnxruntime": ["fp32",
"int8-dynamic"], "openvino": "int8"}`` or the CLI's ``"onnxruntime=fp32,int8-dynamic"``), or as ``all-int8``:
every int8-family precision a target supports, the pairs it does not support skipped with a note. A plain
list keeps its old meaning: every target must support every precision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from packagers.options import Precision, Target
from packagers.registry import get_packager
from sdk.bundle import BUNDLE_SUFFIX
from sdk.errors import PackagingError

__all__ = ["ALL_INT8", "INT8_FAMILY", "Pairs", "check_calibration", "check_overwrite", "is_generated", "parse_pairs"]

ALL_INT8 = "all-int8"  # the precision word for every int8-family precision a target supports
INT8_FAMILY = (Precision.INT8, Precision.INT8_DYNAMIC, Precision.INT8_WEIGHTS)

Pairs = list[tuple[Target, Precision]]


def _words(value: Any) -> list[str]:
    """``value`` as a flat list of strings: a string, an enum member, or a sequence of them."""
    items = [value] if isinstance(value, (str, Target, Precision)) else list(value)
    return [str(v.value if isinstance(v, (Target, Precision)) else v).strip() for v in items]


def _split(words: Sequence[str]) -> list[str]:
    return [part.strip() for w in words for part in w.split(",") if part.strip()]


def _targets(target: Any) -> list[Target]:
    out: list[Target] = []
    for t in (Target.parse(w) for w in _split(_words(target))):
        if t not in out:
            out.append(t)
    if not out:
        raise PackagingError("at least one target and one precision are needed")
    return out


def _per_target(precision: Any, targets: Sequence[Target]) -> dict[Target, list[str]]:
    """Target -> its precision words, from one list (every target) or a per-target form."""
    if isinstance(precision, Mapping):
        given = {Target.parse(k): _split(_words(v)) for k, v in precision.items()}
    else:
        words = _words(precision)
        keyed = [w for w in words if "=" in w]
        if not keyed:
            return {t: _split(words) for t in targets}
        if len(keyed) != len(words):
            raise PackagingError(
                "--precision is either one list for every target (fp32,int8) or per target "
                "(onnxruntime=fp32,int8-dynamic), not both"
            )
        given = {}
        for w in keyed:
            name, _, rest = w.partition("=")
            given.setdefault(Target.parse(name), []).extend(_split([rest]))
    unknown = [t.value for t in given if t not in targets]
    if unknown:
        names = ", ".join(t.value for t in targets)
        raise PackagingError(f"--precision names target(s) {', '.join(unknown)} not in --target ({names})")
    missing = [t.value for t in targets if not given.get(t)]
    if missing:
        raise PackagingError(f"no precision given for target(s) {', '.join(missing)}; add --precision TARGET=...")
    return given


def parse_pairs(target: Any, precision: Any, kind: str) -> tuple[list[Target], Pairs, list[str]]:
    """The targets, the (target, precision) pairs to build in order, and notes about pairs skipped.

    Raises:
        PackagingError: an unknown target or precision, a precision a target does not support (asked by
            name), a model kind a target cannot build from, or a request that leaves nothing to build.
    """
    targets = _targets(target)
    pairs: Pairs = []
    notes: list[str] = []
    refusals: list[str] = []
    for t, words in _per_target(precision, targets).items():
        caps = get_packager(t).capabilities
        for word in words:
            if word.lower() == ALL_INT8:
                family = [p for p in INT8_FAMILY if p in caps.precisions]
                skipped = [p.value for p in INT8_FAMILY if p not in caps.precisions]
                if skipped:
                    notes.append(f"{t.value} does not support {', '.join(skipped)}: skipped ({ALL_INT8})")
                chosen = family
            else:
                chosen = [Precision.parse(word)]
            for p in chosen:
                why = caps.refuse(t, p, kind)
                if why:
                    refusals.append(why)
                elif (t, p) not in pairs:
                    pairs.append((t, p))
    if refusals:
        raise PackagingError("; ".join(dict.fromkeys(refusals)))
    if not pairs:
        raise PackagingError("nothing to build: " + "; ".join(notes) if notes else "at least one precision is needed")
    return targets, pairs, notes


def check_calibration(pairs: Pairs, calibration: Any, allow_random: bool) -> None:
    """Refuse static int8 without calibration data unless generated data was explicitly allowed.

    Raises:
        PackagingError: int8 was asked for, no calibration data was given, and ``allow_random`` is False.
    """
    if calibration is None and not allow_random and any(p is Precision.INT8 for _, p in pairs):
        raise PackagingError(
            "static int8 is calibrated on data and none was given: pass --calibration with a few hundred of your "
            "real inputs (calibration=...), use int8-dynamic (no calibration), or pass --allow-random-calibration "
            "(allow_random_calibration=True) to calibrate on generated data, marked so in the table, manifest "
            "and report"
        )


def check_overwrite(out_dir: Path, name: str, version: int, pairs: Pairs, overwrite: bool) -> None:
    """Refuse to replace a bundle of the same name, version, target and precision unless told to.

    Raises:
        PackagingError: such a bundle is in ``out_dir`` and ``overwrite`` is False.
    """
    if overwrite:
        return
    paths = [out_dir / f"{name}-{version}-{t.value}-{p.value}{BUNDLE_SUFFIX}" for t, p in pairs]
    existing = [path.name for path in paths if path.exists()]
    if existing:
        raise PackagingError(
            f"{', '.join(existing)} already in {out_dir}: a signed bundle is not replaced silently (devices take "
            "versions as monotonic); raise --version, or pass --overwrite (overwrite=True) to replace it"
        )


def is_generated(data_origin: str | None) -> bool:
    """Whether validation (and calibration) ran on generated data rather than the caller's.

    Every source names the caller's data "calibration ..." (``packagers.sources``); anything else (random
    arrays, built-in sentences, synthetic images) was made up by the packager. None (not recorded): False.
    """
    return bool(data_origin) and "calibration" not in str(data_origin)
