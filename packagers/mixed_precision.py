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
from collections.abc import Callable, Mapping, Sequence
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

__all__ = [
    "MAX_PROBES",
    "PROBE_SAMPLES",
    "Chosen",
    "Searched",
    "needs_search",
    "search_faster_recipe",
    "search_float_layers",
]

MAX_PROBES = 12  # sensitivity builds per round (blocks, then layers of the worst blocks)
PROBE_SAMPLES = 8  # validation samples the sensitivity probes are scored on
_LOG_LAYERS = 32  # probed layers listed in the log, most sensitive first
SIBLING_MARGIN = 0.03  # a sibling recipe is tried with the found float layers when its plain build is this much faster
MAX_SIBLINGS = 3
FASTER_RECIPE_MARGIN = 0.05  # a failing recipe is searched when it runs this much faster than the chosen one
SIBLING_RUNS = 15


Chosen = tuple[BuiltModel, Runner | None, dict[str, Any]]  # a candidate, its runner, its validation


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
        self.options_given = options
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
    siblings: Sequence[Chosen] = (),
) -> Searched:  # fmt: skip
    """Keep the most sensitive quantized layers of ``plain`` in float until ``tol`` holds or the cap is reached.

    Returns the passing candidate with the fewest float layers, else the best one tried (the plain one
    when nothing improved it); its recipe carries ``mixed_precision`` (the log) either way. ``siblings``
    are the target's other plain candidates (other recipes of the same precision) with their runners:
    when the search passes, the float layers it found are tried on the ones that run faster than
    ``plain`` (``_faster_sibling``), and the fastest passing build is kept.
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
    best, best_kept = (plain, plain_run, plain_result), []
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
            best, best_kept = (built, run, result), kept
        if result["passed"]:
            break
    log["outcome"] = "passed" if best[2]["passed"] else f"tolerance not reached with {cap} layer(s) in float (the cap)"
    if best[2]["passed"] and best[1] is not None and plain_run is not None and siblings:
        best, log["siblings"] = _faster_sibling(search, best, plain_run, siblings, kept=best_kept, say=say, tag=tag)
    log["builds"] = search.builds
    if best[0] is not plain and best[1] is not None and plain_run is not None:
        log["cost"] = _cost(plain, plain_run, best[0], best[1], inputs)
    kept = best[0].recipe.get("quantization", {}).get("float_layers", [])
    summary = [*summary, {"candidate": f"{best[0].candidate}+float", "passed": bool(best[2]["passed"]),
                          "float_layers": len(kept)}]  # fmt: skip
    return _finish(best[0], best[1], best[2], summary, log, start)


def _p50(built: BuiltModel, run: Runner, inputs: Mapping[str, np.ndarray]) -> float:
    """``built``'s batch-1 p50 in ms, short (the ranking of candidates, not the report's number)."""
    one = {k: v[:1] for k, v in inputs.items()}
    return float(benchmark(run, one, warmup=2, runs=SIBLING_RUNS, max_seconds=3.0)["p50"])


def _faster_sibling(
    search: _Search, best: Chosen, plain_run: Runner, siblings: Sequence[Chosen], *,
    kept: list[str], say: Callable[[str], None], tag: str,
) -> tuple[Chosen, list[dict[str, Any]]]:  # fmt: skip
    """The fastest passing build among ``best`` and the faster plain siblings rebuilt with the same float layers.

    Which recipe needs the fewest float layers and which runs fastest are different questions: on
    PP-OCRv4's detector the most accurate plain candidate quantizes only the convolutions, while the
    recipe that also quantizes the element-wise ops runs ~10% faster (and, measured by hand, passes with
    the same float convolution). A sibling is rebuilt only when its plain build runs at least
    ``SIBLING_MARGIN`` faster than the searched one (at most ``MAX_SIBLINGS``, fastest first); one rebuild
    and one validation each.
    """
    assert best[1] is not None
    inputs = search.inputs
    base = _p50(search.plain, plain_run, inputs)
    faster = sorted(((_p50(built, run, inputs), built) for built, run, _ in siblings if run is not None),
                    key=lambda t: t[0])  # fmt: skip
    faster = [(p50, built) for p50, built in faster if p50 < base * (1 - SIBLING_MARGIN)][:MAX_SIBLINGS]
    log: list[dict[str, Any]] = []
    if not faster:
        return best, log
    best_p50 = _p50(best[0], best[1], inputs)
    for plain_p50, sibling in faster:
        entry: dict[str, Any] = {"candidate": sibling.candidate, "plain_p50_ms": round(plain_p50, 3)}
        log.append(entry)
        try:
            rebuilt = _Search(search.packager, search.source, search.precision, sibling, search.inputs,
                              search.reference, search.tol, search.labels, search.options_given,
                              search.workdir / f"sibling-{sibling.candidate}", search.plan).build(kept)  # fmt: skip
            search.builds += 1
            run, result = search.score(rebuilt[0]) if rebuilt else (None, None)
        except PackagingError as e:
            entry["error"] = str(e)[:200]
            continue
        if run is None or result is None:
            entry["error"] = "the rebuild produced no candidate"
            continue
        entry.update(_summary(result))
        if not result["passed"]:
            continue
        entry["p50_ms"] = p50 = round(_p50(rebuilt[0], run, inputs), 3)
        if p50 < best_p50:
            say(f"{tag}: mixed precision: {sibling.candidate} with the same float layers passes and runs faster "
                f"({p50:.1f} ms against {best_p50:.1f} ms)")  # fmt: skip
            best, best_p50 = (rebuilt[0], run, result), p50
    return best, log


def search_faster_recipe(
    packager: Packager, source: Source, precision: Precision, chosen: Chosen, summary: list[dict[str, Any]],
    siblings: Sequence[Chosen], *, inputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
    tol: Tolerances, labels: np.ndarray | None, options: PackageOptions, workdir: Path, say: Callable[[str], None],
    plan: RuntimePlan | None = None,
) -> Searched | None:  # fmt: skip
    """The float-layer search on a faster recipe than ``chosen`` (which passed), when one missed the tolerance.

    Validation picks the most accurate candidate; a recipe that quantizes more of the graph can run
    faster and miss the tolerance by a little (PP-OCRv4's detector with onnxruntime: element-wise ops in
    int8 too, 10% faster than the conv-only recipe, map cosine 0.988 against 0.990). The search runs on
    the fastest such sibling (more layers quantized than ``chosen`` and at least ``FASTER_RECIPE_MARGIN``
    faster in a short batch-1 timing; of several, the closest to passing); its result replaces ``chosen``
    only if it passes and still runs faster. None when there is no such sibling or the search did not
    beat ``chosen``.
    """
    built, run, result = chosen
    if (precision not in INT8_FAMILY or not result.get("passed") or run is None or options.max_float_layers <= 0
            or not hasattr(packager, "quantized_layers")):  # fmt: skip
        return None
    quantized = len(packager.quantized_layers(built))
    failing = [(b, r, res) for b, r, res in siblings if r is not None and not res["passed"] and res.get("metrics")
               and len(packager.quantized_layers(b)) > quantized]  # fmt: skip
    if not failing:
        return None
    base = _p50(built, run, inputs)
    faster = [(p50, s) for s in failing if (p50 := _p50(s[0], s[1], inputs)) <= base * (1 - FASTER_RECIPE_MARGIN)]
    if not faster:
        return None
    p50, sibling = min(faster, key=lambda t: _badness(t[1][2]))  # the closest to passing of the faster ones
    tag = f"{packager.target.value} {precision.value}"
    say(f"{tag}: {sibling[0].candidate} runs at {p50:.1f} ms against {base:.1f} ms for {built.candidate} and misses "
        "the tolerance: searching the layers it should keep in float")  # fmt: skip
    found = search_float_layers(packager, source, precision, sibling[0], sibling[1], sibling[2], list(summary),
                                inputs=inputs, reference=reference, tol=tol, labels=labels, options=options,
                                workdir=workdir, say=say, plan=plan)  # fmt: skip
    if not found.result["passed"] or found.run is None:
        say(f"{tag}: keeping {built.candidate} (the faster recipe did not reach the tolerance)")
        return None
    mixed = _p50(found.built, found.run, inputs)
    if mixed >= base:
        say(f"{tag}: keeping {built.candidate} ({sibling[0].candidate} passes with float layers at {mixed:.1f} ms)")
        return None
    log = {
        **found.built.recipe["mixed_precision"],
        "instead_of": {"candidate": built.candidate, "p50_ms": round(base, 3), "chosen_p50_ms": round(mixed, 3)},
    }
    say(f"{tag}: {found.built.candidate} with float layers passes at {mixed:.1f} ms: chosen over {built.candidate}")
    return Searched(replace(found.built, recipe={**found.built.recipe, "mixed_precision": log}), found.run,
                    found.result, found.summary)  # fmt: skip


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
