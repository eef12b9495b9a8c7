"""tccli.nodes: the names of features, heads and graph nodes, worked out by hand."""

from __future__ import annotations

import pytest

from tccli.errors import TcError
from tccli.nodes import (
    Intervention,
    NodeRef,
    feature_name,
    head_name,
    parse_assignment,
    parse_feature,
    parse_head,
    parse_node,
    short_label,
    target_id,
    target_spec_label,
)


def test_node_ids_of_every_kind():
    assert NodeRef("feature", 8, 1234, 5).id == "mlp8.f1234@5"
    assert NodeRef("head", 3, 2, 4).id == "attn3.h2@4"
    assert NodeRef("error", 8, position=5).id == "err8@5"
    assert NodeRef("skip", 2, position=1).id == "skip2@1"
    assert NodeRef("embed", position=0).id == "embed@0"
    assert NodeRef("pos", position=3).id == "pos@3"
    assert NodeRef("target", position=7).id == "target"
    assert NodeRef("feature", 1, 5).id == "mlp1.f5@*"  # no position: every position (interventions)
    assert NodeRef("feature", 1, 5).at(-1) == NodeRef("feature", 1, 5, -1)


def test_parse_node_reads_back_what_id_writes():
    for node in (NodeRef("feature", 8, 1234, 5), NodeRef("head", 3, 2, -1), NodeRef("error", 0, -1, None)):
        assert parse_node(node.id) == node
    with pytest.raises(TcError, match="bad node 'embed@0'"):
        parse_node("embed@0")  # inputs are not nodes one intervenes on


def test_one_parser_for_feature_names_and_the_names_it_reads_back():
    assert parse_feature("L8.F1234") == parse_feature("8.1234") == parse_feature(" l8.f1234 ") == (8, 1234)
    assert parse_feature(feature_name(2, 57)) == (2, 57) and feature_name(2, 57) == "L2.F57"
    assert parse_head(head_name(3, 2)) == (3, 2) and head_name(3, 2) == "L3.H2"
    for bad in ("F57", "L8", "8:1234", ""):
        with pytest.raises(TcError, match="bad feature name"):
            parse_feature(bad)


def test_assignments_and_labels():
    assert parse_assignment("mlp8.f1234@5=2.5", "set") == Intervention(NodeRef("feature", 8, 1234, 5), "set", 2.5)
    with pytest.raises(TcError, match="bad --scale"):
        parse_assignment("mlp8.f1234@5=inf", "scale")
    assert short_label({"kind": "feature", "layer": 1, "feature": 4}) == "L1.F4"
    assert target_spec_label({"kind": "feature", "layer": 1, "feature": 4}) == "L1.F4 pre-activation"
    assert target_spec_label({"kind": "logit_diff", "token_string": " 40", "token_b_string": " 20"}) == (
        "logit(' 40') - logit(' 20')"
    )
    assert target_id({"kind": "logit", "demeaned": True, "token": 9, "position": 3}, 2) == "logit9@3"
    assert target_id({"kind": "logit", "token": 9, "position": 3}, 1) == "target"
