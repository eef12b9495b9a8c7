"""The built-in model shipped in tccli/builtin/model: loads offline, GPT-2 architecture, passes the greater-than bar."""

import os

import pytest
import torch

from tccli.evaluation import greater_than as gt
from tccli.model.loading import BUILTIN_MODEL_DIR, resolve_model_name, run_logits

BAR = 0.6  # the bar for the greater-than probability difference


def test_shipped_files_and_size():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (BUILTIN_MODEL_DIR / name).is_file(), name
    assert os.path.getsize(BUILTIN_MODEL_DIR / "model.safetensors") <= 10_000_000
    assert resolve_model_name(None) == str(BUILTIN_MODEL_DIR)


def test_loads_with_gpt2_architecture(builtin_model):
    info = builtin_model.info
    assert info.architecture == "GPT2LMHeadModel"
    assert info.normalization == "layernorm"
    assert info.positional == "learned" and info.pos_embed_hook is not None
    assert not info.parallel_attn_mlp and not info.gated_mlp
    assert info.n_kv_heads == info.n_heads


def test_finite_logits(builtin_model):
    text = "In the beginning God created the heaven and the earth."
    ids = [builtin_model.info.bos_token_id] + builtin_model.tokenizer.encode(text, add_special_tokens=False)
    logits, _ = run_logits(builtin_model, torch.tensor([ids]))
    assert logits.shape == (1, len(ids), builtin_model.info.d_vocab)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "text",
    [
        "The war lasted from the year 1735 to the year 1789.",
        "And God said, Let there be light: and there was light.",
        "Unicode survives too: café, naïve, 東京, emoji 🙂, tabs\tand\nnewlines.",
    ],
)
def test_tokenizer_round_trips(builtin_model, text):
    tok = builtin_model.tokenizer
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_years_tokenise_like_gpt2(builtin_model):
    tok = builtin_model.tokenizer
    pieces = tok.convert_ids_to_tokens(tok.encode(" 1735 to the year 17", add_special_tokens=False))
    assert pieces[:2] == ["Ġ17", "35"] and pieces[-1] == "Ġ17"
    ids = gt.two_digit_token_ids(tok)  # raises if any "00".."99" is not one token
    assert len(set(ids)) == 100


def test_greater_than_probability_difference_passes_bar(builtin_model):
    result = gt.probability_difference_of_model(builtin_model)
    assert len(result.per_prompt) == 100
    assert torch.isfinite(result.per_prompt).all()
    # Probabilities of the 100 year tokens are a sub-distribution.
    assert float(result.year_probs.sum(dim=1).max()) <= 1.0 + 1e-9
    assert result.mean >= BAR, f"greater-than probability difference {result.mean:.3f} < {BAR}"


def _transcoder_with_feature_on(builtin_model, layer: int, token_id: int):
    """A transcoder whose feature 0's encoder vector is the (centred) embedding of one token."""
    from tccli.config.transcoders import TranscoderConfig
    from tccli.transcoders.transcoder import Transcoder

    d = builtin_model.info.d_model
    transcoder = Transcoder(TranscoderConfig(d_in=d, d_out=d, n_features=3, layer=layer))
    with torch.no_grad():
        embedding = builtin_model.bridge.W_E[token_id].detach()
        transcoder.W_enc[:, 0] = embedding - embedding.mean()
    return transcoder


def test_top_nodes_orders_by_contribution_and_deembeds(builtin_model):
    token_id = builtin_model.tokenizer.encode("35", add_special_tokens=False)[0]
    transcoders = {0: _transcoder_with_feature_on(builtin_model, 0, token_id)}
    nodes = [
        {"id": "target", "kind": "target", "path_contribution": 9.0},
        {
            "id": "attn1.h2@8",
            "kind": "head",
            "layer": 1,
            "head": 2,
            "position": 8,
            "token": "35",
            "path_contribution": 0.5,
        },
        {
            "id": "mlp0.f0@8",
            "kind": "feature",
            "layer": 0,
            "feature": 0,
            "position": 8,
            "token": "35",
            "activation": 2.0,
            "path_contribution": 0.7,
        },
        {"id": "embed@8", "kind": "embed", "position": 8, "path_contribution": 3.0},
    ]
    rows = gt.top_nodes(nodes, builtin_model, transcoders, top=5)
    assert [r["id"] for r in rows] == ["mlp0.f0@8", "attn1.h2@8"]  # only features and heads, best first
    # The listed tokens are the best-scoring W_E f_enc entries in order, minus undecodable byte pieces.
    from tccli.features.deembed import deembedding

    scores = deembedding(builtin_model.bridge.W_E.detach(), transcoders[0].W_enc[:, 0].detach(), True)
    ranked = [builtin_model.tokenizer.decode([i]) for i in scores.argsort(descending=True).tolist()]
    expected = [t for t in ranked if t.isprintable() and "\ufffd" not in t][:5]  # no lone bytes here
    assert rows[0]["deembedding"] == expected and len(expected) == 5
    assert "deembedding" not in rows[1]
    lines = gt.result_lines(
        {
            "model": "m",
            "prompts": 100,
            "clean": 0.5,
            "replaced": {0: 0.25},
            "all_replaced": None,
            "not_applicable": None,
            "top_nodes": rows,
        }
    )
    assert lines[1] == "  clean model              0.500" and lines[2] == "  MLP 0 -> transcoder      0.250"
    assert any(line.strip().startswith("L0.F0") for line in lines)
    assert any(line.strip().startswith("L1.H2") for line in lines)
