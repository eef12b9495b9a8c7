"""The replacement model and `tc intervene` with a cross-layer transcoder (docs/method.md sections 10 and 11):
exact when nothing changes, a set feature's writes to every later layer worked out from the decoders, free
mode recomputing later features, and a CLT whose decoders to later layers are zero giving its per-layer set's
runs, gradients and command output bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from circuit_helpers import loaded_model, random_clt, random_transcoders, save_transcoders
from conftest import build_tiny_model, run_tc
from tccli.config.replacement import MODES
from tccli.nodes import Intervention, NodeRef
from tccli.replacement.model import ReplacementModel, RowSpec
from tccli.replacement.sites import input_in_space
from tccli.replacement.targets import TargetSpec
from tccli.transcoders.files import save_cross_layer

PROMPT_IDS = [0, 37, 90, 151, 12, 200, 64, 7, 99]
PROMPT = "The war lasted from 1735 to 17"


@pytest.fixture(scope="module")
def three_layer_llama(tmp_path_factory):
    """A tiny Llama of three layers, so a feature of layer 0 writes to two later layers."""
    return loaded_model(build_tiny_model("llama", tmp_path_factory.mktemp("llama3") / "llama", n_layers=3))


def set_and_clt(info, off_diagonal: float, **kwargs):
    """The sparse random per-layer set and the CLT made from it (its decoders to later layers scaled by
    ``off_diagonal``; 0: the set exactly)."""
    transcoders = random_transcoders(info, 48, 0, bias_shift=-0.3, **kwargs)
    return transcoders, random_clt(info, 48, 0, off_diagonal, bias_shift=-0.3, **kwargs)


def active_feature(model: ReplacementModel, layer: int, position: int) -> tuple[int, float]:
    """The most active feature of ``layer`` at ``position`` on prompt 0, and its activation."""
    z = model.clean_activations(layer)[0, position]
    feature = int(z.argmax())
    return feature, float(z[feature])


# ---------------------------------------------------------------------------- no intervention: the model itself


@pytest.mark.parametrize(
    "arch, activation, skip",
    [
        ("gpt2", "relu", False),
        ("gpt2", "jumprelu", True),
        ("neox", "relu", False),
        ("llama", "topk", True),
        ("gemma2", "relu", True),
        ("qwen3", "jumprelu", False),
    ],
)
def test_unintervened_clt_replacement_model_reproduces_the_logits_exactly(
    all_model_dirs, arch, activation, skip, one_torch_thread
):
    loaded = loaded_model(all_model_dirs[arch])
    clt = random_clt(loaded.info, 48, 0, 1.0, bias_shift=-0.3, activation=activation, skip=skip)
    tokens = torch.tensor([PROMPT_IDS, PROMPT_IDS[::-1]])
    logits = loaded.bridge.run_with_hooks(tokens, return_type="logits").detach()  # the plain model
    model = ReplacementModel(loaded, clt, tokens)
    assert torch.equal(model.clean_logits, logits)
    for mode in MODES:
        assert torch.equal(model.run([RowSpec(0), RowSpec(1)], mode).logits, logits), mode
    # the errors are real: ablating every one of them changes the logits
    errors = tuple(Intervention(NodeRef("error", layer, -1, None), "ablate") for layer in clt.layers)
    assert not torch.equal(model.run([RowSpec(0, errors)], "free").logits[0], logits[0])


# ---------------------------------------------------------------------------- a set feature writes to every later layer


def test_setting_a_clt_feature_moves_every_later_mlp_output_by_its_decoders(three_layer_llama, one_torch_thread):
    """Direct mode holds every other node: setting feature (l, i) at position p to v changes the MLP output of
    each layer l' >= l at p by exactly (v - a) W_dec^(l -> l')_i, and nothing else anywhere."""
    loaded = three_layer_llama
    clt = random_clt(loaded.info, 48, 0, 1.0, bias_shift=-0.3)
    model = ReplacementModel(loaded, clt, torch.tensor([PROMPT_IDS]))
    outputs = [model.output_site[layer] for layer in clt.layers]
    clean = model.run([RowSpec(0)], "direct", capture=outputs).captured
    position, value = 5, 2.5
    for layer in (0, 1):
        feature, a = active_feature(model, layer, position)
        node = NodeRef("feature", layer, feature, position)
        run = model.run([RowSpec(0, (Intervention(node, "set", value),))], "direct", capture=outputs)
        change = torch.tensor(value, dtype=torch.float32) - torch.tensor(a, dtype=torch.float32)
        for target, name in zip(clt.layers, outputs):
            expected = clean[name].clone()
            if target >= layer:
                write = change * clt.W_dec[str(layer)][feature, target - layer]
                expected[0, position] = expected[0, position] + write
                assert write.abs().max() > 0
            assert torch.equal(run.captured[name], expected), (layer, target)


def test_free_mode_recomputes_later_features_from_the_changed_inputs(three_layer_llama, one_torch_thread):
    """Free mode: after feature (0, i) is set, layer 1's output is its clean output plus layer 0's changed
    write through W_dec^(0 -> 1) plus the change of layer 1's own features, recomputed from its new input."""
    loaded = three_layer_llama
    clt = random_clt(loaded.info, 48, 0, 1.0, bias_shift=-0.3)
    model = ReplacementModel(loaded, clt, torch.tensor([PROMPT_IDS]))
    position, value = 4, 3.0
    feature, a = active_feature(model, 0, position)
    names = [model.input_site[1], model.output_site[1]]
    run = model.run(
        [RowSpec(0, (Intervention(NodeRef("feature", 0, feature, position), "set", value),))], "free", capture=names
    )
    view = model.transcoders[1]
    x_clean = input_in_space(loaded, 1, view, model.clean[model.input_site[1]])[0]
    x = input_in_space(loaded, 1, view, run.captured[model.input_site[1]])[0]
    assert not torch.equal(x[position:], x_clean[position:])  # layer 1's input moved
    z0_change = torch.zeros(len(PROMPT_IDS), 48)
    z0_change[position, feature] = torch.tensor(value) - torch.tensor(a)
    z1_change = clt.encode(1, x) - clt.encode(1, x_clean)
    expected = model.clean[model.output_site[1]][0] + z0_change @ clt.decoder(0, 1) + z1_change @ clt.decoder(1, 1)
    got = run.captured[model.output_site[1]][0]
    assert torch.allclose(got, expected, rtol=0, atol=1e-6), float((got - expected).abs().max())
    assert float((z1_change @ clt.decoder(1, 1)).abs().max()) > 1e-3  # the recomputation mattered


# ---------------------------------------------------------------------------- zero decoders to later layers: the set


@pytest.mark.parametrize("arch, activation, skip", [("gpt2", "relu", False), ("llama", "jumprelu", True)])
def test_a_clt_with_zero_later_decoders_intervenes_as_its_set_bit_for_bit(
    tiny_model_dirs, arch, activation, skip, one_torch_thread
):
    loaded = loaded_model(tiny_model_dirs[arch])
    transcoders, clt = set_and_clt(loaded.info, 0.0, activation=activation, skip=skip)
    tokens = torch.tensor([PROMPT_IDS, PROMPT_IDS[::-1]])
    means = {layer: torch.full((48,), 0.25) for layer in transcoders}
    by_set = ReplacementModel(loaded, transcoders, tokens, means)
    by_clt = ReplacementModel(loaded, clt, tokens, means)
    f0, _ = active_feature(by_set, 0, 3)
    f1, _ = active_feature(by_set, 1, 6)
    rows = [
        RowSpec(0),
        RowSpec(0, (Intervention(NodeRef("feature", 0, f0, 3), "ablate"),)),
        RowSpec(1, (Intervention(NodeRef("feature", 0, f0, 3), "set", 2.5),)),
        RowSpec(0, (Intervention(NodeRef("feature", 1, f1, None), "scale", 0.5),)),
        RowSpec(
            1, (Intervention(NodeRef("error", 0, -1, -1), "ablate"), Intervention(NodeRef("head", 1, 1, 2), "ablate"))
        ),
        RowSpec(0, keep_only=frozenset({(0, f0, 3), (1, f1, 6)})),
    ]
    capture = [by_set.output_site[layer] for layer in transcoders] + [by_set.input_site[1]]
    for mode in MODES:
        for ablation in ("zero", "mean"):
            a = by_set.run(rows, mode, ablation, capture)
            b = by_clt.run(rows, mode, ablation, capture)
            assert torch.equal(a.logits, b.logits), (mode, ablation)
            for name in capture:
                assert torch.equal(a.captured[name], b.captured[name]), (mode, ablation, name)
    spec = TargetSpec("logit_diff", -1, token=1, token_b=0)
    g_set, g_clt = by_set.node_gradients(spec), by_clt.node_gradients(spec)
    assert torch.equal(g_set.values, g_clt.values)
    for kind in ("feature", "head", "error"):
        for layer, grad in getattr(g_set, kind).items():
            assert torch.equal(grad, getattr(g_clt, kind)[layer]), (kind, layer)
    # and a CLT that does write to later layers does not
    _, writing = set_and_clt(loaded.info, 1.0, activation=activation, skip=skip)
    other = ReplacementModel(loaded, writing, tokens, means).run(rows[1:2], "frozen")
    assert not torch.equal(other.logits, by_set.run(rows[1:2], "frozen").logits)


# ---------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def saved(tiny_model_dirs, tiny_models, tmp_path_factory):
    """The tiny GPT-2's sparse random set, the CLT equal to it (zero decoders to later layers) and the CLT that
    writes to later layers, saved."""
    root = tmp_path_factory.mktemp("clt_intervene")
    info = tiny_models["gpt2"].info
    transcoders, equal = set_and_clt(info, 0.0)
    _, writing = set_and_clt(info, 1.0)
    return dict(
        model=str(tiny_model_dirs["gpt2"]),
        set=str(save_transcoders(transcoders, root / "set")),
        equal=str(save_cross_layer(equal, root / "clt0")),
        clt=str(save_cross_layer(writing, root / "clt1")),
    )


def intervene(saved, which, *args):
    return run_tc("intervene", "--model", saved["model"], "--transcoders", saved[which], "--prompt", PROMPT, *args)


INTERVENTIONS = [
    "--ablate",
    "mlp0.f3@-1",
    "attn1.h2@3",
    "--scale",
    "err0@*=0.5",
    "--set",
    "mlp0.f7@4=2",
    "mlp0.f9@-1=3",
]


@pytest.mark.parametrize("mode", MODES)
def test_intervene_command_on_a_clt_with_zero_later_decoders_prints_the_sets_output(saved, mode):
    for target in (["--logit-diff", "1", "0"], ["--feature", "L1.F5"]):
        args = [*target, *INTERVENTIONS, "--mode", mode, "--json"]
        by_set, by_clt = intervene(saved, "set", *args), intervene(saved, "equal", *args)
        assert by_set.returncode == 0 and by_clt.returncode == 0, by_set.stderr + by_clt.stderr
        assert by_clt.stdout == by_set.stdout
        text = [intervene(saved, which, *args[:-1]).stdout for which in ("set", "equal")]
        assert text[0] == text[1] and "KL" in text[0]
    # a CLT that writes to later layers moves the logits otherwise (a feature target of layer 1 reads only
    # layer 0's output, which no decoder to a later layer reaches; the last layer's MLP output at a position
    # reaches only that position's logits, hence a feature set at the last position)
    args = ["--logit-diff", "1", "0", *INTERVENTIONS, "--mode", mode, "--json"]
    writing, by_set = (json.loads(intervene(saved, which, *args).stdout) for which in ("clt", "set"))
    assert writing["target"]["change"] != by_set["target"]["change"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ablate", "mlp1.f99@2"], "feature 99 is out of range"),
        (["--ablate", "mlp2.f1@2"], "layer 2 is out of range"),
        (["--feature", "L1.F48"], "feature 48 is out of range"),
    ],
)
def test_intervene_on_a_clt_bad_input_is_one_line(saved, args, message):
    result = intervene(saved, "clt", *args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tc: error:") and message in lines[0], result.stderr


# ---------------------------------------------------------------------------- gradients through every decoder block


def test_frozen_gradients_of_clt_features_are_the_steers_slopes(tmp_path_factory, one_torch_thread):
    """node_gradients (tc validate's unpruned prediction) differentiates through every decoder block: each
    feature's derivative equals the slope of frozen-mode runs with the feature set a little above and below
    its activation (float64, central differences), and differs from the slope with the later decoders cut."""
    folder = build_tiny_model("llama", tmp_path_factory.mktemp("llama3_f64") / "llama", n_layers=3)
    loaded = loaded_model(folder, "float64")
    clt = random_clt(loaded.info, 48, 0, 1.0, bias_shift=-0.3, dtype=torch.float64)
    model = ReplacementModel(loaded, clt, torch.tensor([PROMPT_IDS]))
    spec = TargetSpec("logit_diff", -1, token=1, token_b=0)
    gradients = model.node_gradients(spec)
    _, same_encoders = set_and_clt(loaded.info, 0.0, dtype=torch.float64)
    cut = ReplacementModel(loaded, same_encoders, torch.tensor([PROMPT_IDS])).node_gradients(spec)
    step = 1e-5  # small enough that no later feature crosses its ReLU's kink on these weights
    # (layer 1's writes at the last position reach the target through layer 2's MLP: the decoder 1 -> 2)
    for layer, position in ((0, 3), (0, 8), (1, 8)):
        feature, a = active_feature(model, layer, position)
        node = NodeRef("feature", layer, feature, position)
        rows = [RowSpec(0, (Intervention(node, "set", a + sign * step),)) for sign in (1, -1)]
        up, down = spec.values(model, model.run(rows, "frozen")).tolist()
        slope = (up - down) / (2 * step)
        grad = float(gradients.feature[layer][0, position, feature])
        assert grad == pytest.approx(slope, rel=1e-6, abs=1e-9), (layer, position)
        assert abs(grad - float(cut.feature[layer][0, position, feature])) > 1e-4 * abs(grad)


def test_a_clt_made_for_another_model_is_refused_in_one_line(saved, tiny_models, tmp_path):
    other = save_cross_layer(random_clt(tiny_models["neox"].info, 48, 0, 1.0), tmp_path / "neox-clt")
    for command in (
        ("intervene", "--prompt", PROMPT, "--ablate", "mlp0.f1@2"),
        ("eval", "--data", "-", "--tokens", "64", "--context", "16"),
    ):
        result = run_tc(*command, "--model", saved["model"], "--transcoders", str(other), input="some text " * 50)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("tc: error:") and "was trained on" in lines[0], result.stderr
