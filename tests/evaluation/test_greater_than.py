"""The greater-than prompt set and probability-difference metric (pure parts, exact)."""

import json

import pytest
import torch

from tccli.errors import TcError
from tccli.evaluation import greater_than as gt


def test_prompt_years_cover_02_to_98_in_100_prompts():
    years = gt.prompt_years()
    assert len(years) == 100
    assert years[0] == 2 and years[-1] == 98
    assert sorted(set(years)) == list(range(2, 99))
    assert years == sorted(years)


def test_prompts_text():
    assert gt.prompts([35]) == ["The war lasted from the year 1735 to the year 17"]
    assert gt.prompts([5], noun="siege") == ["The siege lasted from the year 1705 to the year 17"]


def test_probability_difference_analytic():
    probs = torch.zeros(3, 100, dtype=torch.float64)
    probs[0, 40] = 1.0  # all mass above YY=35
    probs[1, 35] = 1.0  # YY itself counts as "not greater"
    probs[2, 10] = 0.25  # 0.5 above, 0.25 below, 0.25 elsewhere (e.g. non-year tokens)
    probs[2, 60] = 0.5
    diff = gt.probability_difference(probs, [35, 35, 35])
    assert diff.tolist() == [1.0, -1.0, 0.25]


def test_probability_difference_uniform_matches_closed_form():
    years = [2, 50, 98]
    probs = torch.full((3, 100), 0.01, dtype=torch.float64)
    diff = gt.probability_difference(probs, years)
    expected = torch.tensor([(99 - y) * 0.01 - (y + 1) * 0.01 for y in years], dtype=torch.float64)
    assert torch.allclose(diff, expected, atol=1e-15)


def test_probability_difference_rejects_bad_shape():
    with pytest.raises(TcError):
        gt.probability_difference(torch.zeros(2, 99), [1, 2])


def test_from_logits_uses_softmax_over_whole_vocab():
    vocab = 120
    year_ids = list(range(10, 110))  # token 10 + k is "k"
    logits = torch.full((1, vocab), -1e9)
    logits[0, 10 + 70] = 0.0
    logits[0, 0] = 0.0  # a non-year token takes half the mass
    result = gt.probability_difference_from_logits(logits, year_ids, [35])
    assert result.mean == pytest.approx(0.5, abs=1e-12)
    assert result.year_probs.shape == (1, 100)


def test_command_on_a_model_without_two_digit_tokens(tiny_model_dirs):
    from conftest import run_tc

    # The tiny test tokenizer spells most numbers in pieces: the task is reported as not applicable.
    result = run_tc("greater-than", "--model", str(tiny_model_dirs["gpt2"]), "--device", "cpu", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["clean"] is None and "one token" in out["not_applicable"]


def test_command_rejects_graph_without_transcoders(tiny_model_dirs):
    from conftest import run_tc

    result = run_tc("greater-than", "--model", str(tiny_model_dirs["gpt2"]), "--graph", "g.json")
    assert result.returncode == 2
    assert result.stderr.startswith("tc: error:") and "--transcoders" in result.stderr
