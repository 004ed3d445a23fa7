"""Accuracy-aware mixed precision: keep the few layers int8 ruins in float, generic over targets.

When the best candidate of an int8-family precision misses its tolerance (or ``target_cosine``), and
its packager offers ``quantized_layers``, the search:

1. lists the layers the candidate quantized (the target's own names, graph order);
2. measures each layer's sensitivity as the gain in the output metric when only it is kept in float
   (the candidate rebuilt by the target's own quantizer with ``float_layers=[layer]``: ORT's
   ``nodes_to_exclude``, NNCF's ``IgnoredScope``, the LiteRT per-op recipe), scored on a subset of the
   validation samples (``PROBE_SAMPLES``). With more than ``MAX_PROBES`` layers it probes contiguous
   blocks of layers first (graph order; a block is a stage of the network) and then the layers of the
   most sensitive blocks one by one, so the cost stays about ``2 * MAX_PROBES`` builds whatever the depth;
3. keeps the most sensitive layers in float, growing the set (1, 2, 4, 8, ... layers, then the cap; each
   step rebuilt and validated on every sample) until the tolerance holds or the cap
   (``max_float_layers``) is reached; on deep graphs it then tries the two most sensitive blocks whole
   where they fit the cap.

Probe builds calibrate on the probe samples only (``calibration_size=PROBE_SAMPLES``): they rank layers,
they are not bundles; the growth steps calibrate as the plain build did.

The metric is the one the tolerance gates: the mean cosine of every output, plus the IoU of
thresholded dense maps where an output is one. The result is the best candidate seen (the plain one
when nothing helped), with the search log in ``recipe["mixed_precision"]``: layers probed and their
gain, each step's float layers, metrics and seconds, and the size and latency cost against the plain
candidate.

Why not ``nncf.quantize_with_accuracy_control`` for OpenVINO: it gates one scalar metric against the
float model's with a ``max_drop``, where a bundle here must pass every tolerance (worst-sample and
mean cosine, IoU); it reverts quantizers inside its own loop, so the layers it kept float come back
only in its log, not as an ``IgnoredScope`` a later build can replay; and one search over the
``float_layers`` contract serves every target with the same log.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from packagers.benchmark import benchmark
from packagers.options import INT8_FAMILY, PackageOptions, Precision, Tolerances
from packagers.registry import BuiltModel, Packager, Runner
from packagers.runtime_plan import fit_built
from packagers.validation import MASK_INPUT, compare_outputs, run_batched
from sdk.errors import PackagingError

if TYPE_CHECKING:
    from packagers.runtime_plan import RuntimePlan
    from packagers.sources.base import Source

__all__ = ["MAX_PROBES", "PROBE_SAMPLES", "Searched", "needs_search", "search_float_layers"]

MAX_PROBES = 12  # sensitivity builds per round (blocks, then layers of the worst blocks)
PROBE_SAMPLES = 8  # validation samples the sensitivity probes are scored on
_LOG_LAYERS = 32  # probed layers listed in the log, most sensitive first


class Searched(NamedTuple):
    """What the search chose: the candidate, its runner, its validation, and the candidates' summary rows."""

    built: BuiltModel
    run: Runner | None
    result: dict[str, Any]
    summary: list[dict[str, Any]]


def needs_search(precision: Precision, result: Mapping[str, Any], packager: Packager, options: PackageOptions) -> bool:
    """Whether the search runs: an int8-family candidate that failed and a packager that can keep layers float."""
    return (
        precision in INT8_FAMILY
        and not result.get("passed", True)
        and bool(result.get("metrics"))
        and hasattr(packager, "quantized_layers")
        and options.max_float_layers > 0
    )


def _badness(result: Mapping[str, Any]) -> float:
    """How far the outputs are from the reference: 1 - mean and 1 - worst cosine, 1 - mean IoU for dense maps.

    The worst sample counts as much as the mean: keeping layers float moves the quantization error
    around (QDQ requantizes at every float/int8 border), and a step that lifts the mean while sinking
    the worst sample is not better (measured on PP-OCRv4's detector with onnxruntime).
    """
    total = 0.0
    for m in result["metrics"].values():
        for key in ("cosine_mean", "cosine_min"):
            total += 2.0 if m.get(key) is None else 1.0 - m[key]
        if "iou_mean" in m:
            total += 1.0 if m["iou_mean"] is None else 1.0 - m["iou_mean"]
    return total


def _summary(result: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"passed": bool(result["passed"])}
    for name, m in result["metrics"].items():
        out[name] = {k: m[k] for k in ("cosine_mean", "cosine_min", "iou_mean", "top1_agreement") if k in m}
    return out


def _size(built: BuiltModel) -> int:
    return built.path.stat().st_size + sum(p.stat().st_size for p in built.extra_members.values())


class _Search:
    """One search: builds, scores and logs; the state of one (target, precision)."""

    def __init__(self, packager: Packager, source: Source, precision: Precision, plain: BuiltModel,
                 inputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], tol: Tolerances,
                 labels: np.ndarray | None, options: PackageOptions, workdir: Path,
                 plan: RuntimePlan | None) -> None:  # fmt: skip
        self.packager, self.source, self.precision, self.plain = packager, source, precision, plain
        self.inputs, self.reference, self.tol, self.labels = inputs, reference, tol, labels
        self.workdir, self.plan, self.builds = workdir, plan, 0
        pinned = plain.recipe.get("quantization", {}).get("per_channel")
        # Rebuild the variant the plain search chose (per-channel or not), with the user's float layers kept.
        self.options = replace(options, per_channel=pinned if isinstance(pinned, bool) else options.per_channel)
        # and the recipe, where the target records how to rebuild only this candidate (e.g. ORT's conv-only)
        pin = plain.recipe.get("quantization", {}).get("rebuild_extra")
        if isinstance(pin, Mapping) and pin:
            self.options = replace(self.options, extra={**self.options.extra, **pin})

    def build(self, layers: list[str], calibration_size: int | None = None) -> list[BuiltModel]:
        self.builds += 1
        opts = replace(self.options, float_layers=tuple(dict.fromkeys([*self.options.float_layers, *layers])),
                       calibration_size=calibration_size or self.options.calibration_size)  # fmt: skip
        tried = self.packager.build(self.source, self.precision, self.workdir / f"step-{self.builds}", opts,
                                    lambda _line: None)  # fmt: skip
        built = [c for c in tried if isinstance(c, BuiltModel)]
        return [fit_built(c, self.plan) for c in built] if self.plan is not None else built

    def score(self, built: BuiltModel, n: int | None = None) -> tuple[Runner, dict[str, Any]]:
        feeds = {k: v[:n] for k, v in self.inputs.items()} if n else self.inputs
        try:
            run = self.packager.runner(built)
            outputs = run_batched(run, feeds)
        except PackagingError:
            raise
        except Exception as e:  # a rebuilt candidate the runtime cannot load or run: a failed step, not a crash
            raise PackagingError(f"{built.candidate} failed to load or run: {str(e)[:200]}") from e
        reference = {k: v[:n] for k, v in self.reference.items()} if n else self.reference
        mask = feeds.get(MASK_INPUT) if any(s.name == MASK_INPUT for s in self.source.inputs) else None
        labels = self.labels[:n] if n and self.labels is not None else self.labels
        result = compare_outputs(self.source.outputs, reference, outputs, self.tol, labels=labels,
                                 labels_output=self.options.labels_output, mask=mask)  # fmt: skip
        return run, result

    def probe(self, layers: list[str], n: int) -> float:
        """Badness on ``n`` samples with ``layers`` kept in float (the best of the rebuilt candidates)."""
        scores = []
        try:
            candidates = self.build(layers, calibration_size=n)
        except PackagingError:  # e.g. nothing left to quantize
            return float("inf")
        for built in candidates:
            try:
                scores.append(_badness(self.score(built, n)[1]))
            except PackagingError:
                continue
        return min(scores) if scores else float("inf")


def _blocks(layers: list[str], count: int) -> list[list[str]]:
    """``layers`` cut into ``count`` contiguous blocks of near-equal size, graph order."""
    edges = np.linspace(0, len(layers), count + 1).round().astype(int)
    return [layers[a:b] for a, b in itertools.pairwise(edges) if b > a]


def _growth(cap: int) -> list[int]:
    """Float-set sizes tried: 1, 2, 4, 8, ... then the cap (each step is a full build and validation)."""
    sizes, k = [], 1
    while k < cap:
        sizes.append(k)
        k *= 2
    return [*sizes, cap]


def search_float_layers(
    packager: Packager, source: Source, precision: Precision, plain: BuiltModel, plain_run: Runner | None,
    plain_result: dict[str, Any], summary: list[dict[str, Any]], *, inputs: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray], tol: Tolerances, labels: np.ndarray | None, options: PackageOptions,
    workdir: Path, say: Callable[[str], None], plan: RuntimePlan | None = None,
) -> Searched:  # fmt: skip
    """Keep the most sensitive quantized layers of ``plain`` in float until ``tol`` holds or the cap is reached.

    Returns the passing candidate with the fewest float layers, else the best one tried (the plain one
    when nothing improved it); its recipe carries ``mixed_precision`` (the log) either way.
    """
    tag = f"{packager.target.value} {precision.value}"
    start = time.perf_counter()
    layers = [n for n in packager.quantized_layers(plain) if n not in options.float_layers]  # type: ignore[attr-defined]
    cap = options.float_layer_cap(len(layers))
    log: dict[str, Any] = {"plain": {"candidate": plain.candidate, **_summary(plain_result)},
                           "quantized_layers": len(layers), "cap": cap, "steps": []}  # fmt: skip
    if cap == 0:
        log["outcome"] = "nothing to search: no quantized layer, or a cap of 0"
        return _finish(plain, plain_run, plain_result, summary, log, start)
    search = _Search(packager, source, precision, plain, inputs, reference, tol, labels, options, workdir, plan)
    n = min(PROBE_SAMPLES, len(next(iter(inputs.values()))))
    base = search.probe([], n)
    gains: dict[str, float] = {}
    blocks = _blocks(layers, MAX_PROBES) if len(layers) > MAX_PROBES else [[name] for name in layers]
    say(f"{tag}: plain int8 ({plain.candidate}) misses the tolerance: {'; '.join(plain_result['failures'][:2])}")
    say(f"{tag}: mixed precision: measuring the sensitivity of {len(layers)} quantized layers "
        f"({len(blocks)} probes on {n} samples; at most {cap} kept in float)")  # fmt: skip
    block_gain = [(base - search.probe(block, n), block) for block in blocks]
    block_gain.sort(key=lambda gb: -gb[0])
    if len(layers) > MAX_PROBES:
        log["blocks"] = [{"first": b[0], "last": b[-1], "layers": len(b), "gain": round(g, 6)} for g, b in block_gain]
        singles: list[str] = []
        for _, block in block_gain:  # the worst blocks' layers one by one, up to MAX_PROBES probes
            singles += block[: MAX_PROBES - len(singles)]
            if len(singles) >= MAX_PROBES:
                break
        gains = {name: base - search.probe([name], n) for name in singles}
        for g, block in block_gain:  # the rest ranked by their block, after the probed ones
            gains.update({name: min(g, min(gains.values())) - 1e-9 for name in block if name not in gains})
    else:
        gains = {b[0]: g for g, b in block_gain}
    ranked = sorted(gains, key=lambda name: -gains[name])
    log["sensitivity"] = [[name, round(gains[name], 6)] for name in ranked[:_LOG_LAYERS]]  # most sensitive first
    best = (plain, plain_run, plain_result)
    # The greedy steps, then (on deep graphs) the most sensitive whole blocks that fit the cap: quantization
    # error is not additive (a float layer moves the requantization borders), so a block measured as a
    # whole can beat its best layers taken one by one.
    steps = [ranked[:k] for k in _growth(cap)]
    steps += [block for _, block in block_gain[:2] if len(block) > 1 and len(block) <= cap]
    for kept in steps:
        step_start = time.perf_counter()
        tried = []
        try:
            candidates = search.build(kept)
        except PackagingError as e:
            log["steps"].append({"float_layers": kept, "error": str(e)[:200]})
            continue
        for built in candidates:
            try:
                run, result = search.score(built)
            except PackagingError as e:
                log["steps"].append({"float_layers": kept, "error": str(e)[:200]})
                continue
            tried.append((built, run, result))
        if not tried:
            continue
        built, run, result = max(tried, key=lambda t: (t[2]["passed"], -_badness(t[2])))
        log["steps"].append({"float_layers": kept, **_summary(result), "candidate": built.candidate,
                             "seconds": round(time.perf_counter() - step_start, 3)})  # fmt: skip
        say(f"{tag}: mixed precision: {len(kept)} layer(s) kept in float ({', '.join(kept[:6])}"
            f"{', ...' if len(kept) > 6 else ''}): {'passed' if result['passed'] else 'not yet'}")  # fmt: skip
        if (result["passed"], -_badness(result)) > (best[2]["passed"], -_badness(best[2])):
            best = (built, run, result)
        if result["passed"]:
            break
    log["outcome"] = "passed" if best[2]["passed"] else f"tolerance not reached with {cap} layer(s) in float (the cap)"
    log["builds"] = search.builds
    if best[0] is not plain and best[1] is not None and plain_run is not None:
        log["cost"] = _cost(plain, plain_run, best[0], best[1], inputs)
    kept = best[0].recipe.get("quantization", {}).get("float_layers", [])
    summary = [*summary, {"candidate": f"{best[0].candidate}+float", "passed": bool(best[2]["passed"]),
                          "float_layers": len(kept)}]  # fmt: skip
    return _finish(best[0], best[1], best[2], summary, log, start)


def _cost(plain: BuiltModel, plain_run: Runner, mixed: BuiltModel, mixed_run: Runner,
          inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:  # fmt: skip
    """Size and batch-1 latency of the mixed candidate against the plain int8 one (short, back to back)."""
    one = {k: v[:1] for k, v in inputs.items()}
    p50 = {label: benchmark(run, one, warmup=2, runs=20, max_seconds=3.0)["p50"]
           for label, run in (("plain", plain_run), ("mixed", mixed_run))}  # fmt: skip
    size = {"plain": _size(plain), "mixed": _size(mixed)}
    return {"size_bytes": size, "p50_ms": p50, "latency_ratio": round(p50["mixed"] / max(p50["plain"], 1e-9), 3),
            "size_ratio": round(size["mixed"] / max(size["plain"], 1), 3)}  # fmt: skip


def _finish(built: BuiltModel, run: Runner | None, result: dict[str, Any], summary: list[dict[str, Any]],
            log: dict[str, Any], start: float) -> Searched:  # fmt: skip
    log["seconds"] = round(time.perf_counter() - start, 3)
    recipe = {**built.recipe, "mixed_precision": log}
    return Searched(replace(built, recipe=recipe), run, result, summary)
