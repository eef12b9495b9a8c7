"""tc score: exact streaming top-k, batch-size independence, sampled bands, input-invariant scores,
a planted feature on a real (tiny) model (the command and its files: test_score.py)."""

import numpy as np
import pytest
import torch

from conftest import TOKENIZER_TEXT
from tccli.features.examples import sort_into_bands
from tccli.features.scoring import (
    EMPTY_KEY,
    ScoreSettings,
    activation_keys,
    best_per_feature,
    decode_activation_keys,
    examples_from_slots,
    feature_major_encoder,
    sample_key_index,
    score_model,
    stream_layers,
    token_priority,
)
from tccli.features.weight_scores import context_free_scores, embedding_for_norm, pullbacks


def synthetic_doc_ids(tokens: torch.Tensor) -> torch.Tensor:
    """A made-up document per token: a new document every 7 tokens, numbered from 1000."""
    return 1000 + torch.arange(tokens.numel()).reshape(tokens.shape) // 7


def synthetic_batches(z_rows: torch.Tensor, tokens: torch.Tensor, batch_rows: int):
    """Batches whose 'mlp_in' is already the activation z (the encoder is the identity)."""
    context = tokens.shape[1]
    doc_ids = synthetic_doc_ids(tokens)
    for start in range(0, tokens.shape[0], batch_rows):
        tok = tokens[start : start + batch_rows]
        z = z_rows[start : start + batch_rows].reshape(-1, z_rows.shape[-1])
        scale = torch.arange(z.shape[0], dtype=torch.float32) + 1.0 + start * context
        yield tok, doc_ids[start : start + batch_rows], {0: (z, scale)}


def tied_activations(rows=12, context=10, m=6, seed=0):
    """Activations with many exact ties and zeros (values on a coarse grid), and token ids."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randint(-3, 5, (rows, context, m), generator=g).clamp(min=0) * 0.5).float()
    tokens = torch.randint(0, 50, (rows, context), generator=g)
    return z, tokens


def run_stream(z, tokens, batch_rows, settings):
    streams, seen = stream_layers(
        {0: lambda x: x.T.contiguous()}, synthetic_batches(z, tokens, batch_rows), {0: z.shape[-1]}, settings
    )
    stream = streams[0]
    stream.top_slots, stream.sample_slots = stream.top_slots.sorted(), stream.sample_slots.sorted()
    return stream, seen


@pytest.fixture(params=["fused", "torch"])
def kernel(request, monkeypatch):
    """Both implementations of the streaming statistics: the CPU's compiled pass and the torch one (GPUs')."""
    import tccli.features.scoring as scoring

    assert scoring.numba_available(), "numba is missing: run make install"
    monkeypatch.setattr(scoring, "FUSED_ON_CPU", request.param == "fused")
    return request.param


def test_activation_keys_round_trip_and_order():
    z = torch.tensor([[0.0, 2.5], [1.0, 2.5], [3.0, -1.0]])
    keys = activation_keys(z, 100 + torch.arange(3)[:, None])
    assert keys[0, 0] == EMPTY_KEY and keys[2, 1] == EMPTY_KEY
    values, index = decode_activation_keys(keys)
    assert torch.equal(values, torch.tensor([[0.0, 2.5], [1.0, 2.5], [3.0, 0.0]]))
    assert torch.equal(index, torch.tensor([[-1, 100], [101, 101], [102, -1]]))
    # equal activations: the earlier token ranks higher
    assert keys[0, 1] > keys[1, 1]
    assert keys[2, 0] > keys[1, 0]


@pytest.mark.parametrize("batch_rows", [1, 5, 12])
def test_streaming_top_k_equals_brute_force_sort(batch_rows, kernel):
    z, tokens = tied_activations()
    k = 7
    stream, seen = run_stream(z, tokens, batch_rows, ScoreSettings(top=k, quantiles=0, half_window=2))
    assert seen == tokens.numel()
    values, index = decode_activation_keys(stream.top_slots.keys)
    flat = z.reshape(-1, z.shape[-1])
    for f in range(flat.shape[1]):
        col = flat[:, f].tolist()
        expected = sorted((i for i in range(len(col)) if col[i] > 0), key=lambda i: (-col[i], i))[:k]
        got = [int(i) for i in index[f] if i >= 0]
        assert got == expected
        assert values[f, : len(expected)].tolist() == [col[i] for i in expected]
    # the statistics are exact
    assert torch.equal(stream.active_count, (flat > 0).sum(0))
    assert torch.equal(stream.activation_max, flat.max(0).values)
    assert torch.allclose(stream.activation_sum, flat.double().sum(0))


def test_streaming_result_independent_of_batch_size_and_tiling(monkeypatch, kernel):
    import tccli.features.scoring as scoring

    z, tokens = tied_activations(seed=3)
    settings = ScoreSettings(top=5, quantiles=3, per_quantile=2, half_window=3, seed=7)
    results = [run_stream(z, tokens, b, settings)[0] for b in (1, 4, 12)]
    # tiles of 2 rows (6 features x 10 tokens x 2) inside batches of 12 rows
    monkeypatch.setattr(scoring, "TILE_VALUES", 120)
    results.append(run_stream(z, tokens, 12, settings)[0])
    first = results[0]
    for other in results[1:]:
        for slots in ("top_slots", "sample_slots"):
            a, b = getattr(first, slots), getattr(other, slots)
            assert torch.equal(a.keys, b.keys)
            assert torch.equal(a.window_tokens, b.window_tokens)
            assert torch.equal(a.window_acts, b.window_acts)
            assert torch.equal(a.scale, b.scale)
            assert torch.equal(a.doc, b.doc)
        assert torch.equal(first.active_count, other.active_count)
        assert torch.equal(first.activation_max, other.activation_max)
        if kernel == "fused":  # its float64 sums run in token order, so they do not depend on the tiling either
            assert torch.equal(first.activation_sum, other.activation_sum)


def test_windows_hold_tokens_and_activations_around_each_example(kernel):
    z, tokens = tied_activations(rows=4, context=8, m=3, seed=5)
    w = 2
    stream, _ = run_stream(z, tokens, 3, ScoreSettings(top=4, quantiles=0, half_window=w))
    _, index = decode_activation_keys(stream.top_slots.keys)
    for f in range(3):
        for slot in range(4):
            i = int(index[f, slot])
            if i < 0:
                continue
            row, pos = divmod(i, 8)
            for j, offset in enumerate(range(-w, w + 1)):
                p = pos + offset
                if 0 <= p < 8:
                    assert stream.top_slots.window_tokens[f, slot, j] == tokens[row, p]
                    assert stream.top_slots.window_acts[f, slot, j] == z[row, p, f]
                else:
                    assert stream.top_slots.window_tokens[f, slot, j] == -1
            assert stream.top_slots.scale[f, slot] == i + 1.0  # synthetic scale = global index + 1
            assert stream.top_slots.doc[f, slot] == synthetic_doc_ids(tokens)[row, pos]


@pytest.mark.parametrize("batch_rows,tile_values", [(1, None), (7, None), (30, None), (30, 3 * 9 * 11)])
def test_fused_pass_equals_the_torch_formulation(monkeypatch, batch_rows, tile_values):
    """Pre-activations (negative values are inactive), ties, features that never fire, slots that stay
    part empty: the CPU's compiled pass and the torch formulation keep the same examples, windows,
    counts and maxima; their sums agree to float64 rounding."""
    import tccli.features.scoring as scoring

    g = torch.Generator().manual_seed(batch_rows)
    rows, context, m = 30, 11, 9
    pre = (torch.randint(-8, 5, (rows, context, m), generator=g) * 0.25).float()
    pre[..., 3] = -1.0  # never fires
    pre[..., 4] = -0.0  # fires on three tokens (two tied), fewer than its slots
    pre[0, 2, 4], pre[5, 0, 4], pre[29, 10, 4] = 1.5, 0.25, 1.5
    tokens = torch.randint(0, 50, (rows, context), generator=g)
    settings = ScoreSettings(top=6, quantiles=4, per_quantile=2, half_window=3, seed=5)
    if tile_values:
        monkeypatch.setattr(scoring, "TILE_VALUES", tile_values)
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(scoring, "FUSED_ON_CPU", fused)
        results[fused] = run_stream(pre, tokens, batch_rows, settings)[0]
    fused, reference = results[True], results[False]
    for slots in ("top_slots", "sample_slots"):
        a, b = getattr(fused, slots), getattr(reference, slots)
        for name in ("keys", "window_tokens", "window_acts", "scale", "doc"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (slots, name)
    assert torch.equal(fused.active_count, reference.active_count)
    assert torch.equal(fused.activation_max, reference.activation_max)
    assert torch.allclose(fused.activation_sum, reference.activation_sum, rtol=1e-12, atol=0)
    assert torch.equal(fused.activation_sum, pre.relu().reshape(-1, m).double().sum(0))  # grid values: exact
    assert fused.active_count[3] == 0 and (fused.top_slots.keys[3] == EMPTY_KEY).all()
    assert (fused.top_slots.keys[4] == EMPTY_KEY).sum() == 3 and fused.active_count[4] == 3
    assert (fused.top_slots.window_acts >= 0).all() and (fused.sample_slots.window_acts >= 0).all()


def test_best_per_feature_orders_by_key_and_ties_go_to_the_earlier_token():
    # feature 0: tokens 10..14 with activations 1, 3, 2, 2, 2 (three tied at 2.0); feature 2: one token
    feature = torch.tensor([0, 0, 0, 0, 0, 2])
    local = torch.tensor([0, 1, 2, 3, 4, 5])
    value = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.5])
    keys = activation_keys(value, 10 + local)
    features, top_keys, top_local = best_per_feature(feature, keys, local, 3)
    assert features.tolist() == [0, 2]
    assert top_local[0].tolist() == [1, 2, 3]  # 3.0, then the earliest two of the tied 2.0s
    values, index = decode_activation_keys(top_keys)
    assert values.tolist() == [[3.0, 2.0, 2.0], [0.5, 0.0, 0.0]]
    assert index.tolist() == [[11, 12, 13], [15, -1, -1]]


def test_feature_major_encoder_matches_the_transcoder():
    from tccli.config.transcoders import TranscoderConfig
    from tccli.transcoders.transcoder import Transcoder

    for activation, k in (("relu", None), ("topk", 2)):
        torch.manual_seed(0)
        tc = Transcoder(TranscoderConfig(d_in=4, d_out=4, n_features=6, activation=activation, k=k))
        with torch.no_grad():
            for p in tc.parameters():
                p.normal_()
        x = torch.randn(9, 4)
        # its positive part is the activation (a ReLU transcoder's encoder leaves the ReLU to the statistics)
        assert torch.allclose(feature_major_encoder(tc)(x).relu(), tc.encode(x).T, atol=1e-6)


def test_sample_is_the_active_tokens_of_highest_priority(kernel):
    z, tokens = tied_activations(seed=11)
    size = 6
    stream, _ = run_stream(z, tokens, 5, ScoreSettings(top=1, quantiles=3, per_quantile=2, seed=2))
    index = sample_key_index(stream.sample_slots.keys)
    flat = z.reshape(-1, z.shape[-1])
    priority = token_priority(torch.arange(flat.shape[0]), seed=2)
    for f in range(flat.shape[1]):
        active = [i for i in range(flat.shape[0]) if flat[i, f] > 0]
        expected = sorted(active, key=lambda i: (-int(priority[i]), -i))[:size]
        assert [int(i) for i in index[f] if i >= 0] == expected


def test_token_priority_is_a_spread_of_distinct_values():
    p = token_priority(torch.arange(100_000))
    assert len(torch.unique(p)) > 99_990  # 31 of 32 hash bits kept: almost no collisions
    assert p.min() >= 0 and p.max() < 2**31
    # roughly uniform: each eighth of the range holds about an eighth
    counts = torch.bincount(p // 2**28, minlength=8)
    assert counts.min() > 11_000 and counts.max() < 14_000


def test_bands_are_equal_count_slices_of_the_sorted_sample():
    z, tokens = tied_activations(rows=20, seed=4)
    stream, _ = run_stream(z, tokens, 7, ScoreSettings(top=1, quantiles=3, per_quantile=2, half_window=1))
    examples = examples_from_slots(stream.sample_slots, lambda k: (None, sample_key_index(k)), tokens.shape[1], 1)
    banded = sort_into_bands(examples, 3)
    for f in range(z.shape[-1]):
        valid = banded.token_index[f] >= 0
        acts = banded.activation[f][valid]
        assert list(acts) == sorted(acts, reverse=True)
        if valid.sum() == 6:
            assert banded.band[f][valid].tolist() == [3, 3, 2, 2, 1, 1]


def test_context_free_score_is_the_capped_explained_share():
    direct = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    acts = torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0]])
    scores = context_free_scores(direct, acts)
    assert scores[0].item() == pytest.approx((1.0 + 0.0 + 0.5) / 4.0)
    assert torch.isnan(scores[1])


def test_pullbacks_pick_the_largest_decoder_encoder_products():
    enc = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # two features of the later layer
    decoders = {0: torch.tensor([[3.0, 0.0], [0.0, 1.0]]), 2: torch.tensor([[2.0, 5.0]])}
    layer, feature, value = pullbacks(decoders, enc, 2)
    assert layer.tolist() == [[0, 2], [2, 0]]
    assert feature.tolist() == [[0, 0], [0, 1]]
    assert value.tolist() == [[3.0, 2.0], [5.0, 1.0]]


def test_layernorm_embedding_is_centred():
    W_E = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    assert torch.equal(embedding_for_norm(W_E, "layernorm"), torch.tensor([[-1.0, 1.0], [0.0, 0.0]]))
    assert torch.equal(embedding_for_norm(W_E, "rmsnorm"), W_E)


# ---------------------------------------------------------------------------- a planted feature


def planted_setup(model_dir):
    """A tiny Llama, rows of text, and a transcoder whose feature 1 fires exactly on one token id."""
    from tccli.config.transcoders import TranscoderConfig
    from tccli.data.text import pack_rows
    from tccli.model.loading import load_model, run_capture
    from tccli.transcoders.transcoder import Transcoder

    loaded = load_model(str(model_dir), "cpu")
    info = loaded.info
    docs = [
        loaded.tokenizer.encode(f"Story {i}. " + TOKENIZER_TEXT[i % 4], add_special_tokens=False) for i in range(40)
    ]
    packed = pack_rows(docs, info.bos_token_id, 32, 10**6)
    tokens = torch.as_tensor(packed.tokens)
    hook = info.layer(0).mlp_in
    x = run_capture(loaded, tokens, [hook])[hook].reshape(-1, info.d_model)
    flat = tokens.reshape(-1)
    ids, counts = torch.unique(flat[flat != info.bos_token_id], return_counts=True)
    target = int(ids[counts.argmax()])
    on = flat == target
    direction = x[on].mean(0) - x[~on].mean(0)
    pre = x @ direction
    assert pre[on].min() > pre[~on].max()  # the construction's premise: the token is linearly separable
    threshold = float((pre[on].min() + pre[~on].max()) / 2)
    torch.manual_seed(0)
    transcoder = Transcoder(TranscoderConfig(d_in=info.d_model, d_out=info.d_model, n_features=3, layer=0))
    with torch.no_grad():
        transcoder.W_enc.normal_()
        transcoder.W_dec.normal_()
        transcoder.W_enc[:, 1] = direction
        transcoder.b_enc[1] = -threshold
        transcoder.b_enc[2] = -1e6  # a dead feature
    return loaded, packed, transcoder, target, int(on.sum())


def test_planted_feature_has_its_token_everywhere(tiny_model_dirs):
    loaded, packed, transcoder, target, n_on = planted_setup(tiny_model_dirs["llama"])
    settings = ScoreSettings(top=8, quantiles=2, per_quantile=3, half_window=2, top_tokens=5, batch_size=4)
    scores = score_model(loaded, {0: transcoder}, packed.tokens, packed.doc_ids, settings)[0]
    assert scores.frequency[1] == n_on / packed.tokens.size
    centre = scores.top.window_tokens[1, :, 2]
    assert (centre == target).all() and (scores.top.activation[1] > 0).all()
    sampled = scores.quantile.window_tokens[1, :, 2]
    assert (sampled == target).all()
    assert scores.deembed_tokens[1, 0] == target
    flat_tokens = packed.tokens.reshape(-1)
    assert (flat_tokens[scores.top.token_index[1]] == target).all()
    assert (scores.top.doc[1] == packed.doc_ids.reshape(-1)[scores.top.token_index[1]]).all()
    # the dead feature has no examples and no context-free score
    assert scores.frequency[2] == 0 and (scores.top.token_index[2] == -1).all() and np.isnan(scores.context_free[2])
    assert 0 <= scores.context_free[1] <= 1
    # same answers whatever the batch size
    again = score_model(
        loaded, {0: transcoder}, packed.tokens, packed.doc_ids, ScoreSettings(**{**settings.__dict__, "batch_size": 3})
    )[0]
    assert np.array_equal(again.top.token_index, scores.top.token_index)
    assert np.array_equal(again.quantile.token_index, scores.quantile.token_index)


def random_layer0_transcoder(info, n_features: int = 8):
    """A random transcoder for layer 0 whose features fire on part of the tokens."""
    from tccli.config.transcoders import TranscoderConfig
    from tccli.transcoders.transcoder import Transcoder

    transcoder = Transcoder(TranscoderConfig(d_in=info.d_model, d_out=info.d_model, n_features=n_features, layer=0))
    with torch.no_grad():
        for p in transcoder.parameters():
            p.normal_()
    return transcoder


def assert_same_scores(a, b):
    """Every example (key, window, document) and every statistic equal, exactly."""
    assert np.array_equal(a.frequency, b.frequency)
    assert np.array_equal(a.mean_activation, b.mean_activation)
    assert np.array_equal(a.max_activation, b.max_activation)
    for which in ("top", "quantile"):
        x, y = getattr(a, which), getattr(b, which)
        for name in ("activation", "token_index", "doc", "window_tokens", "window_acts"):
            assert np.array_equal(getattr(x, name), getattr(y, name)), (which, name)


def test_streamed_rows_score_exactly_as_rows_in_memory(tiny_model_dirs, text_file):
    from tccli.data.text import load_rows, stream_rows
    from tccli.features.scoring import score_rows
    from tccli.model.loading import load_model

    loaded = load_model(str(tiny_model_dirs["llama"]), "cpu")
    info = loaded.info
    torch.manual_seed(1)
    transcoder = random_layer0_transcoder(info)
    settings = ScoreSettings(top=5, quantiles=2, per_quantile=2, half_window=2, top_tokens=3, batch_size=3, seed=4)
    data = dict(
        paths=[str(text_file)],
        tokenizer=loaded.tokenizer,
        bos_token_id=info.bos_token_id,
        context=16,
        max_tokens=16 * 20,
        seed=5,
    )
    packed = load_rows(**data)
    in_memory = score_model(loaded, {0: transcoder}, packed.tokens, packed.doc_ids, settings)[0]
    streamed = score_rows(loaded, {0: transcoder}, stream_rows(batch_rows=settings.batch_size, **data), 16, settings)[0]
    assert_same_scores(streamed, in_memory)
    assert (in_memory.top.token_index[:, 0] >= 0).any()  # the comparison is about real examples
    # the document kept with each example is the one the token belongs to
    valid = in_memory.top.token_index >= 0
    assert np.array_equal(in_memory.top.doc[valid], packed.doc_ids.reshape(-1)[in_memory.top.token_index[valid]])
    assert (in_memory.top.doc[~valid] == -1).all()


def test_scoring_imports_no_file_io():
    """Imports flow math <- I/O <- CLI: the scoring math never imports (even lazily) the features file
    module, the command or h5py; tccli.features.files imports scoring's result classes, never the reverse."""
    import ast
    from pathlib import Path

    import tccli.features.scoring

    tree = ast.parse(Path(tccli.features.scoring.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not imported & {"tccli.features.files", "tccli.features.score", "tccli.cli.app", "h5py"}, imported


def test_progress_ends_at_its_total_when_the_data_runs_out():
    """Fewer rows than asked for: the last report's total is the rows actually scored (a full bar)."""
    from types import SimpleNamespace

    from tccli.features.scoring import array_row_batches, model_batches

    class FakeCapture:
        info = SimpleNamespace(d_model=2)
        loaded = SimpleNamespace(device=torch.device("cpu"))

        def capture(self, tokens):
            return {0: {"mlp_in": torch.zeros(*tokens.shape, 2), "mlp_scale": torch.ones(tokens.shape)}}

    reports = []
    rows = np.zeros((7, 4), dtype=np.int64)
    batches = model_batches(
        FakeCapture(), array_row_batches(rows, rows, 3), lambda *r: reports.append(r), total_rows=100
    )
    assert sum(len(tokens) for tokens, _, _ in batches) == 7
    assert reports[0] == ("scoring", 3, 100)
    assert reports[-1] == ("scoring", 7, 7)


def test_without_numba_the_cpu_runs_the_torch_formulation(monkeypatch):
    import tccli.features.scoring as scoring

    z, tokens = tied_activations(seed=2)
    settings = ScoreSettings(top=3, quantiles=2, per_quantile=1, half_window=1)
    expected = run_stream(z, tokens, 4, settings)[0]

    def not_compiled(*args, **kwargs):
        raise AssertionError("the compiled pass ran without numba")

    monkeypatch.setattr(scoring, "numba_available", lambda: False)
    monkeypatch.setattr(scoring.LayerStream, "update_fused", not_compiled)
    fallback = run_stream(z, tokens, 4, settings)[0]
    assert torch.equal(fallback.top_slots.keys, expected.top_slots.keys)
    assert torch.equal(fallback.sample_slots.keys, expected.sample_slots.keys)
    assert torch.equal(fallback.active_count, expected.active_count)


@pytest.mark.parametrize("numba_is", ["missing", "broken"])
def test_without_the_numba_package_the_cpu_runs_the_torch_formulation(numba_is, tmp_path, monkeypatch):
    """numba is the optional extra fast-score: when `import numba` fails (not installed, or installed but
    unable to load, e.g. built for another numpy) numba_available says no and scoring gives the compiled
    pass's results through torch."""
    import sys

    import tccli.features.scoring as scoring

    z, tokens = tied_activations(seed=3)
    settings = ScoreSettings(top=3, quantiles=2, per_quantile=1, half_window=1)
    expected = run_stream(z, tokens, 4, settings)[0]
    for name in [m for m in sys.modules if m == "numba" or m.startswith("numba.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tccli.features.scoring_kernel", None)
    if numba_is == "missing":
        monkeypatch.setitem(sys.modules, "numba", None)  # None in sys.modules: import raises ImportError
    else:  # a numba that is found but fails to import
        (tmp_path / "numba").mkdir()
        (tmp_path / "numba" / "__init__.py").write_text('raise ImportError("Numba needs NumPy 1.0 or less")\n')
        monkeypatch.syspath_prepend(str(tmp_path))
    scoring.numba_available.cache_clear()
    try:
        assert not scoring.numba_available()
        fallback = run_stream(z, tokens, 4, settings)[0]
    finally:
        scoring.numba_available.cache_clear()  # numba is back once monkeypatch undoes the above
    assert torch.equal(fallback.top_slots.keys, expected.top_slots.keys)
    assert torch.equal(fallback.sample_slots.keys, expected.sample_slots.keys)
    assert torch.equal(fallback.active_count, expected.active_count)
    assert torch.equal(fallback.activation_sum, expected.activation_sum)


@pytest.mark.parametrize("space", ["mlp_input", "resid_mid"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_score_reads_each_input_space(tiny_model_dirs, arch, space):
    """A transcoder reading another input space is scored on that space's activations (both engines)."""
    from tccli.config.transcoders import TranscoderConfig
    from tccli.model.loading import load_model, run_capture, space_activation
    from tccli.transcoders.transcoder import Transcoder

    loaded = load_model(str(tiny_model_dirs[arch]), "cpu")
    info = loaded.info
    generator = torch.Generator().manual_seed(5)
    rows = torch.randint(0, info.d_vocab, (6, 12), generator=generator)
    rows[:, 0] = info.bos_token_id
    doc_ids = np.zeros(rows.shape, dtype=np.int64)
    transcoder = Transcoder(
        TranscoderConfig(
            d_in=info.d_model, d_out=info.d_model, n_features=6, layer=1, input_space=space, output_space="mlp_output"
        )
    )
    with torch.no_grad():
        transcoder.W_enc.copy_(torch.randn(info.d_model, 6, generator=generator))
        transcoder.b_enc.fill_(-0.5)
    hooks = info.input_hooks(1, space)
    x = space_activation(loaded, 1, space, run_capture(loaded, rows, hooks)).reshape(-1, info.d_model)
    expected = transcoder.encode(x).detach()
    settings = ScoreSettings(top=4, quantiles=0, per_quantile=0, half_window=1, top_tokens=3, batch_size=3)
    for engine in ("bridge", "native"):
        scores = score_model(loaded, {1: transcoder}, rows.numpy(), doc_ids, settings, engine=engine)[1]
        assert np.allclose(scores.max_activation, expected.max(0).values.numpy(), atol=1e-5), engine
        assert np.array_equal(scores.frequency, (expected > 0).double().mean(0).numpy()), engine


def test_layer_reads_by_hand():
    """Encoder vectors read from the residual and decoder vectors written to it, per space (scales left out)."""
    from tccli.config.transcoders import TranscoderConfig
    from tccli.features.weight_scores import LayerReads
    from tccli.model.spaces import LayerSpaces
    from tccli.transcoders.transcoder import Transcoder

    spaces = LayerSpaces(layernorm=True, norm_weight=torch.tensor([2.0, 1.0]), norm_bias=torch.tensor([1.0, 0.0]))
    transcoder = Transcoder(
        TranscoderConfig(d_in=2, d_out=2, n_features=1, input_space="mlp_input", output_space="mlp_output")
    )
    with torch.no_grad():
        transcoder.W_enc.copy_(torch.tensor([[1.0], [3.0]]))
        transcoder.W_dec.copy_(torch.tensor([[4.0, 0.0]]))
        transcoder.b_enc.fill_(0.5)
    reads = LayerReads.of(transcoder, spaces)
    assert reads.encoders.tolist() == [[-0.5, 0.5]]  # g * f = [2, 3], centred
    assert reads.decoders.tolist() == [[2.0, -2.0]]  # the raw output is centred on its way in
    assert reads.constant.tolist() == [1.5] and reads.scaled  # b_enc + beta . f = .5 + 1
    transcoder.config.input_space = "resid_mid"
    assert not LayerReads.of(transcoder, spaces).scaled
