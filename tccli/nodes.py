"""How users and files name the things of a circuit: features, heads and nodes (one home for their ids).

A feature is ``L8.F1234`` (or ``8.1234``) on the command line; a head ``L3.H2``; a node of a graph or an
intervention ``mlp8.f1234@5`` (a transcoder feature's activation at token 5), ``attn3.h2@4`` (head 2 of
layer 3's term read from source token 4), ``err8@5`` (an error term); ``@*`` every position, a negative
position counts from the end. Imports no torch."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from tccli.errors import fail


@dataclass(frozen=True)
class NodeRef:
    """A node of a circuit or attribution graph, or one to intervene on: (kind, layer, index, position).

    ``index`` is the feature or the head, -1 where the kind has none; ``position`` None means every position
    (interventions only), a negative one counts from the end. Its ``id`` is the node's name in every graph
    tc writes and every node tc intervene and tc validate read.
    """

    kind: str  # feature | head | error | skip | embed | pos | target
    layer: int = -1
    index: int = -1
    position: Optional[int] = None

    @property
    def id(self) -> str:
        where = "*" if self.position is None else str(self.position)
        if self.kind == "target":
            return "target"
        if self.kind == "feature":
            return f"mlp{self.layer}.f{self.index}@{where}"
        if self.kind == "head":
            return f"attn{self.layer}.h{self.index}@{where}"
        if self.kind == "error":
            return f"err{self.layer}@{where}"
        if self.kind == "skip":
            return f"skip{self.layer}@{where}"
        return f"{self.kind}@{where}"  # embed, pos

    def at(self, position: Optional[int]) -> NodeRef:
        return NodeRef(self.kind, self.layer, self.index, position)


_NODE_ID = re.compile(
    r"(?:mlp(?P<feature_layer>\d+)\.f(?P<feature>\d+)|attn(?P<head_layer>\d+)\.h(?P<head>\d+)"
    r"|err(?P<error_layer>\d+))@(?P<position>\*|-?\d+)"
)


def parse_node(text: str) -> NodeRef:
    """'mlp8.f1234@5', 'attn3.h2@4', 'err8@5', any of them '@*' -> NodeRef."""
    match = _NODE_ID.fullmatch((text or "").strip())
    if not match:
        raise fail(
            f"bad node {text!r}: use mlp8.f1234@5 (a feature), attn3.h2@4 (a head's term from source "
            "token 4), err8@5 (an error term); @* for every position, @-1 for the last"
        )
    groups = match.groupdict()
    position = None if groups["position"] == "*" else int(groups["position"])
    if groups["feature_layer"] is not None:
        return NodeRef("feature", int(groups["feature_layer"]), int(groups["feature"]), position)
    if groups["head_layer"] is not None:
        return NodeRef("head", int(groups["head_layer"]), int(groups["head"]), position)
    return NodeRef("error", int(groups["error_layer"]), -1, position)


def parse_feature(spec: str) -> tuple[int, int]:
    """'L8.F1234', '8.1234' -> (8, 1234)."""
    match = re.fullmatch(r"\s*[Ll]?(\d+)\.[Ff]?(\d+)\s*", spec or "")
    if not match:
        raise fail(f"bad feature name {spec!r}: use L<layer>.F<index>, e.g. L8.F1234 (or 8.1234)")
    return int(match.group(1)), int(match.group(2))


def parse_head(spec: str) -> tuple[int, int]:
    """'L3.H2', '3.2' -> (3, 2)."""
    match = re.fullmatch(r"\s*[Ll]?(\d+)\.[Hh]?(\d+)\s*", spec or "")
    if not match:
        raise fail(f"bad head {spec!r}: use LAYER.HEAD, e.g. L3.H2")
    return int(match.group(1)), int(match.group(2))


OPS = ("ablate", "set", "scale")


@dataclass(frozen=True)
class Intervention:
    node: NodeRef
    op: str  # ablate | set | scale
    value: float = 0.0  # set: the activation; scale: the factor; ablate: unused

    def describe(self) -> str:
        if self.op == "ablate":
            return f"ablate {self.node.id}"
        return f"{self.op} {self.node.id}={self.value:g}"


def parse_assignment(text: str, op: str) -> Intervention:
    """'mlp8.f1234@5=2.5' -> Intervention(op=op, value=2.5)."""
    node_text, sep, value_text = (text or "").rpartition("=")
    try:
        value = float(value_text)
    except ValueError:
        value = float("nan")
    if not sep or not math.isfinite(value):
        raise fail(f"bad --{op} {text!r}: use NODE=NUMBER, e.g. mlp8.f1234@5=2.5")
    return Intervention(parse_node(node_text), op, value)


# ============================================================================ labels (what people read)


def feature_name(layer: int, feature: int) -> str:
    """`L8.F1234`: a feature as users type it (``parse_feature`` reads it back) and tables show it."""
    return f"L{layer}.F{feature}"


def head_name(layer: int, head: int) -> str:
    """`L3.H2`: a head as users type it (``parse_head`` reads it back)."""
    return f"L{layer}.H{head}"


def neuronpedia_feature_id(layer: int, feature: int) -> int:
    """The number circuit-tracer's and Neuronpedia's viewers name a transcoder feature by (a graph node's
    ``feature``, a feature file's name): the Cantor pairing (l + f)(l + f + 1)/2 + f of (layer, feature),
    which they decode back into the layer and the feature to look it up."""
    if layer < 0 or feature < 0:
        raise ValueError(f"a feature has a layer and an index >= 0, got ({layer}, {feature})")
    total = layer + feature
    return total * (total + 1) // 2 + feature


def quoted_token(text: Any) -> str:
    """A token in double quotes, so its spaces show: `" 17"`."""
    return json.dumps(str(text), ensure_ascii=False)


def node_label(attrs: dict) -> str:
    """`L8 F1234 "Paris" @5`, `L3 H2 "cat" @4`, `embed "cat" @4`, `err L8 @5`, or the target's description."""
    where = f"{quoted_token(attrs.get('token', ''))} @{attrs.get('position')}"
    kind = attrs.get("kind")
    if kind == "feature":
        return f"L{attrs['layer']} F{attrs['feature']} {where}"
    if kind == "head":
        return f"L{attrs['layer']} H{attrs['head']} {where}"
    if kind == "error":
        return f"err L{attrs['layer']} @{attrs.get('position')}"
    if kind == "skip":
        return f"skip L{attrs['layer']} {where}"
    if kind == "target":
        return target_label(attrs)
    return f"{kind} {where}"


def short_label(attrs: dict) -> str:
    """A node's name inside its cell of the picture (the column already says the token)."""
    kind = attrs.get("kind")
    if kind == "feature":
        return feature_name(attrs["layer"], attrs["feature"])
    if kind == "head":
        return head_name(attrs["layer"], attrs["head"])
    if kind == "error":
        return f"err L{attrs['layer']}"
    if kind == "skip":
        return f"skip L{attrs['layer']}"
    if kind == "target":
        return target_label(attrs)
    return str(kind)


def target_description(attrs: dict) -> str:
    """What a target node measures: `logit(" 40") - logit(" 20")`, `L3.F545 pre-activation`, ..."""
    kind = attrs.get("target_kind")

    def token(which: str) -> str:
        text = attrs.get(f"target_{which}_string")
        return quoted_token(text) if text is not None else f"#{attrs.get(f'target_{which}')}"

    if kind == "logit":
        return f"logit({token('token')})"
    if kind == "logit_diff":
        return f"logit({token('token')}) - logit({token('token_b')})"
    if kind == "feature":
        return f"{feature_name(attrs.get('layer'), attrs.get('target_feature'))} pre-activation"
    if kind == "direction":
        return f"direction . resid_pre[{attrs.get('layer')}]"
    return "target"


def target_label(attrs: dict) -> str:
    """`logit(" 40") - logit(" 20") at " 17"@12 = 0.735`."""
    value = attrs.get("activation")
    shown = f" = {value:.3g}" if isinstance(value, (int, float)) else ""
    return f"{target_description(attrs)} at {quoted_token(attrs.get('token', ''))}@{attrs.get('position')}{shown}"


def target_spec_label(target: dict) -> str:
    """What a ``TargetSpec``'s description measures, as `tc intervene` prints it: `logit(' 40')`, ..."""
    kind = target.get("kind")
    if kind == "feature":
        return f"{feature_name(target['layer'], target['feature'])} pre-activation"
    if kind == "logit":
        return f"logit({target.get('token_string', target.get('token'))!r})"
    if kind == "logit_diff":
        return (
            f"logit({target.get('token_string', target.get('token'))!r}) - "
            f"logit({target.get('token_b_string', target.get('token_b'))!r})"
        )
    return f"direction . resid_pre[{target.get('layer')}]"


def target_id(target: dict, n_targets: int) -> str:
    """A target node's id: `logit{token}@{position}` for tc graph's logit targets, else `target`."""
    if target.get("kind") == "logit" and target.get("demeaned"):
        return f"logit{target['token']}@{target['position']}"
    return "target"
