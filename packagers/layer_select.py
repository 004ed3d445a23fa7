"""Which layers a quantizer keeps in float: ``float_layers``, ``exclude`` and ``exclude_op_types`` resolved.

Each int8 target lists its layers as (name, op type) in its own naming (ONNX node names for onnxruntime,
OpenVINO friendly names, which are NNCF's node names, for openvino) and gets back the names to hand to
its quantizer (``nodes_to_exclude``, ``IgnoredScope(names=...)``). Pure Python: no heavy import.

An exclusion that matches no layer of this target is reported (recipe and progress line), not an
error: one ``package`` call builds several targets whose layer names differ.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from packagers.options import PackageOptions

__all__ = ["LayerSelection", "select_layers"]


@dataclass(frozen=True)
class LayerSelection:
    """The layers kept in float, and why each rule matched what it matched."""

    names: tuple[str, ...]  # every layer kept in float, graph order
    float_layers: tuple[str, ...]  # of them, named by options.float_layers (the search's or the user's)
    excluded: tuple[str, ...]  # of them, matched by options.exclude / exclude_op_types
    unmatched: tuple[str, ...]  # rules that matched no layer here

    def report(self) -> dict[str, Any]:
        """The recipe's account: counts and names (what stayed float, and which rules found nothing)."""
        out: dict[str, Any] = {"float_layers": list(self.float_layers), "excluded": list(self.excluded)}
        if self.unmatched:
            out["unmatched"] = list(self.unmatched)
        return out


def select_layers(
    layers: Sequence[tuple[str, str]], options: PackageOptions, op_aliases: Mapping[str, Sequence[str]] | None = None
) -> LayerSelection:
    """The layers of ``layers`` (name, op type) that ``options`` keeps in float.

    ``float_layers`` and ``exclude`` entries match a name exactly; an ``exclude`` entry that is not a
    name is a regular expression that must match a whole name. ``exclude_op_types`` match op types,
    through ``op_aliases`` (ONNX op type -> the target's, e.g. ``Conv -> Convolution``) where given.
    """
    aliases = op_aliases or {}
    names = [name for name, _ in layers]
    known = set(names)
    wanted_float = set(options.float_layers)
    excluded: set[str] = set()
    unmatched = [f"float layer {n}" for n in options.float_layers if n not in known]
    for rule in options.exclude:
        if rule in known:
            excluded.add(rule)
            continue
        pattern = re.compile(rule)
        hits = {n for n in names if pattern.fullmatch(n)}
        if not hits:
            unmatched.append(f"exclude {rule}")
        excluded |= hits
    for op in options.exclude_op_types:
        types = {op, *aliases.get(op, ())}
        hits = {n for n, t in layers if t in types}
        if not hits:
            unmatched.append(f"op type {op}")
        excluded |= hits
    keep = [n for n in names if n in wanted_float or n in excluded]
    return LayerSelection(
        names=tuple(dict.fromkeys(keep)),
        float_layers=tuple(n for n in dict.fromkeys(names) if n in wanted_float),
        excluded=tuple(n for n in dict.fromkeys(names) if n in excluded),
        unmatched=tuple(unmatched),
    )
