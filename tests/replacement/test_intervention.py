"""The replacement model and `tc intervene`: exact when nothing changes, exact edges in direct mode, first
order against an independent local replacement model in frozen mode, head terms against a hand computation."""

from __future__ import annotations

import json

import pytest
import torch

from circuit_helpers import loaded_model, random_transcoders
from conftest import run_tc
from tccli.circuit.trace import circuit_graph
from tccli.config.circuit import CircuitConfig
from tccli.config.replacement import MODES
from tccli.errors import TcError
from tccli.nodes import Intervention, NodeRef, parse_assignment, parse_node
from tccli.replacement import attribution
from tccli.replacement.frozen import FrozenForward
from tccli.replacement.model import ReplacementModel, RowSpec
from tccli.replacement.prompts import freeze_prompt
from tccli.replacement.targets import Target, TargetSpec, feature_target, unembed_target

PROMPT_IDS = [0, 37, 90, 151, 12, 200, 64, 7, 99]
PROMPT = "The war lasted from 1735 to 17"


def setup(path, dtype: str = "float64", **kwargs):
    loaded = loaded_model(path, dtype)
    torch_dtype = torch.float64 if dtype == "float64" else torch.float32
    transcoders = random_transcoders(loaded.info, 48, 0, torch_dtype, bias_shift=-0.3, **kwargs)
    return loaded, transcoders


def ablate(node: NodeRef) -> tuple[Intervention, ...]:
    return (Intervention(node, "ablate"),)


# ---------------------------------------------------------------------------- node ids


def test_parse_node_and_assignment():
    assert parse_node("mlp8.f1234@5") == NodeRef("feature", 8, 1234, 5)
    assert parse_node("attn3.h2@4") == NodeRef("head", 3, 2, 4)
    assert parse_node("err0@-1") == NodeRef("error", 0, -1, -1)
    assert parse_node("mlp1.f3@*") == NodeRef("feature", 1, 3, None) and parse_node("mlp1.f3@*").id == "mlp1.f3@*"
    for text in ("mlp8.f1234", "L8.F12@3", "attn3@4", "err8@x", ""):
        with pytest.raises(TcError, match="bad node"):
            parse_node(text)
    assert parse_assignment("mlp0.f1@2=-2.5", "set") == Intervention(NodeRef("feature", 0, 1, 2), "set", -2.5)
    for text in ("mlp0.f1@2", "mlp0.f1@2=x", "mlp0.f1@2=nan"):
        with pytest.raises(TcError, match="bad --scale"):
            parse_assignment(text, "scale")


# ---------------------------------------------------------------------------- no intervention: the model itself


@pytest.mark.parametrize("arch, skip", [("gpt2", False), ("neox", False), ("llama", False), ("llama", True)])
def test_no_intervention_reproduces_the_models_logits_exactly(tiny_model_dirs, arch, skip, one_torch_thread):
    loaded, transcoders = setup(tiny_model_dirs[arch], "float32")
    if skip:
        transcoders = with_skip(transcoders)
    tokens = torch.tensor([PROMPT_IDS, PROMPT_IDS[::-1]])
    logits = loaded.bridge.run_with_hooks(tokens, return_type="logits").detach()  # the plain model
    model = ReplacementModel(loaded, transcoders, tokens)
    assert torch.equal(model.clean_logits, logits)
    for mode in MODES:
        out = model.run([RowSpec(0), RowSpec(1)], mode)
        assert torch.equal(out.logits, logits), mode
    # an intervention at the last position leaves every earlier position bit for bit as it was (compared
    # within one batch: the model itself rounds differently for batches of other shapes)
    out = model.run([RowSpec(0), RowSpec(0, ablate(NodeRef("error", 0, -1, -1)))], "free").logits
    assert torch.equal(out[1, :-1], out[0, :-1]) and not torch.equal(out[1, -1], out[0, -1])


def test_every_error_ablated_is_plain_huggingface_with_the_mlps_replaced(tiny_model_dirs, one_torch_thread):
    """Free mode with every error term ablated is the model with every MLP replaced by its transcoder (tc
    eval's all-layers run): on the LayerNorm GPT-2 with a resid_mid -> mlp_out set whose outputs have a large
    mean, its next-token distributions equal plain HuggingFace's with the MLPs replaced by hooks: that mean
    reaches no reader, the next layer's resid_mid included."""
    from circuit_helpers import plain_gpt2_with_transcoders

    loaded, transcoders = setup(tiny_model_dirs["gpt2"], "float32", input_space="resid_mid", output_space="mlp_out")
    with torch.no_grad():
        for transcoder in transcoders.values():
            transcoder.b_dec.add_(1.0)
    tokens = torch.tensor([PROMPT_IDS])
    model = ReplacementModel(loaded, transcoders, tokens)
    errors = tuple(Intervention(NodeRef("error", layer, -1, None), "ablate") for layer in transcoders)
    logits = model.run([RowSpec(0, errors)], "free").logits
    clean, spliced = plain_gpt2_with_transcoders(tiny_model_dirs["gpt2"], transcoders, tokens)
    got, expected = torch.log_softmax(logits.double(), -1), torch.log_softmax(spliced.double(), -1)
    assert float((expected - torch.log_softmax(clean.double(), -1)).abs().max()) > 0.1  # the set changes it
    assert torch.allclose(got, expected, atol=2e-5, rtol=0), float((got - expected).abs().max())


# ---------------------------------------------------------------------------- direct mode: exact edges


def circuit_config(transcoder_dir, **kwargs) -> CircuitConfig:
    base = dict(transcoders=str(transcoder_dir), prompt=PROMPT, iters=2, branches=6, both_signs=True)
    base.update(kwargs)
    config = CircuitConfig(**base)
    config.validate()
    return config


def target_spec_of(meta: dict) -> TargetSpec:
    from tccli.evaluation.validation import target_from_metadata

    return target_from_metadata(meta, None)


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
@pytest.mark.parametrize("target", [dict(logit_diff=["1", "0"]), dict(feature="L1.F5")])
def test_direct_mode_changes_the_target_by_exactly_the_edges_into_it(
    tiny_model_dirs, arch, target, tmp_path, one_torch_thread
):
    loaded, transcoders = setup(tiny_model_dirs[arch], "float64")
    graph, _ = circuit_graph(loaded, transcoders, PROMPT, circuit_config(tmp_path, **target))
    meta = graph.graph["metadata"]
    model = ReplacementModel(loaded, transcoders, torch.tensor([meta["token_ids"]]))
    spec = target_spec_of(meta)
    clean = float(spec.values(model, model.run([RowSpec(0)], "direct", capture=spec.capture_names(model)))[0])
    # (Llama's float64 forward rounds some steps in float32, see test_attribution: 1e-6 here, not 1e-9)
    assert clean == pytest.approx(meta["target_value"], rel=1e-6, abs=1e-9)
    checked = set()
    for source, _, weight in graph.in_edges("target", data="weight"):
        attrs = graph.nodes[source]
        if attrs["kind"] not in ("feature", "head", "error"):
            continue
        node = parse_node(source)
        out = model.run([RowSpec(0, ablate(node))], "direct", capture=spec.capture_names(model))
        change = float(spec.values(model, out)[0]) - clean
        assert abs(change + weight) <= 1e-5 * abs(weight), (source, change, weight)
        checked.add(attrs["kind"])
    assert {"feature", "error"} <= checked  # the graph fed the test real edges of these kinds
    # head terms are rarely among the greedy graph's top edges into the target on a random model: check
    # the three largest head edges of the unpruned one-hop graph (what tc circuit's edges are made of)
    frozen = freeze_prompt(loaded, transcoders, torch.tensor(meta["token_ids"]))
    position = meta["position"]
    vector = (
        unembed_target(frozen, spec.token, spec.token_b, position)
        if spec.kind == "logit_diff"
        else feature_target(frozen, spec.layer, spec.feature, position)
    )
    heads = attribution.direct_contributions(frozen, vector.vector, position, vector.read_point).heads
    for layer, edges in heads.items():
        for flat in edges.abs().reshape(-1).topk(3).indices.tolist():
            head, source = divmod(flat, edges.shape[1])
            out = model.run(
                [RowSpec(0, ablate(NodeRef("head", layer, head, source)))], "direct", capture=spec.capture_names(model)
            )
            change = float(spec.values(model, out)[0]) - clean
            weight = float(edges[head, source])
            assert abs(change + weight) <= 1e-5 * abs(weight), (layer, head, source, change, weight)


def test_direct_mode_float32_and_keep_only(tiny_model_dirs, one_torch_thread):
    """float32: edges to rounding of the target's scale; keeping no feature removes every feature's edge."""
    loaded, transcoders = setup(tiny_model_dirs["llama"], "float32")
    tokens = torch.tensor(PROMPT_IDS)
    frozen = freeze_prompt(loaded, transcoders, tokens)
    target = unembed_target(frozen, 17, 40, 8)
    direct = attribution.direct_contributions(frozen, target.vector, target.position, target.read_point)
    spec = TargetSpec("logit_diff", 8, token=17, token_b=40)
    model = ReplacementModel(loaded, transcoders, tokens.unsqueeze(0))
    rows = [RowSpec(0), RowSpec(0, keep_only=frozenset())]
    for layer, contributions in direct.features.items():
        feature = int(contributions.abs().argmax())
        rows.append(RowSpec(0, ablate(NodeRef("feature", layer, feature, 8))))
    values = spec.values(model, model.run(rows, "direct"))
    scale = sum(float(t.abs().sum()) for t in direct.features.values()) + abs(target.value)
    every_feature = sum(float(t.sum()) for t in direct.features.values())
    assert abs(float(values[1] - values[0]) + every_feature) <= 1e-5 * scale
    for k, contributions in enumerate(direct.features.values()):
        edge = float(contributions[int(contributions.abs().argmax())])
        assert abs(float(values[2 + k] - values[0]) + edge) <= 1e-5 * scale


def test_set_scale_and_mean_ablation_of_a_feature_in_direct_mode(tiny_model_dirs, one_torch_thread):
    loaded, transcoders = setup(tiny_model_dirs["gpt2"], "float64")
    tokens = torch.tensor(PROMPT_IDS)
    frozen = freeze_prompt(loaded, transcoders, tokens)
    target = unembed_target(frozen, 17, None, 8)
    contributions = attribution.direct_contributions(frozen, target.vector, 8, target.read_point).features[1]
    feature = int(contributions.abs().argmax())
    z = float(frozen.layers[1].z[8, feature])
    edge = float(contributions[feature])
    means = {layer: torch.full((48,), 0.25, dtype=torch.float64) for layer in transcoders}
    model = ReplacementModel(loaded, transcoders, tokens.unsqueeze(0), means)
    spec = TargetSpec("logit", 8, token=17)
    node = NodeRef("feature", 1, feature, 8)
    rows = [
        RowSpec(0),
        RowSpec(0, (Intervention(node, "set", 2 * z),)),
        RowSpec(0, (Intervention(node, "scale", 3.0),)),
        RowSpec(0, ablate(node)),
    ]
    out = model.run(rows[:3], "direct")
    values = spec.values(model, out)
    assert float(values[1] - values[0]) == pytest.approx(edge, rel=1e-9)  # set to twice: one more edge
    assert float(values[2] - values[0]) == pytest.approx(2 * edge, rel=1e-9)
    mean_run = spec.values(model, model.run(rows[3:], "direct", ablation="mean"))
    assert float(mean_run[0] - values[0]) == pytest.approx((0.25 / z - 1) * edge, rel=1e-9)
    with pytest.raises(TcError, match="needs its features' means"):
        ReplacementModel(loaded, transcoders, tokens.unsqueeze(0)).run(rows[3:], "direct", ablation="mean")


# ---------------------------------------------------------------------------- frozen mode: first order


def local_replacement_target(
    frozen: FrozenForward, target: Target, feature_shift: dict, head_factor: dict, error_factor: dict
) -> torch.Tensor:
    """An independent oracle: the local replacement model (patterns and norm scales frozen, errors held,
    features recomputed) written out in plain torch from the frozen forward pass, with every feature
    activation shifted, every head term (per source) and every error term scaled."""

    def normalised(resid: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if frozen.layernorm:
            resid = resid - resid.mean(-1, keepdim=True)
        return resid / scale.unsqueeze(-1)

    resid = frozen.embed + (frozen.pos_embed if frozen.pos_embed is not None else 0)
    reads = {(0, 0): resid}
    for layer, fl in enumerate(frozen.layers):
        value_bias = fl.values - torch.einsum("td,hde->the", normalised(fl.resid_pre, fl.attn_scale), fl.W_V)
        values = torch.einsum("td,hde->the", normalised(resid, fl.attn_scale), fl.W_V) + value_bias
        written = torch.einsum("she,hed->hsd", values, fl.W_O)  # each head's write per source
        attn = torch.einsum("hts,hs,hsd->td", fl.pattern, head_factor[layer], written) + fl.b_O
        mlp_read = resid if frozen.parallel else resid + attn
        reads[frozen.mlp_read_point(layer)] = mlp_read
        if fl.transcoder is not None:
            x = normalised(mlp_read, fl.mlp_scale)
            z = fl.transcoder.encode(x) + feature_shift[layer]
            out = fl.transcoder.decode(z) + error_factor[layer].unsqueeze(-1) * fl.error
            if fl.transcoder.W_skip is not None:  # the skip term is the transcoder's (freeze keeps it out of
                out = out + fl.transcoder.skip_term(x)  # the error): recomputed from the input
        else:
            out = error_factor[layer].unsqueeze(-1) * fl.mlp_out
        resid = resid + attn + out
        reads[(layer + 1, layer + 1)] = resid
    return target.vector @ reads[target.read_point][target.position] + target.constant


def oracle_gradients(frozen, target):
    T, L = frozen.n_tokens, frozen.n_layers
    dtype = frozen.embed.dtype
    shift = {i: torch.zeros(T, 48, dtype=dtype, requires_grad=True) for i in range(L)}
    heads = {i: torch.ones(frozen.layers[i].n_heads, T, dtype=dtype, requires_grad=True) for i in range(L)}
    errors = {i: torch.ones(T, dtype=dtype, requires_grad=True) for i in range(L)}
    value = local_replacement_target(frozen, target, shift, heads, errors)
    tensors = list(shift.values()) + list(heads.values()) + list(errors.values())
    grads = torch.autograd.grad(value, tensors)
    return (
        float(value),
        dict(zip(range(L), grads[:L])),
        dict(zip(range(L), grads[L : 2 * L])),
        dict(zip(range(L), grads[2 * L :])),
    )


def with_skip(transcoders: dict, seed: int = 5) -> dict:
    """The same transcoders with a random skip connection x W_skip added (skip transcoders)."""
    import dataclasses

    from tccli.transcoders.transcoder import Transcoder

    generator = torch.Generator().manual_seed(seed)
    out = {}
    for layer, transcoder in transcoders.items():
        skipped = Transcoder(dataclasses.replace(transcoder.config, skip=True)).to(transcoder.W_enc.dtype)
        with torch.no_grad():
            for name in transcoder.tensor_names():
                getattr(skipped, name).copy_(getattr(transcoder, name))
            d = skipped.W_skip.shape[0]
            skipped.W_skip.copy_(torch.randn(skipped.W_skip.shape, generator=generator) * 0.5 / d**0.5)
        out[layer] = skipped
    return out


@pytest.mark.parametrize("arch, skip", [("gpt2", False), ("neox", False), ("llama", False), ("gpt2", True)])
def test_frozen_steer_is_the_total_effect_over_all_paths_to_first_order(tiny_model_dirs, arch, skip, one_torch_thread):
    """(With skip transcoders the skip term is part of the transcoder's output: it responds downstream.)"""
    loaded, transcoders = setup(tiny_model_dirs[arch], "float64")
    if skip:
        transcoders = with_skip(transcoders)
    tokens = torch.tensor(PROMPT_IDS)
    frozen = freeze_prompt(loaded, transcoders, tokens)
    target = unembed_target(frozen, 17, 40, 8)
    value, d_feature, d_head, d_error = oracle_gradients(frozen, target)
    # the oracle is the frozen forward pass (Llama's float64 attention rounds in float32 inside, so its
    # decomposition holds to ~1e-7 of the terms' scale only: see test_attribution)
    tolerance = 1e-4 if arch == "llama" else 1e-9
    assert value == pytest.approx(target.value, rel=tolerance, abs=1e-9)
    total_feature = {i: frozen.layers[i].z * g for i, g in d_feature.items()}  # activation x derivative

    # the node to steer: the layer-0 feature with the largest total effect (it acts through layer 1 as well),
    # a layer-0 head term, a layer-0 error term
    feature = divmod(int(total_feature[0].abs().argmax()), 48)
    head = divmod(int(d_head[0].abs().argmax()), len(PROMPT_IDS))
    position = int(d_error[0].abs().argmax())
    steered = [
        (NodeRef("feature", 0, feature[1], feature[0]), float(total_feature[0][feature])),
        (NodeRef("head", 0, head[0], head[1]), float(d_head[0][head])),
        (NodeRef("error", 0, -1, position), float(d_error[0][position])),
    ]
    # the layer-0 feature's total effect differs from its direct one: paths through layer 1 count
    direct = attribution.direct_contributions(frozen, target.vector, 8, target.read_point).features[0]
    assert abs(float(direct[feature[1]]) - steered[0][1]) > 1e-3 * abs(steered[0][1]) or feature[0] != 8

    spec = TargetSpec("logit_diff", 8, token=17, token_b=40)
    model = ReplacementModel(loaded, transcoders, tokens.unsqueeze(0))
    # small enough that no feature crosses its threshold (at 1e-3 one of layer 1's, 0.009 from zero, does)
    epsilons = (1e-5, 1e-6)
    rows = [RowSpec(0)] + [
        RowSpec(0, (Intervention(node, "scale", 1 + eps),)) for node, _ in steered for eps in epsilons
    ]
    values = spec.values(model, model.run(rows, "frozen"))
    for k, (node, total) in enumerate(steered):
        for j, eps in enumerate(epsilons):
            ratio = float(values[1 + 2 * k + j] - values[0]) / eps
            assert ratio == pytest.approx(total, rel=1e-4, abs=1e-8), (node.id, eps, ratio, total)

    # and the library's own derivatives (one backward pass) are the oracle's, for every node
    gradients = model.node_gradients(spec)
    for layer in range(frozen.n_layers):
        for ours, oracle in ((gradients.feature, d_feature), (gradients.head, d_head), (gradients.error, d_error)):
            scale = float(oracle[layer].abs().max())
            assert torch.allclose(ours[layer][0], oracle[layer], rtol=0, atol=tolerance * scale), layer


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_frozen_steer_is_the_path_sum_of_the_unpruned_tc_graph(tiny_model_dirs, arch, tmp_path, one_torch_thread):
    """The same first-order identity with `tc graph`'s adjacency as the oracle: every node's summed
    attribution over the paths of an unpruned attribution graph is the frozen model's derivative (one
    backward pass), and a small steer of a node moves the target by it."""
    from tccli.config.graph import GraphConfig
    from tccli.evaluation.validation import path_attributions, target_from_metadata
    from tccli.graph.files import to_networkx
    from tccli.graph.trace import attribution_graph

    loaded, transcoders = setup(tiny_model_dirs[arch], "float64")
    config = GraphConfig(
        transcoders=str(tmp_path),
        prompt=PROMPT,
        logit_diff=["1", "0"],
        node_threshold=1.0,
        edge_threshold=1.0,
        drop_mass=0.0,
        max_feature_nodes=10_000,
    )
    config.validate()
    run = attribution_graph(loaded, transcoders, PROMPT, config)
    graph = to_networkx(run.graph, run.metadata, run.strings, run.tokens)
    summed = path_attributions(graph, "target")
    meta = graph.graph["metadata"]
    model = ReplacementModel(loaded, transcoders, torch.tensor([meta["token_ids"]]))
    spec = target_from_metadata(meta, loaded)
    gradients = model.node_gradients(spec)
    tolerance = 1e-4 if arch == "llama" else 1e-8  # Llama's float64 rounds in float32 inside (test_attribution)
    features = [(node, attrs) for node, attrs in graph.nodes(data=True) if attrs["kind"] == "feature"]
    assert len(features) >= 10
    scale = max(abs(summed[node]) for node, _ in features)
    for node, attrs in features:
        layer, position, index = attrs["layer"], attrs["position"], attrs["feature"]
        total = float(gradients.activations[layer][0, position, index] * gradients.feature[layer][0, position, index])
        assert abs(summed[node] - total) <= tolerance * scale, (node, summed[node], total)
    for node, attrs in graph.nodes(data=True):
        if attrs["kind"] == "error":
            total = float(gradients.error[attrs["layer"]][0, attrs["position"]])
            assert abs(summed[node] - total) <= tolerance * scale, (node, summed[node], total)
    largest = sorted(features, key=lambda item: -abs(summed[item[0]]))[:3]
    rows = [RowSpec(0)] + [
        RowSpec(0, (Intervention(parse_node(node), "scale", 1 + eps),)) for node, _ in largest for eps in (1e-5, 1e-6)
    ]
    values = spec.values(model, model.run(rows, "frozen"))
    for k, (node, _) in enumerate(largest):
        for j, eps in enumerate((1e-5, 1e-6)):
            ratio = float(values[1 + 2 * k + j] - values[0]) / eps
            assert ratio == pytest.approx(summed[node], rel=1e-4, abs=1e-6 * scale), (node, eps)


# ---------------------------------------------------------------------------- a head's term, by hand


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_head_term_ablation_is_pattern_times_value_times_W_O(tiny_model_dirs, arch, one_torch_thread):
    loaded = loaded_model(tiny_model_dirs[arch], "float64")
    info, bridge = loaded.info, loaded.bridge
    tokens = torch.tensor([PROMPT_IDS])
    layer, head, source = 0, 3, 2
    hooks = info.layer(layer)
    seen = {}

    def keep(name):
        def hook(tensor, hook):
            seen[name] = tensor.detach()
            return tensor

        return hook

    bridge.run_with_hooks(
        tokens,
        fwd_hooks=[(hooks.attn_pattern, keep("pattern")), (hooks.attn_normalized, keep("x"))],
        return_type="logits",
    )
    kv = head // (info.n_heads // info.n_kv_heads)
    value = seen["x"][0, source] @ bridge.W_V[layer, kv].detach()
    if getattr(bridge, "b_V", None) is not None:
        value = value + bridge.b_V[layer, kv].detach()
    term = seen["pattern"][0, head, :, source].unsqueeze(-1) * (value @ bridge.W_O[layer, head].detach())  # [T, d]
    assert term.abs().max() > 1e-3

    def remove(tensor, hook):
        return tensor - term.to(tensor.dtype)

    by_hand = bridge.run_with_hooks(tokens, fwd_hooks=[(hooks.attn_out, remove)], return_type="logits").detach()
    model = ReplacementModel(loaded, {}, tokens)  # no transcoders: the replacement model is the model
    node = NodeRef("head", layer, head, source)
    out = model.run([RowSpec(0, ablate(node)), RowSpec(0, (Intervention(node, "scale", 3.0),))], "free")
    # Llama's RMSNorm rounds its output to float32 even in a float64 model (HF casts inside), so the value the
    # model uses differs from ln1.hook_normalized @ W_V by ~1e-8; the others agree to float64 rounding
    atol = 1e-7 if arch == "llama" else 1e-10
    assert torch.allclose(out.logits[0], by_hand[0], rtol=0, atol=atol)
    tripled = bridge.run_with_hooks(
        tokens, fwd_hooks=[(hooks.attn_out, lambda t, hook: t + 2 * term)], return_type="logits"
    ).detach()
    assert torch.allclose(out.logits[1], tripled[0], rtol=0, atol=atol)
    assert not torch.allclose(out.logits[0], tripled[0], rtol=0, atol=1e3 * atol)  # the two differ for real


# ---------------------------------------------------------------------------- stories260K


def test_stories260k_no_intervention_and_direct_edges(stories_dir, one_torch_thread):
    loaded, transcoders = setup(stories_dir, "float32")
    encode = lambda text: loaded.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    tokens = torch.tensor([loaded.info.bos_token_id] + encode("Once upon a time, there was a little girl named Lily."))
    she, he = encode("she")[-1], encode("he")[-1]
    last = len(tokens) - 1
    frozen = freeze_prompt(loaded, transcoders, tokens)
    model = ReplacementModel(loaded, transcoders, tokens.unsqueeze(0))
    assert torch.equal(model.run([RowSpec(0)], "free").logits, model.clean_logits)
    target = unembed_target(frozen, she, he, last)
    direct = attribution.direct_contributions(frozen, target.vector, last, target.read_point)
    spec = TargetSpec("logit_diff", last, token=she, token_b=he)
    rows = [RowSpec(0)]
    edges = []
    for layer, contributions in direct.features.items():
        feature = int(contributions.abs().argmax())
        rows.append(RowSpec(0, ablate(NodeRef("feature", layer, feature, last))))
        edges.append(float(contributions[feature]))
    values = spec.values(model, model.run(rows, "direct"))
    scale = sum(float(t.abs().sum()) for t in direct.features.values()) + abs(target.value)
    for k, edge in enumerate(edges):
        assert abs(float(values[1 + k] - values[0]) + edge) <= 1e-5 * scale, (k, edge)


# ---------------------------------------------------------------------------- the command


@pytest.fixture
def gpt2_files(tiny_model_dirs, random_transcoder_folder, tmp_path):
    """The tiny GPT-2, the shared random transcoders setup() makes (in float32), and a folder for outputs."""
    tcs = random_transcoder_folder("gpt2", bias_shift=-0.3)
    return dict(root=tmp_path, model=str(tiny_model_dirs["gpt2"]), tcs=str(tcs))


def intervene(files, *args):
    return run_tc("intervene", "--model", files["model"], "--transcoders", files["tcs"], "--prompt", PROMPT, *args)


def test_intervene_command_text_and_json(gpt2_files):
    result = intervene(
        gpt2_files,
        "--logit-diff",
        "1",
        "0",
        "--ablate",
        "mlp1.f3@-1",
        "attn1.h2@3",
        "--scale",
        "err0@*=0.5",
        "--set",
        "mlp0.f7@4=2",
        "--top",
        "3",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["interventions"] == ["ablate mlp1.f3@-1", "ablate attn1.h2@3", "set mlp0.f7@4=2", "scale err0@*=0.5"]
    assert len(data["top_before"]) == 3 and data["kl"] > 0
    target = data["target"]
    assert target["kind"] == "logit_diff" and target["change"] == pytest.approx(target["after"] - target["before"])
    # the same in the library: before is the model's own logit difference
    loaded = loaded_model(gpt2_files["model"])
    ids = [loaded.info.bos_token_id] + loaded.tokenizer.encode(PROMPT, add_special_tokens=False)
    logits = loaded.bridge.run_with_hooks(torch.tensor([ids]), return_type="logits")[0, -1]
    one, zero = (loaded.tokenizer.encode(t, add_special_tokens=False)[0] for t in ("1", "0"))
    assert target["before"] == pytest.approx(float(logits[one] - logits[zero]), rel=1e-6)
    text = intervene(gpt2_files, "--feature", "L1.F5", "--ablate", "mlp0.f7@*", "--mode", "frozen")
    assert text.returncode == 0 and "L1.F5 pre-activation" in text.stdout and "frozen mode" in text.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ablate", "mlp1.f99@2"], "feature 99 is out of range"),
        (["--ablate", "mlp1.f3@40"], "position 40 is outside"),
        (["--ablate", "attn0.h9@1"], "head 9 is out of range"),
        (["--set", "attn0.h1@1=2"], "only a feature's activation can be set"),
        (["--ablate", "mlp0:f3@1"], "bad node"),
        (["--ablation", "mean"], "needs --features"),
        (["--mode", "loose"], "--mode must be one of"),
        (["--logit", "1", "--feature", "L1.F5"], "exactly one target"),
    ],
)
def test_intervene_bad_input_is_one_line(gpt2_files, args, message):
    result = intervene(gpt2_files, *args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tc: error:") and message in lines[0], result.stderr


def test_mean_ablation_reads_means_from_a_tc_score_file(gpt2_files, text_file):
    from tccli.features.files import FeaturesFile

    features = gpt2_files["root"] / "features.h5"
    scored = run_tc(
        "score",
        "--model",
        gpt2_files["model"],
        "--transcoders",
        gpt2_files["tcs"],
        "--data",
        str(text_file),
        "--tokens",
        "480",
        "--context",
        "24",
        "--out",
        str(features),
        "--quiet",
    )
    assert scored.returncode == 0, scored.stderr
    means = FeaturesFile.open(features).mean_activations(1)
    feature = int(means.argmax())
    assert means[feature] > 0
    result = intervene(
        gpt2_files,
        "--logit",
        "1",
        "--ablate",
        f"mlp1.f{feature}@-1",
        "--ablation",
        "mean",
        "--features",
        str(features),
        "--mode",
        "direct",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    change = json.loads(result.stdout)["target"]["change"]
    # direct mode: the change is (mean - z) f_dec . v, computed here from the frozen forward pass
    loaded = loaded_model(gpt2_files["model"])
    from tccli.transcoders.formats import load_transcoder_set

    transcoders = load_transcoder_set(gpt2_files["tcs"])
    ids = torch.tensor([loaded.info.bos_token_id] + loaded.tokenizer.encode(PROMPT, add_special_tokens=False))
    frozen = freeze_prompt(loaded, transcoders, ids)
    last = len(ids) - 1
    target = unembed_target(frozen, loaded.tokenizer.encode("1", add_special_tokens=False)[0], None, last)
    z = float(frozen.layers[1].z[last, feature])
    slope = float(transcoders[1].W_dec[feature] @ target.vector)
    assert change == pytest.approx((float(means[feature]) - z) * slope, rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------- other spaces, Gemma-2 and Qwen3


SPACE_CASES = [
    ("gpt2", "mlp_input", "mlp_output"),
    ("neox", "resid_mid", "mlp_output"),
    ("llama", "mlp_input", "mlp_output"),
    ("gemma2", "resid_mid", "mlp_out"),
    ("gemma2", "mlp_input", "mlp_output"),
    ("qwen3", "normalized", "mlp_out"),
]


@pytest.mark.parametrize("arch, input_space, output_space", SPACE_CASES)
def test_skip_transcoders_in_other_spaces(all_model_dirs, arch, input_space, output_space, tmp_path, one_torch_thread):
    """Skip transcoders read and write their own spaces (Gemma-2: head terms before the post-attention norm,
    an mlp_output before the post-MLP norm): no intervention reproduces the model in every mode, and in direct
    mode ablating a node changes the target by exactly its edge into it."""
    kinds = dict(skip=True, activation="jumprelu", input_space=input_space, output_space=output_space)
    loaded, transcoders = setup(all_model_dirs[arch], "float32", **kinds)
    tokens = torch.tensor([PROMPT_IDS])
    logits = loaded.bridge.run_with_hooks(tokens, return_type="logits").detach()
    model = ReplacementModel(loaded, transcoders, tokens)
    for mode in MODES:
        assert torch.equal(model.run([RowSpec(0)], mode).logits, logits), mode
    loaded, transcoders = setup(all_model_dirs[arch], "float64", **kinds)
    frozen = freeze_prompt(loaded, transcoders, torch.tensor(PROMPT_IDS))
    model = ReplacementModel(loaded, transcoders, torch.tensor([PROMPT_IDS]))
    spec = TargetSpec(kind="logit", position=8, token=17)
    clean = float(spec.values(model, model.run([RowSpec(0)], "direct"))[0])
    target = unembed_target(frozen, 17, None, 8)
    assert clean == pytest.approx(target.value, rel=1e-6)
    direct = attribution.direct_contributions(frozen, target.vector, 8, target.read_point)
    layer = frozen.n_layers - 1
    for feature in direct.features[layer].abs().topk(3).indices.tolist():
        out = model.run([RowSpec(0, ablate(NodeRef("feature", layer, feature, 8)))], "direct")
        change = float(spec.values(model, out)[0]) - clean
        weight = float(direct.features[layer][feature])
        assert abs(change + weight) <= 1e-5 * abs(weight) + 1e-9, (feature, change, weight)
    edges = direct.heads[layer]
    for flat in edges.abs().reshape(-1).topk(3).indices.tolist():
        head, source = divmod(flat, edges.shape[1])
        out = model.run([RowSpec(0, ablate(NodeRef("head", layer, head, source)))], "direct")
        change = float(spec.values(model, out)[0]) - clean
        assert abs(change + float(edges[head, source])) <= 1e-5 * abs(float(edges[head, source])) + 1e-9
    # a feature target in the transcoder's own input space
    feature_spec = TargetSpec(
        kind="feature", position=8, layer=layer, feature=int(frozen.layers[layer].pre[8].argmax())
    )
    out = model.run([RowSpec(0)], "free", capture=feature_spec.capture_names(model))
    assert float(feature_spec.values(model, out)[0]) == pytest.approx(
        float(frozen.layers[layer].pre[8, feature_spec.feature]), rel=1e-6
    )
