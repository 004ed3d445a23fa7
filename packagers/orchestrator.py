"""``package``: the one orchestrator that turns a model into signed bundles.

Order: parse and refuse unsupported requests (no work done), load keys, load the source, compute
the reference outputs, then per (target, precision) build candidates, validate each in the real
runtime and keep the best. Only when every combination passed (or drift was accepted) are golden
arrays, benchmarks and bundles produced, so a DriftError leaves no bundle behind. Scratch files live
in a temporary folder that is always removed.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from packagers.benchmark import benchmark
from packagers.mixed_precision import Chosen, needs_search, search_faster_recipe, search_float_layers
from packagers.options import PackageOptions, PackageResult, Precision, Target, Tolerances
from packagers.registry import BuiltModel, CandidateFailed, Packager, Runner, get_packager
from packagers.report import write_reports
from packagers.requests import check_calibration, check_overwrite, is_generated, parse_pairs
from packagers.runtime_plan import apply_plans, fit_built, plan_runtimes
from packagers.sources import Source, detect_input_kind, load_source
from packagers.sources.data import generated_hint
from packagers.validate_on import ValidateOn, validate_bundle
from packagers.validate_on import prepare as prepare_validate_on
from packagers.validation import MASK_INPUT, ValidationUnavailable, compare_outputs, golden_tolerance, run_batched
from sdk.bundle import bundle_filename, write_bundle
from sdk.errors import DriftError, KeyFileError, ManifestError, PackagingError
from sdk.golden import check_golden
from sdk.manifest import Manifest, TensorSpec, format_time
from sdk.sections import Golden, InputPolicy, Preprocessing, Runtime, Validation
from sdk.signing import KeySigner, Signer, as_signer

__all__ = ["package"]

KeyLike = str | os.PathLike[str] | Ed25519PrivateKey | Signer


@dataclass
class _Plan:
    """One (target, precision) after validation, before the bundle is written."""

    target: Target
    precision: Precision
    packager: Packager
    built: BuiltModel
    run: Runner | None  # None: this host cannot run the target's runtime (structure checked only)
    tolerances: Tolerances
    validation: dict[str, Any]
    candidates: list[dict[str, Any]]


def _load_keys(key: KeyLike | Sequence[KeyLike]) -> list[Signer]:
    items: list[KeyLike]
    if isinstance(key, (str, os.PathLike, Ed25519PrivateKey, Signer)):
        items = [key]
    else:
        items = list(key)
    if not items:
        raise KeyFileError("at least one signing key is needed")
    # A path is decrypted with $EDGESHIP_KEY_PASSPHRASE if it is encrypted; else pass a KeySigner.
    return [KeySigner.from_file(k) if isinstance(k, (str, os.PathLike)) else as_signer(k) for k in items]


def _check_identity(name: str, version: int, label: str | None, expires: datetime | None) -> str | None:
    """Validate what the manifest will say about the bundle before doing any work."""
    if expires is not None:
        if not isinstance(expires, datetime) or expires.tzinfo is None:
            raise PackagingError("expires must be a timezone-aware datetime")
        if expires <= datetime.now(timezone.utc):
            raise PackagingError(f"expires {expires.isoformat()} is in the past")
    expires_text = format_time(expires) if expires is not None else None
    try:
        Manifest(
            name=name, version=version, target="onnxruntime", precision="fp32", model="model.onnx",
            inputs=(TensorSpec("x", "float32", (1,)),), outputs=(TensorSpec("y", "float32", (1,)),),
            created=format_time(datetime.now(timezone.utc)), label=label, expires=expires_text,
        )  # fmt: skip
    except ManifestError as e:
        raise PackagingError(str(e)) from e
    return expires_text


def _check_labels(labels: Any, calibration: Any) -> np.ndarray | None:
    if labels is None:
        return None
    if calibration is None:
        raise PackagingError("labels score the calibration samples; give calibration data with them")
    arr = np.asarray(labels)
    if arr.ndim not in (1, 2) or arr.dtype.kind not in "iu":  # 2-D: one label per token, -100 = not scored
        raise PackagingError(
            f"labels must be a 1-D (2-D: per token) array of int class ids, got {arr.dtype} {arr.shape}"
        )
    return arr


def _safe_name(name: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "tensor"
    candidate, i = base[:100], 1
    while candidate in used:
        candidate, i = f"{base[:96]}_{i}", i + 1
    used.add(candidate)
    return candidate


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _min_cosine(validation: Mapping[str, Any]) -> float:
    values = [m.get("cosine_min") for m in validation["metrics"].values()]
    return min((v if v is not None else -2.0) for v in values) if values else -2.0


def _failure(candidate: str, stage: str, reason: str) -> dict[str, Any]:
    return {"candidate": candidate, "passed": False, "stage": stage, "reason": reason[:400]}


def _validate_candidates(
    packager: Packager, tried: Sequence[BuiltModel | CandidateFailed], source: Source,
    inputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], tol: Tolerances,
    labels: np.ndarray | None, options: PackageOptions, say: Callable[[str], None], tag: str,
) -> tuple[Chosen | None, list[dict[str, Any]], list[Chosen]]:  # fmt: skip
    """The best candidate (passed first, then the highest worst-output cosine), every candidate's outcome,
    and the other candidates that ran (with their runners: the mixed-precision search may try them).

    A candidate that failed to build, that the runtime cannot load, or that fails on the validation inputs
    is dropped with its stage and reason (said, and kept for the report); None when none was left.
    """
    best: tuple[BuiltModel, Runner, dict[str, Any]] | None = None
    summary: list[dict[str, Any]] = []
    ran: list[Chosen] = []
    for built in tried:
        if isinstance(built, CandidateFailed):
            summary.append(_failure(built.candidate, built.stage, built.reason))
            say(f"{tag}: candidate {built.candidate} dropped ({built.stage}: {built.reason[:200]})")
            continue
        try:
            run = packager.runner(built)
        except ValidationUnavailable as e:  # nothing to compare candidates with here: keep the first
            numeric = {"ran": False, "reason": e.reason}
            result: dict[str, Any] = {"metrics": {}, "passed": True, "failures": [], "numeric": numeric,
                                      "structure": e.structure}  # fmt: skip
            return (built, None, result), [*summary, {"candidate": built.candidate, "passed": True,
                                                       "numeric": False}], []  # fmt: skip
        except Exception as e:  # PackagingError from the loader, or the runtime's own error types
            summary.append(_failure(built.candidate, "load", str(e)))
            say(f"{tag}: candidate {built.candidate} dropped (the runtime cannot load it: {str(e)[:200]})")
            continue
        try:
            outputs = run_batched(run, inputs)
        except Exception as e:  # the runtime failed on valid inputs: this build is broken
            reason = (f"failed to run on {len(next(iter(inputs.values())))} samples: {str(e)[:300]} "
                      "(a shape fixed at export time? trace with example inputs of batch >= 2)")  # fmt: skip
            summary.append(_failure(built.candidate, "run", reason))
            say(f"{tag}: candidate {built.candidate} dropped ({reason[:200]})")
            continue
        mask = inputs.get(MASK_INPUT) if any(s.name == MASK_INPUT for s in source.inputs) else None
        result = compare_outputs(source.outputs, reference, outputs, tol, labels=labels,
                                 labels_output=options.labels_output, mask=mask)  # fmt: skip
        entry: dict[str, Any] = {"candidate": built.candidate, "passed": result["passed"],
                                 "min_cosine": _min_cosine(result)}  # fmt: skip
        if not result["passed"]:
            entry.update(stage="validate", reason="; ".join(str(f) for f in result["failures"])[:400])
        summary.append(entry)
        ran.append((built, run, result))
        key = (result["passed"], _min_cosine(result))
        if best is None or key > (best[2]["passed"], _min_cosine(best[2])):
            best = (built, run, result)
    return best, summary, [c for c in ran if best is None or c[0] is not best[0]]


def _no_candidate(tag: str, summary: Sequence[Mapping[str, Any]]) -> str:
    reasons = "; ".join(f"{c['candidate']} ({c.get('stage', '?')}): {c.get('reason', '?')}" for c in summary)
    return f"{tag}: no candidate could be built, loaded and run: {reasons or 'the packager built nothing'}"


# What to try when a quantized precision misses its tolerance: the precisions that keep more in float.
_MORE_FLOAT = {
    Precision.INT8: (Precision.INT8_DYNAMIC, Precision.INT8_WEIGHTS, Precision.FP16),
    Precision.INT8_DYNAMIC: (Precision.INT8_WEIGHTS, Precision.FP16),
    Precision.INT8_WEIGHTS: (Precision.FP16,),
    Precision.INT4: (Precision.INT8_WEIGHTS, Precision.FP16),
}


def _what_to_try(plan: _Plan, plans: list[_Plan]) -> str:
    """For a failed quantized plan: the search's cap, and the target's precisions that keep more in float."""
    hints = []
    search = plan.built.recipe.get("mixed_precision")
    if isinstance(search, Mapping) and search.get("cap"):  # the search ran (a cap above 0) and still failed
        hints.append(f"the search kept up to {search['cap']} of {search['quantized_layers']} layers float: "
                     "raise --max-float-layers")  # fmt: skip
    offered = [p for p in _MORE_FLOAT.get(plan.precision, ()) if p in plan.packager.capabilities.precisions]
    if offered:
        passed = {p.precision for p in plans if p.target is plan.target and p.validation["passed"]}
        names = ", ".join(p.value + (" (passed in this run)" if p in passed else "") for p in offered)
        hints.append(f"or one that keeps more in float: {names} (--precision {plan.target.value}="
                     f"{offered[0].value})")  # fmt: skip
    return f" ({'; '.join(hints)})" if hints else ""


def _drift_message(failed: list[_Plan], plans: list[_Plan]) -> str:
    lines = []
    for plan in failed:
        lines.append(f"{plan.target.value} {plan.precision.value}: " + "; ".join(plan.validation["failures"])
                     + _what_to_try(plan, plans))  # fmt: skip
    return (
        "validation failed, nothing was written: " + " | ".join(lines)
        + ". Check the model and the data, or sign anyway with --accept-drift (accept_drift=True)."
    )  # fmt: skip


def package(
    model: Any,
    *,
    name: str,
    version: int,
    key: KeyLike | Sequence[KeyLike],
    out_dir: str | os.PathLike[str],
    target: str | Target | Sequence[str | Target] = "onnxruntime",
    precision: str | Precision | Sequence[str | Precision] | Mapping[str, Any] = "fp32",
    example_inputs: Any = None,
    calibration: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    labels: Any = None,
    task: str | None = None,
    accept_drift: bool = False,
    label: str | None = None,
    expires: datetime | None = None,
    options: PackageOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[PackageResult]:
    """Build, validate, benchmark, sign and write one bundle per (target, precision).

    Args:
        model: a torch.nn.Module, a transformers model folder, or an .onnx file.
        name: bundle name (letters, digits, ``.``, ``_``, ``-``).
        version: monotonic integer version of ``name``.
        key: what signs, or a list of them (all sign): an ``sdk.signing.Signer`` (a ``KeySigner``, an
            HSM or KMS adapter), an ``Ed25519PrivateKey``, or a key file path (an encrypted one is
            decrypted with ``$EDGESHIP_KEY_PASSPHRASE``; else pass ``KeySigner.from_file(path, passphrase)``).
        out_dir: folder the bundles are written into.
        target: target name(s): a string (comma-separated allowed), a Target, or a sequence.
        precision: precision name(s), same forms, for every target; or per target, as a mapping target -> names
            or strings ``"onnxruntime=fp32,int8-dynamic"``; ``"all-int8"``: every int8-family precision each
            target supports (the others skipped with a note). Static ``int8`` needs ``calibration`` (or
            ``options.allow_random_calibration``).
        example_inputs: torch modules only: a tuple of tensors/arrays or a dict name -> array, batch first.
        calibration: dict name -> array (batch N), an .npz file or a folder of NAME.npy; validation data.
        labels: int class label per calibration sample; adds task accuracy to the validation.
        task: transformers folders: one of ``packagers.sources.TASKS`` (default from the config's architecture).
        accept_drift: sign even when validation fails; recorded in the manifest.
        label: optional human version label.
        expires: optional aware datetime after which devices refuse the bundle.
        options: less common settings (names, opset, tolerances, golden samples, benchmark runs), and the
            device runtime to build for (``for_runtime="onnxruntime==1.17"`` or ``device="raspberry-pi-5"``).
        progress: called with a short line at each step.

    Returns:
        One PackageResult per (target, precision), in the order asked.

    Raises:
        PackagingError: unsupported target/precision/input kind, or one the requested device runtime cannot
            run, static int8 without calibration data, a bundle of the same name, version, target and
            precision already in ``out_dir`` without ``options.overwrite`` (all before any work), a built
            model newer than that runtime, a model or data that cannot be loaded, or no (target, precision)
            with a candidate that built, loaded and ran (each candidate's reason is listed). A pair whose
            candidates all failed while others succeeded is skipped with a note (progress, report.json).
        DriftError: validation failed and ``accept_drift`` is False; no bundle is written.
        KeyFileError: a signing key cannot be loaded (or is encrypted with no passphrase), or a signer
            failed or returned a signature its public key does not verify.
    """
    say = progress or (lambda _line: None)
    opts = options or PackageOptions()
    kind = detect_input_kind(model)
    targets, pairs, notes = parse_pairs(target, precision, kind)  # refuses what no target can build
    packagers = {t: get_packager(t) for t in targets}
    runtime_plans: dict[Target, Any] = {}
    for t in targets:  # refuses what the device's runtime cannot run
        runtime_plans.update(plan_runtimes(opts, [t], [p for tt, p in pairs if tt is t]))
    if runtime_plans:
        opts = apply_plans(opts, runtime_plans)
        say("building for " + ", ".join(p.label() for p in runtime_plans.values()) + f" (ONNX opset {opts.opset})")
    for note in notes:
        say(note)
    check_calibration(pairs, calibration, opts.allow_random_calibration)
    expires_text = _check_identity(name, version, label, expires)
    check_overwrite(Path(out_dir), name, version, pairs, opts.overwrite)
    label_array = _check_labels(labels, calibration)
    keys = _load_keys(key)
    out = Path(out_dir)
    validate_on = prepare_validate_on(opts.validate_on, targets, say) if opts.validate_on else None

    with tempfile.TemporaryDirectory(prefix="edgeship-package-") as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        source = load_source(model, kind, task=task, example_inputs=example_inputs, calibration=calibration,
                             options=opts, progress=say)  # fmt: skip
        try:
            source.workdir = tmp / "source"
            generated = is_generated(source.data_origin)
            if label_array is not None and len(label_array) != source.samples:
                raise PackagingError(f"{len(label_array)} labels for {source.samples} calibration samples")
            n = min(source.samples, opts.max_validation_samples)
            inputs = {k: v[:n] for k, v in source.validation_inputs.items()}
            label_array = label_array[:n] if label_array is not None else None
            say(f"running the reference ({source.reference_name}) on {n} samples")
            try:
                reference = run_batched(source.reference, inputs)
            except PackagingError:
                raise
            except Exception as e:  # the user's model failed on the validation data
                guessed = source.info.get("guessed_dims")
                hint = f" ({generated_hint(guessed, source.inputs, opts)})" if guessed else ""
                raise PackagingError(f"the reference model failed on the validation data: {e}{hint}") from e
            for spec in source.outputs:
                if not np.isfinite(reference[spec.name].astype(np.float64)).all():
                    raise PackagingError(f"the reference output {spec.name!r} has NaN or Inf on the validation data")

            plans: list[_Plan] = []
            skipped: list[str] = []
            for t, p in pairs:
                tag = f"{t.value} {p.value}"
                say(f"{tag}: building")
                tol = opts.tolerances_for(p)
                tried = packagers[t].build(source, p, tmp / f"{t.value}-{p.value}", opts, say)
                if t in runtime_plans:
                    tried = [fit_built(c, runtime_plans[t]) if isinstance(c, BuiltModel) else c for c in tried]
                best, summary, siblings = _validate_candidates(packagers[t], tried, source, inputs, reference, tol,
                                                     label_array, opts, say, tag)  # fmt: skip
                if best is None:  # this precision cannot apply here: the others are still written
                    skipped.append(_no_candidate(tag, summary))
                    say(f"{skipped[-1]}: skipped")
                    continue
                built, run, result = best
                if needs_search(p, result, packagers[t], opts):  # keep the layers int8 ruins in float
                    built, run, result, summary = search_float_layers(
                        packagers[t], source, p, built, run, result, summary, inputs=inputs, reference=reference,
                        tol=tol, labels=label_array, options=opts, workdir=tmp / f"{t.value}-{p.value}-mixed",
                        say=say, plan=runtime_plans.get(t), siblings=siblings)  # fmt: skip
                elif faster := search_faster_recipe(
                    packagers[t], source, p, best, summary, siblings, inputs=inputs, reference=reference, tol=tol,
                    labels=label_array, options=opts, workdir=tmp / f"{t.value}-{p.value}-faster", say=say,
                    plan=runtime_plans.get(t)):  # fmt: skip
                    built, run, result, summary = faster
                status = "passed" if result["passed"] else "FAILED"
                detail = (f"min cosine {_min_cosine(result):.6f}" if result["metrics"]
                          else f"structure only: {result['numeric']['reason']}")  # fmt: skip
                say(f"{tag}: validation {status} ({detail})" + (" on generated data" if generated else ""))
                plans.append(_Plan(t, p, packagers[t], built, run, tol, result, summary))
            if not plans:
                raise PackagingError("nothing was written: " + " | ".join(skipped))
            failed = [plan for plan in plans if not plan.validation["passed"]]
            if failed and not accept_drift:
                raise DriftError(_drift_message(failed, plans))

            results = [
                _write(plan, source=source, inputs=inputs, n=n, name=name, version=version, label=label,
                       expires=expires_text, keys=keys, out=out, options=opts, accept_drift=accept_drift,
                       labels=label_array, say=say, started=start, reference=reference, validate_on=validate_on)
                for plan in plans
            ]  # fmt: skip
            say("benchmarking the original model on the host CPU (batch 1) for the report")
            original = _original_summary(source, inputs, results)
            json_path, _ = write_reports(out, name=name, version=version, samples=n, results=results,
                                         original=original, skipped=skipped)  # fmt: skip
            say(f"wrote {json_path} and report.html")
        finally:
            source.close()
    return results


def _original_summary(source: Source, inputs: Mapping[str, np.ndarray], results: list[PackageResult]) -> dict[str, Any]:
    """Latency (batch 1) and accuracy of the original model, the report's reference point."""
    accuracy = next((r.validation["accuracy"].get("reference") for r in results if "accuracy" in r.validation), None)
    summary: dict[str, Any] = {"reference": source.reference_name, "accuracy": accuracy, "p50_ms": None, "p95_ms": None}
    try:
        bench = benchmark(source.reference, {k: v[:1] for k, v in inputs.items()}, warmup=2, runs=20, max_seconds=3.0)
    except Exception:  # the report is informative: a reference that cannot run at batch 1 is shown without latency
        return summary
    summary.update(p50_ms=bench["p50"], p95_ms=bench["p95"])
    return summary


def _policy_for(policy: Mapping[str, Any], inputs: Sequence[TensorSpec]) -> dict[str, Any]:
    """The source's input policy without ranges for dims the build fixed (they are no longer named)."""
    named = {d for spec in inputs for d in spec.shape if isinstance(d, str)}
    out = dict(policy)
    if "dims" in out:
        out["dims"] = {d: v for d, v in out["dims"].items() if d in named}
        if not out["dims"]:
            del out["dims"]
    return out


def _check_own_golden(
    plan: _Plan, tag: str, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], golden: Golden
) -> None:
    """Refuse to sign a bundle that would fail its own golden check on this host.

    The bundle's runtime runs the golden inputs again (where this host can run it) and the result
    is checked with the rule a device applies (``sdk.golden``): a non-deterministic model, or golden
    outputs that are not finite, would fail the health check on every device.

    Raises:
        PackagingError: the check failed.
    """
    again = plan.run(dict(inputs)) if plan.run is not None else outputs
    problems = check_golden(again, outputs, golden.rule, inputs.get(MASK_INPUT))
    if problems:
        raise PackagingError(f"{tag}: the bundle fails its own golden check, not signed: {'; '.join(problems)}")


def _write(
    plan: _Plan, *, source: Source, inputs: Mapping[str, np.ndarray], n: int, name: str, version: int,
    label: str | None, expires: str | None, keys: list[Signer], out: Path, options: PackageOptions,
    accept_drift: bool, labels: np.ndarray | None, say: Callable[[str], None], started: float,
    reference: Mapping[str, np.ndarray], validate_on: ValidateOn | None = None,
) -> PackageResult:  # fmt: skip
    tag = f"{plan.target.value} {plan.precision.value}"
    in_specs = plan.built.inputs or source.inputs
    out_specs = plan.built.outputs or source.outputs
    g = min(options.golden_samples, n)
    fixed_batch = in_specs[0].shape[0] if in_specs and in_specs[0].shape else None
    if isinstance(fixed_batch, int) and fixed_batch <= n:  # a static-shape model takes exactly that many samples
        g = fixed_batch
    golden_in = {k: v[:g] for k, v in inputs.items()}
    if plan.run is not None:
        golden_out = plan.run(golden_in)
    else:  # the bundle cannot run here: the device compares with the reference, within the precision's tolerance
        golden_out = source.reference(golden_in)
    members: dict[str, str | os.PathLike[str] | bytes] = {plan.built.member: plan.built.path}
    members.update(plan.built.extra_members)
    paths: dict[str, dict[str, str]] = {"inputs": {}, "outputs": {}}
    used: set[str] = set()
    for side, arrays, specs in (("inputs", golden_in, in_specs), ("outputs", golden_out, out_specs)):
        for spec in specs:
            path = f"golden/{side}/{_safe_name(spec.name, used)}.npy"
            members[path] = _npy_bytes(arrays[spec.name])
            paths[side][spec.name] = path
    golden = Golden(
        inputs=paths["inputs"], outputs=paths["outputs"], samples=g,
        tolerance=golden_tolerance(plan.tolerances, {s.name: golden_out[s.name] for s in source.outputs}),
        outputs_from=source.reference_name if plan.run is None else None,
    )  # fmt: skip
    _check_own_golden(plan, tag, golden_in, golden_out, golden)
    members.update({k: v for k, v in source.members.items()})

    say(f"{tag}: benchmarking on the host CPU (batch 1)")
    if plan.run is not None:
        bench = benchmark(plan.run, {k: v[:1] for k, v in inputs.items()}, warmup=options.benchmark_warmup,
                          runs=options.benchmark_runs, max_seconds=options.benchmark_max_seconds)  # fmt: skip
    else:
        bench = {"skipped": plan.validation["numeric"]["reason"], "runs": 0}
    passed = bool(plan.validation["passed"])
    try:
        validation = Validation(
            reference=source.reference_name, samples=n, data=source.data_origin, metrics=plan.validation["metrics"],
            tolerances=plan.tolerances.to_dict(), passed=passed, accepted_drift=bool(accept_drift and not passed),
            failures=plan.validation["failures"], benchmark=bench,
            # numeric, structure: set when the runtime could not run on this host; padding: token-level
            # outputs were scored only where attention_mask != 0
            **{k: plan.validation[k] for k in ("numeric", "structure", "accuracy", "padding") if k in plan.validation},
        )  # fmt: skip
        manifest = Manifest(
            name=name, version=version, target=plan.target.value, precision=plan.precision.value,
            model=plan.built.member, inputs=in_specs, outputs=out_specs,
            created=format_time(datetime.now(timezone.utc)), runtime=Runtime.from_dict(plan.built.runtime),
            label=label, task=source.task,
            preprocessing=Preprocessing.from_dict(plan.built.preprocessing or source.preprocessing),
            validation=validation, golden=golden, expires=expires,
            input_policy=InputPolicy.from_dict(_policy_for(plan.built.input_policy or source.input_policy, in_specs)),
        )  # fmt: skip
    except ManifestError as e:  # e.g. a tensor name the bundle format cannot hold, a runtime key it does not know
        raise PackagingError(f"cannot describe the model in a manifest: {e}") from e
    report = {
        "name": name,
        "version": version,
        "target": plan.target.value,
        "precision": plan.precision.value,
        "source": {"kind": source.kind, "description": source.description, **source.info},
        "build": dict(plan.built.recipe),
        "candidates": plan.candidates,
        "chosen": plan.built.candidate,
        "data": {
            "origin": source.data_origin,
            "generated": is_generated(source.data_origin),
            "random_calibration": plan.precision is Precision.INT8 and is_generated(source.data_origin),
        },
        "validation": validation.to_dict(),
        "benchmark": bench,
        "seconds": round(time.perf_counter() - started, 3),
    }
    members["report.json"] = json.dumps(report, indent=2, sort_keys=True, allow_nan=False).encode("utf-8")
    bundle_path = out / bundle_filename(manifest)
    try:
        final = write_bundle(bundle_path, manifest, members, keys)
    except ManifestError as e:  # a member path the format refuses
        raise PackagingError(f"cannot write {bundle_path.name}: {e}") from e
    if validate_on is not None and validate_on.target is plan.target:
        say(f"{tag}: validating in {validate_on.label}")
        on_runtime = validate_bundle(validate_on, bundle_path, keys[0].public_key, source.outputs, inputs, reference,
                                     plan.tolerances)  # fmt: skip
        say(f"{tag}: {validate_on.label} " + ("passed" if on_runtime["passed"] else "FAILED: "
                                             + "; ".join(on_runtime["failures"])))  # fmt: skip
        if not on_runtime["passed"] and not accept_drift:
            bundle_path.unlink()
            raise DriftError(f"{tag}: validation in {validate_on.label} failed, not signed: "
                             + "; ".join(on_runtime["failures"]) + " (sign anyway with --accept-drift)")  # fmt: skip
        validation = replace(validation, on_runtime=on_runtime,
                             accepted_drift=bool(validation.accepted_drift or not on_runtime["passed"]))  # fmt: skip
        manifest = replace(manifest, validation=validation)
        report["validation"] = validation.to_dict()
        members["report.json"] = json.dumps(report, indent=2, sort_keys=True, allow_nan=False).encode("utf-8")
        final = write_bundle(bundle_path, manifest, members, keys)  # re-signed with the target runtime's numbers
    size = bundle_path.stat().st_size
    say(f"{tag}: wrote {bundle_path} ({size} bytes, p50 {bench.get('p50', 'n/a')} ms)")
    latency: dict[str, Any] = {k: bench[k] for k in ("p50", "p95", "mean", "runs") if k in bench}
    return PackageResult(
        bundle_path=bundle_path, manifest=final, target=plan.target.value, precision=plan.precision.value,
        validation=final.validation, size_bytes=size, latency_ms=latency,
    )  # fmt: skip
