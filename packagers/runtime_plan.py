"""Build for a device runtime: ``--for onnxruntime==1.17`` or ``--device raspberry-pi-5``.

``plan_runtimes`` turns the request into one ``RuntimePlan`` per target and refuses, before any work, what
that runtime cannot run (a target the device has no runtime for, a precision or export opset newer than
the release, an ORT-format file for an older ONNX Runtime, a Core ML precision the OS lacks), naming why.
``apply_plans`` returns the options the build then uses (the export opset, Core ML's deployment target),
and ``fit_built`` checks each built model against the release: its ``runtime.min_version``, derived from
the model by the target (``sdk.runtime_versions``), must not be newer, so a device running that release
(``sdk.compat.why_incompatible``) takes it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from packagers.options import PackageOptions, Precision, Target
from packagers.registry import BuiltModel
from sdk.compat import version_at_least
from sdk.errors import EdgeshipError, PackagingError
from sdk.profiles import DeviceProfile, get_profile, parse_runtime_spec
from sdk.runtime_versions import (
    COREML_MIN_OS,
    COREML_ML_PROGRAM_MIN_OS,
    DEFAULT_OPSET,
    ORT_PRECISION_SINCE,
    ORT_RELEASES,
    ort_limits,
)

__all__ = ["RuntimePlan", "apply_plans", "fit_built", "plan_runtimes"]

_COREML_OS = re.compile(r"(?i)(ios|macos)(\d+)")


@dataclass(frozen=True)
class RuntimePlan:
    """The runtime release one target's bundles are built for."""

    target: Target
    package: str | None  # the distribution asked for (None: the target's usual one)
    version: str | None  # None: any release (only the device's targets are checked)
    device: str | None = None  # the profile it came from
    coreml_os: tuple[str, int] | None = None  # Core ML: ("ios" | "darwin", major) the model must load on

    def label(self) -> str:
        what = f"{self.package or self.target.value}" + (f" {self.version}" if self.version else "")
        return f"{what} (device {self.device})" if self.device else what


def _coreml_os(plan_version: str | None, profile: DeviceProfile | None) -> tuple[str, int] | None:
    if profile is not None and profile.os in ("ios", "darwin"):
        return profile.os, int(profile.os_version.split(".")[0])
    match = _COREML_OS.fullmatch(plan_version or "")
    if match is None:
        return None
    return ("ios" if match.group(1).lower() == "ios" else "darwin"), int(match.group(2))


def _deployment_target(os_major: tuple[str, int]) -> str:
    kind, major = os_major
    return f"iOS{major}" if kind == "ios" else f"macOS{major}"


def _requested(options: PackageOptions) -> tuple[list[RuntimePlan], DeviceProfile | None]:
    if options.for_runtime and options.device:
        raise PackagingError("give --for (a runtime release) or --device (a profile), not both")
    try:
        if options.for_runtime:
            spec = parse_runtime_spec(options.for_runtime)
            target = Target.parse(spec.target)
            return [RuntimePlan(target, spec.package, spec.version, None, _coreml_os(spec.version, None))], None
        assert options.device is not None
        profile = get_profile(options.device)
    except EdgeshipError as e:
        raise PackagingError(str(e)) from e
    plans = [
        RuntimePlan(Target.parse(t), r.package, r.version if t != "coreml" or r.source == "pypi" else None,
                    profile.name, _coreml_os(None, profile) if t == "coreml" else None)
        for t, r in profile.runtimes.items()
    ]  # fmt: skip
    return plans, profile


def _refuse(plan: RuntimePlan, precision: Precision, options: PackageOptions) -> list[str]:
    """Why ``plan``'s runtime cannot run ``precision`` built with ``options``; empty: it can."""
    why: list[str] = []
    if plan.target is Target.ONNXRUNTIME and plan.version is not None:
        limits = ort_limits(plan.version)
        if limits is None:
            oldest = ORT_RELEASES[0].version
            return [f"{plan.label()}: releases before {oldest} are not supported (no opset table)"]
        since = ORT_PRECISION_SINCE.get(precision.value)
        if since is not None and not version_at_least(plan.version, since):
            why.append(f"{plan.label()} cannot run {precision.value}: it needs onnxruntime >= {since}")
        if options.opset is not None and options.opset > limits[0]:
            why.append(f"{plan.label()} runs ONNX opsets up to {limits[0]}; opset {options.opset} was asked")
        if options.extra.get("ort_format") is True:
            why.append(f"{plan.label()}: an ORT-format model is tied to the onnxruntime that converts it; "
                       "drop extra ort_format")  # fmt: skip
    if plan.target is Target.COREML and plan.coreml_os is not None:
        kind, major = plan.coreml_os
        floor = COREML_ML_PROGRAM_MIN_OS[kind]
        if major < floor:
            why.append(f"{plan.label()}: Core ML ML programs need {_deployment_target((kind, floor))} or later")
        floors = COREML_MIN_OS.get(precision.value)
        need = None if floors is None else floors.get(kind)
        if need is not None and major < need:
            why.append(f"{plan.label()} cannot run {precision.value}: it needs {_deployment_target((kind, need))}")
        asked = options.extra.get("minimum_deployment_target")
        asked_os = _coreml_os(str(asked), None) if asked is not None else None
        if asked_os is not None and (asked_os[0] != kind or asked_os[1] > major):
            why.append(f"{plan.label()}: minimum_deployment_target {asked} does not load on "
                       f"{_deployment_target(plan.coreml_os)}")  # fmt: skip
    return why


def plan_runtimes(
    options: PackageOptions, targets: Sequence[Target], precisions: Sequence[Precision]
) -> dict[Target, RuntimePlan]:
    """The runtime release each target builds for, from ``options.for_runtime`` or ``options.device``.

    Returns:
        target -> plan; empty when neither option is set.

    Raises:
        PackagingError: every reason the request cannot run there, joined (no work has been done).
    """
    if not options.for_runtime and not options.device:
        return {}
    plans, profile = _requested(options)
    by_target = {p.target: p for p in plans}
    refusals: list[str] = []
    for t in targets:
        if t not in by_target:
            if profile is not None:
                runs = ", ".join(p.target.value for p in plans)
                refusals.append(f"device {profile.name} has no {t.value} runtime; it runs: {runs}")
            else:
                refusals.append(f"--for {options.for_runtime} builds {plans[0].target.value} bundles, "
                                f"not {t.value}")  # fmt: skip
            continue
        refusals += [why for p in precisions for why in _refuse(by_target[t], p, options)]
    if refusals:
        raise PackagingError("; ".join(dict.fromkeys(refusals)))
    return {t: by_target[t] for t in targets}


def apply_plans(options: PackageOptions, plans: Mapping[Target, RuntimePlan]) -> PackageOptions:
    """``options`` with the export opset every ONNX Runtime plan runs and Core ML's deployment target set.

    The opset is the one asked for, else the default (17) lowered to the oldest planned release's limit.
    Core ML's ``minimum_deployment_target`` is the device's OS unless one (no newer) was given.
    """
    opset = options.opset
    if opset is None:
        limits = [ort_limits(p.version) for p in plans.values() if p.target is Target.ONNXRUNTIME and p.version]
        opset = min([DEFAULT_OPSET, *(lim[0] for lim in limits if lim is not None)])
    extra = dict(options.extra)
    coreml = plans.get(Target.COREML)
    if coreml is not None and coreml.coreml_os is not None and "minimum_deployment_target" not in extra:
        extra["minimum_deployment_target"] = _deployment_target(coreml.coreml_os)
    return replace(options, opset=opset, extra=extra)


def _graph_versions(path: Any) -> tuple[int, int]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return int(opset), int(proto.ir_version)


def fit_built(built: BuiltModel, plan: RuntimePlan) -> BuiltModel:
    """Check a built model against ``plan``'s release.

    The target derived the bundle's ``runtime.min_version`` from the model itself (``sdk.runtime_versions``);
    it must not be newer than the release asked for. ONNX graphs are also read back (opset, IR version)
    for a refusal that names what the release lacks. The minimum stays the model's own, so a device on
    the release asked for, or any later one, takes the bundle.

    Raises:
        PackagingError: the built model needs a newer release than ``plan`` names.
    """
    if plan.version is None or plan.target is Target.COREML:
        return built
    needed = built.runtime.get("min_version")
    recipe = {**built.recipe, "built_for": {"runtime": plan.label(), "min_version": needed,
                                            "built_with": built.runtime.get("built_with")}}  # fmt: skip
    if plan.target is Target.ONNXRUNTIME and not built.member.endswith(".ort"):
        limits = ort_limits(plan.version)
        assert limits is not None  # plan_runtimes refused releases older than the table
        opset, ir = _graph_versions(built.path)
        if opset > limits[0] or ir > limits[1]:
            raise PackagingError(
                f"{plan.label()} runs ONNX opset <= {limits[0]} and IR version <= {limits[1]}; the "
                f"{built.candidate} model has opset {opset}, IR version {ir}"
            )
        recipe["built_for"].update(opset=opset, ir_version=ir, max_opset=limits[0], max_ir_version=limits[1])
    if needed is not None and not version_at_least(plan.version, str(needed)):
        reasons = "; ".join((built.recipe.get("runtime_requirement") or {}).get("reasons") or []) or "the model"
        raise PackagingError(
            f"{plan.label()}: the {built.candidate} model needs {plan.package or plan.target.value} >= {needed} "
            f"({reasons}); build another precision or for a newer release"
        )
    return replace(built, recipe=recipe)
