"""Numerical validation of a built model against its reference, and the golden tolerance.

The golden check itself (what a device runs, and the packager before signing) is ``sdk.golden``.

Pure numpy: the caller runs both models; this module compares their outputs per output tensor
(max/mean absolute difference, per-sample cosine similarity, top-1 agreement for logits-like
outputs, task accuracy with labels) and decides pass/fail against ``Tolerances``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from packagers.options import Tolerances
from sdk.errors import PackagingError
from sdk.manifest import TensorSpec
from sdk.scoring import MASK_INPUT, cosine_per_sample, padding_mask, zero_unscored
from sdk.sections import GoldenTolerance

__all__ = [
    "DENSE_MAP_THRESHOLD",
    "ValidationUnavailable",
    "compare_outputs",
    "cosine_per_sample",
    "golden_tolerance",
    "iou_per_sample",
    "is_dense_map",
    "is_logits_like",
    "padding_mask",
    "run_batched",
]

Arrays = dict[str, np.ndarray]
DENSE_MAP_THRESHOLD = 0.5  # probability maps are compared after thresholding at this value


class ValidationUnavailable(PackagingError):
    """``Packager.runner`` cannot run the built model on this host (Core ML predicts only on macOS).

    The packager has already checked what it can without running the model (``structure``: the saved
    file loads, its inputs/outputs match the manifest, the precision's ops are present), failing the
    build if that did not pass. ``package`` then signs on the structural check alone and records it:
    ``validation.numeric = {"ran": False, "reason": ...}``, ``validation.structure``, golden outputs taken
    from the reference (``golden.outputs_from``), and no host benchmark.
    """

    def __init__(self, reason: str, structure: Mapping[str, Any]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.structure = dict(structure)


def _num(x: float) -> float | None:
    """A JSON-safe float with 8 significant digits; None for NaN/Inf (canonical JSON refuses them)."""
    x = float(x)
    return float(f"{x:.8g}") if math.isfinite(x) else None


def run_batched(fn: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]], inputs: Mapping[str, np.ndarray],
                batch_size: int = 64) -> Arrays:  # fmt: skip
    """Run ``fn`` over ``inputs`` in chunks along the batch axis and concatenate the outputs."""
    n = len(next(iter(inputs.values())))
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, batch_size):
        chunk = {k: v[start : start + batch_size] for k, v in inputs.items()}
        for k, v in fn(chunk).items():
            parts.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}


def is_logits_like(spec: TensorSpec) -> bool:
    """Whether top-1 agreement is meaningful: named logits, or rank 2 [batch, classes > 1]."""
    if spec.name.lower().endswith("logits"):
        return True
    return len(spec.shape) == 2 and isinstance(spec.shape[1], int) and spec.shape[1] > 1


def is_dense_map(ref: np.ndarray) -> bool:
    """Whether an output is a dense probability map: [N, C <= 4, H, W] or [N, H, W], H and W >= 8, values in [0, 1].

    Such maps (segmentation, text detection) are read after thresholding, so a cosine near 1 can hide
    a lost region; they are scored by the IoU of the thresholded maps as well (``min_iou`` bounds the
    mean), and their cosine only over the samples whose reference map has a value above the threshold:
    on a map with nothing in it the cosine compares background noise (measured on PP-OCRv4's detector:
    cosine 0.0 and 0.11 on two text-free crops whose int8 and float maps are both empty).
    """
    spatial = ref.shape[-2:] if ref.ndim in (3, 4) else ()
    if len(spatial) != 2 or min(spatial) < 8 or (ref.ndim == 4 and ref.shape[1] > 4) or not ref.size:
        return False
    return bool(np.isfinite(ref).all() and ref.min() >= 0.0 and ref.max() <= 1.0)


def iou_per_sample(ref: np.ndarray, out: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """IoU of ``ref > threshold`` and ``out > threshold`` per sample; 1 where both maps are empty."""
    a = ref.reshape(len(ref), -1) > threshold
    b = out.reshape(len(out), -1) > threshold
    union = (a | b).sum(axis=1)
    inter = (a & b).sum(axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _output_metrics(spec: TensorSpec, ref: np.ndarray, out: np.ndarray, tol: Tolerances,
                    failures: list[str], mask: np.ndarray | None = None) -> dict[str, Any]:  # fmt: skip
    name = spec.name
    if ref.shape != out.shape:
        failures.append(f"{name}: shape {list(out.shape)} differs from the reference {list(ref.shape)}")
        return {"shape_mismatch": True}
    keep = padding_mask(mask, ref)
    r, o = zero_unscored(ref.astype(np.float64), keep), zero_unscored(out.astype(np.float64), keep)
    finite = bool(np.isfinite(o).all())
    diff = np.abs(o - r)
    if keep is not None:
        diff = diff[keep]  # the mean absolute difference over scored positions only
    scale = float(np.abs(r).max()) if r.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    cos = cosine_per_sample(r, o)
    dense = keep is None and is_dense_map(ref)
    if dense:  # an empty map's cosine is noise (background near 0): such samples are judged by IoU alone
        foreground = (r.reshape(len(r), -1) > DENSE_MAP_THRESHOLD).any(axis=1)
        cos = cos[foreground] if foreground.any() else np.ones(1)
    metrics: dict[str, Any] = {
        "max_abs_diff": _num(max_abs),
        "mean_abs_diff": _num(diff.mean()) if diff.size else 0.0,
        "scale": _num(scale),
        "max_rel_diff": _num(rel),
        "cosine_mean": _num(cos.mean()),
        "cosine_min": _num(cos.min()),
        "finite": finite,
    }
    if keep is not None:
        metrics["masked_positions"] = int(keep.size - keep.sum())
    if not finite:
        failures.append(f"{name}: the built model produced NaN or Inf")
    if not np.isfinite(cos).all() or cos.min() < tol.min_cosine:
        failures.append(f"{name}: min cosine {cos.min():.6f} < {tol.min_cosine}")
    if not np.isfinite(cos).all() or cos.mean() < tol.min_cosine_mean:
        failures.append(f"{name}: mean cosine {cos.mean():.6f} < {tol.min_cosine_mean}")
    if tol.max_rel_diff is not None and not rel <= tol.max_rel_diff:
        failures.append(f"{name}: max abs diff {max_abs:.3g} is {rel:.3g} of the output scale {scale:.3g} "
                        f"(> {tol.max_rel_diff})")  # fmt: skip
    if dense:
        iou = iou_per_sample(r, o)
        metrics.update(iou_mean=_num(iou.mean()), iou_min=_num(iou.min()), iou_threshold=DENSE_MAP_THRESHOLD,
                       cosine_samples=int(foreground.sum()))  # fmt: skip
        if tol.min_iou is not None and not iou.mean() >= tol.min_iou:
            failures.append(f"{name}: mean IoU of the maps thresholded at {DENSE_MAP_THRESHOLD} is "
                            f"{iou.mean():.4f} < {tol.min_iou}")  # fmt: skip
    if is_logits_like(spec) and r.ndim >= 2:
        same = r.argmax(axis=-1) == o.argmax(axis=-1)
        agree = float(same[keep].mean() if keep is not None and keep.any() else same.mean())
        metrics["top1_agreement"] = _num(agree)
        if tol.min_top1_agreement is not None and agree < tol.min_top1_agreement:
            failures.append(f"{name}: top-1 agreement {agree:.4f} < {tol.min_top1_agreement}")
    return metrics


def compare_outputs(
    outputs: Sequence[TensorSpec],
    reference: Mapping[str, np.ndarray],
    built: Mapping[str, np.ndarray],
    tolerances: Tolerances,
    *,
    labels: np.ndarray | None = None,
    labels_output: str | None = None,
    mask: np.ndarray | None = None,
) -> dict[str, Any]:
    """Compare a built model's outputs with the reference's on the same samples.

    Args:
        outputs: the output specs (order and logits-likeness).
        reference: output name -> reference array, batch first.
        built: output name -> the built model's array for the same inputs.
        tolerances: the bounds that decide ``passed``.
        labels: optional int class label per sample; adds task accuracy for both models.
        labels_output: the output the labels score; default the first logits-like output.
        mask: the samples' ``attention_mask`` [batch, sequence], when the model takes one: token-level
            outputs (rank >= 3) are scored only where it is non-zero (see ``padding_mask``).

    Returns:
        {"metrics": {output: {...}}, "accuracy": {...} (with labels), "passed": bool, "failures": [str],
        "padding": {...} (with a mask that applied: the input and the outputs it masked)}.

    Raises:
        PackagingError: an output is missing, or labels do not fit any output.
    """
    failures: list[str] = []
    metrics: dict[str, Any] = {}
    masked: list[str] = []
    for spec in outputs:
        if spec.name not in built or spec.name not in reference:
            raise PackagingError(f"output {spec.name!r} is missing from the built model's or the reference's results")
        ref = np.asarray(reference[spec.name])
        metrics[spec.name] = _output_metrics(spec, ref, np.asarray(built[spec.name]), tolerances, failures, mask)
        if "masked_positions" in metrics[spec.name]:
            masked.append(spec.name)
    result: dict[str, Any] = {"metrics": metrics}
    if masked:
        result["padding"] = {"masked_by": MASK_INPUT, "outputs": masked,
                             "rule": "token-level outputs scored only where attention_mask != 0"}  # fmt: skip
    if labels is not None:
        scored = labels_output or next((s.name for s in outputs if is_logits_like(s)), None)
        if scored is None or scored not in metrics:
            raise PackagingError("labels were given but no output is logits-like; set options.labels_output")
        ref_pred = np.asarray(reference[scored]).argmax(axis=-1)
        out_pred = np.asarray(built[scored]).argmax(axis=-1)
        y = np.asarray(labels)
        if y.shape != ref_pred.shape:
            raise PackagingError(f"labels have shape {list(y.shape)}; {scored!r} predicts {list(ref_pred.shape)}")
        scored_at = y >= 0  # -100 (transformers' ignore index) marks tokens that are not scored: padding, specials
        if not scored_at.any():
            raise PackagingError("every label is negative (ignored); nothing to score")
        ref_acc = float((ref_pred == y)[scored_at].mean())
        out_acc = float((out_pred == y)[scored_at].mean())
        result["accuracy"] = {"output": scored, "reference": _num(ref_acc), "bundle": _num(out_acc),
                              "drop": _num(ref_acc - out_acc)}  # fmt: skip
        if tolerances.max_accuracy_drop is not None and ref_acc - out_acc > tolerances.max_accuracy_drop + 1e-12:
            failures.append(
                f"accuracy {out_acc:.4f} vs reference {ref_acc:.4f} (drop > {tolerances.max_accuracy_drop})"
            )
    result["passed"] = not failures
    result["failures"] = failures
    return result


def golden_tolerance(tolerances: Tolerances, golden_outputs: Mapping[str, np.ndarray]) -> GoldenTolerance:
    """The golden check's tolerance for these golden outputs (the rule itself: ``sdk.golden``).

    ``atol`` scales with the largest golden output magnitude, so it is loose enough for another
    CPU's kernels and still orders of magnitude below what a broken model produces.
    """
    scale = max((float(np.abs(v.astype(np.float64)).max()) for v in golden_outputs.values() if v.size), default=1.0)
    atol = tolerances.golden_atol_rel * max(scale, 1e-6)
    return GoldenTolerance(
        atol=float(f"{atol:.6g}"), rtol=float(tolerances.golden_rtol), min_cosine=float(tolerances.golden_min_cosine)
    )
