"""Feature scoring (docs/method.md section 4): what each transcoder feature does.

One streaming pass over the text with memory bounded by (features x examples), whatever the number
of tokens, gives per feature:

- firing frequency (fraction of tokens with z > 0), mean activation where it fires, max activation;
- the ``top`` highest-activating tokens, each with a window of tokens around it and that feature's
  activation on every token of the window;
- examples from ``quantiles`` bands of its activation distribution (see "Quantile bands" below).

Input-invariant scores need no text: the de-embedding (top tokens of ``W_E f_enc``), the logit effect
(top promoted and suppressed next tokens of ``f_dec W_U``) and pullbacks (top earlier-layer features by
``W_dec^(l) f_enc^(l')``). Finally a context-free score (see ``context_free_scores``).

Exact streaming top-k. Every candidate (feature, token) is ranked by one int64 key: for the top
examples ``float32 bits of the activation << 32 | (2**32 - 1 - token index)`` (the bits of a
non-negative float32 order like the float), so a larger activation wins and equal activations are
broken by the earlier token. Keys are unique, so "top k of the running top k merged with the batch"
is exactly the top k of a sort of everything seen, whatever the batch size.

Quantile bands. Each token gets a pseudo-random priority, a fixed bijective hash of its global token
index (and the seed); per feature we keep the ``quantiles * per_quantile`` active tokens of highest
priority, with the same exact key merge (key = ``priority31 << 32 | token index``). That is a uniform
sample without replacement of the tokens where the feature fires (bottom-k / priority sampling), and it
does not depend on the batch size. At the end the sample is sorted by activation and cut into
``quantiles`` bands of equal count: band q holds sampled activations between the (q-1)/Q and q/Q
quantiles of the sample, an unbiased estimate of the feature's activation quantiles. Band Q is the
highest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Optional

import numpy as np
import torch

from tccli.errors import fail
from tccli.features.cross_layer import cross_layer_of, cross_layer_reads, with_decoder_norms
from tccli.features.examples import ExampleArrays, sort_into_bands
from tccli.features.weight_scores import (
    LayerReads,
    context_free_scores,
    deembedding_matrix,
    embedding_for_norm,
    logit_effect,
    pullbacks,
    top_entries,
)

INDEX_MASK = (1 << 32) - 1
EMPTY_KEY = -1
MAX_TOKENS = 1 << 32  # token indices must fit the low 32 bits of a key
# The streaming statistics work on [features, tokens] tiles of at most this many float32 values (16 MiB).
# A whole batch's activations (4,096 features x 4,096 tokens = 64 MiB) is above glibc's largest mmap
# threshold (32 MiB), so each of the several such tensors a batch makes would be a fresh mmap whose pages
# the kernel faults in and zeroes: that, not arithmetic, took half the encoder's time. Tiles stay in the
# heap and are reused. Results do not depend on the tiling (they do not depend on the batch size).
TILE_VALUES = 1 << 22
# On a GPU a tile's cost is mostly fixed, not per value (some hundred kernel launches and a few waits
# for the device): on an H200 a tile of 3-4 M values took about 5 ms whatever its shape, and the scoring
# pass ran at 0.03-0.07 of its floor (README, "On a GPU"). There tiles hold up to 2^26 values (256 MiB).
GPU_TILE_VALUES = 1 << 26


def tile_values(device) -> int:
    """The most float32 values in one [features, tokens] tile of the streaming statistics on ``device``."""
    return TILE_VALUES if torch.device(device).type == "cpu" else GPU_TILE_VALUES


# On the CPU the statistics of a tile are computed by one compiled pass (tccli.features.scoring_kernel); tests set
# this to False to check the torch formulation (what GPUs run) on the CPU against it.
FUSED_ON_CPU = True


@cache
def numba_available() -> bool:
    """Whether the compiled CPU pass can run. numba is optional (``pip install 'tccli[fast-score]'``);
    without it the CPU runs the torch formulation, which gives the same results more slowly. Importing it
    (not just finding it) also sends a numba that cannot load, e.g. one built for another numpy, there."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


# ============================================================================ exact streaming top-k (pure)


def activation_keys(z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Activations (any shape) of tokens ``index`` (same shape, or broadcastable) -> int64 keys.

    EMPTY_KEY where z <= 0.
    """
    z = z.to(torch.float32).contiguous()
    keys = (z.view(torch.int32).to(torch.int64) << 32) | (INDEX_MASK - index)
    return torch.where(z > 0, keys, torch.full_like(keys, EMPTY_KEY))


def decode_activation_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys -> (activation float32, token index int64); empty slots give (0, -1)."""
    empty = keys < 0
    values = (keys >> 32).to(torch.int32).view(torch.float32)
    index = INDEX_MASK - (keys & INDEX_MASK)
    return values.masked_fill(empty, 0.0), index.masked_fill(empty, -1)


def token_priority(index: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A fixed pseudo-random priority in [0, 2**31) per global token index (murmur3's 32-bit finaliser).

    The finaliser is a bijection on 32-bit integers, so distinct indices get well-mixed priorities;
    int64 products wrap, and only their low 32 bits are kept, which is exactly 32-bit arithmetic.
    """
    x = (index.to(torch.int64) + (seed * 0x9E3779B9)) & INDEX_MASK
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & INDEX_MASK
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & INDEX_MASK
    x = x ^ (x >> 16)
    return x >> 1


def sample_token_keys(index: torch.Tensor, seed: int) -> torch.Tensor:
    """The sample key of tokens ``index`` (global indices): priority << 32 | index."""
    return (token_priority(index, seed) << 32) | index


def sample_key_index(keys: torch.Tensor) -> torch.Tensor:
    return torch.where(keys < 0, torch.full_like(keys, -1), keys & INDEX_MASK)


def best_per_feature(
    feature: torch.Tensor, keys: torch.Tensor, local: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each feature's k largest keys among sparse entries (feature, key, local token), keys unique per feature.

    Returns (features [f] that have entries, keys [f, k], local [f, k]) with each row in descending key
    order, padded with EMPTY_KEY (and local 0) where a feature has fewer than k entries.
    """
    order = keys.argsort(descending=True)
    order = order[feature[order].argsort(stable=True)]  # by feature, and by key within a feature
    feature, keys, local = feature[order], keys[order], local[order]
    features, counts = torch.unique_consecutive(feature, return_counts=True)
    row = torch.repeat_interleave(torch.arange(len(features), device=keys.device), counts)
    rank = torch.arange(len(feature), device=keys.device) - (torch.cumsum(counts, 0) - counts)[row]
    keep = rank < k
    out_keys = torch.full((len(features), k), EMPTY_KEY, dtype=torch.int64, device=keys.device)
    out_local = torch.zeros((len(features), k), dtype=torch.int64, device=keys.device)
    out_keys[row[keep], rank[keep]] = keys[keep]
    out_local[row[keep], rank[keep]] = local[keep]
    return features, out_keys, out_local


def merge_top_keys(
    running: torch.Tensor, candidate_keys: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which slots of a running top-k [m, k] (keys in any order) the batch's candidates [m, c] replace.

    Returns (feature, slot, candidate), 1-D: slot ``slot`` of feature ``feature`` now holds candidate
    column ``candidate``. The slots' payloads then change only where an example enters, instead of
    being reordered every batch. Candidates with EMPTY_KEY never enter.
    """
    k = running.shape[1]
    candidate_keys = candidate_keys.masked_fill(candidate_keys < 0, EMPTY_KEY - 1)  # loses to an empty slot
    chosen = torch.cat([running, candidate_keys], dim=1).topk(k, dim=1, sorted=False).indices
    picked = torch.zeros(
        (running.shape[0], k + candidate_keys.shape[1]), dtype=torch.bool, device=running.device
    ).scatter_(1, chosen, True)
    # per feature, as many slots are freed as candidates enter; row-major order pairs them up
    feature, slot = (~picked[:, :k]).nonzero(as_tuple=True)
    _, candidate = picked[:, k:].nonzero(as_tuple=True)
    return feature, slot, candidate


# ============================================================================ per-layer streaming state


@dataclass
class ExampleSlots:
    """Per feature, k slots (in no particular order): a key and the payload captured with the example."""

    keys: torch.Tensor  # [m, k] int64, EMPTY_KEY when unused
    window_tokens: torch.Tensor  # [m, k, W] int64, -1 outside the row
    window_acts: torch.Tensor  # [m, k, W] float32
    scale: torch.Tensor  # [m, k] float32: the MLP input's normalisation scale at the example
    doc: torch.Tensor  # [m, k] int64: the document the example's token belongs to, -1 when unused
    # (kept with the example so that no array of every token's document is needed at the end)

    @classmethod
    def empty(cls, m: int, k: int, width: int, device) -> ExampleSlots:
        return cls(
            keys=torch.full((m, k), EMPTY_KEY, dtype=torch.int64, device=device),
            window_tokens=torch.full((m, k, width), -1, dtype=torch.int64, device=device),
            window_acts=torch.zeros((m, k, width), dtype=torch.float32, device=device),
            scale=torch.zeros((m, k), dtype=torch.float32, device=device),
            doc=torch.full((m, k), -1, dtype=torch.int64, device=device),
        )

    @property
    def size(self) -> int:
        return self.keys.shape[1]

    def update(
        self, features: torch.Tensor, candidate_keys: torch.Tensor, candidate_local: torch.Tensor, batch: BatchView
    ) -> None:
        """Let a batch's candidates (row i of the candidates belongs to feature ``features[i]``) replace
        weaker examples."""
        row, slot, candidate = merge_top_keys(self.keys[features], candidate_keys)
        if len(row):
            feature = features[row]
            self.keys[feature, slot] = candidate_keys[row, candidate]
            tokens, acts, scale, doc = batch.windows(feature, candidate_local[row, candidate])
            self.window_tokens[feature, slot] = tokens
            self.window_acts[feature, slot] = acts
            self.scale[feature, slot] = scale
            self.doc[feature, slot] = doc

    def sorted(self) -> ExampleSlots:
        """The same slots with each feature's keys in descending order."""
        order = self.keys.argsort(dim=1, descending=True)
        width = self.window_tokens.shape[2]
        return ExampleSlots(
            keys=torch.gather(self.keys, 1, order),
            window_tokens=torch.gather(self.window_tokens, 1, order[..., None].expand(-1, -1, width)),
            window_acts=torch.gather(self.window_acts, 1, order[..., None].expand(-1, -1, width)),
            scale=torch.gather(self.scale, 1, order),
            doc=torch.gather(self.doc, 1, order),
        )


@dataclass
class BatchView:
    """One batch of rows as the streaming state sees it."""

    tokens: torch.Tensor  # [rows, context] int64
    doc_ids: torch.Tensor  # [rows, context] int64, the document of each token
    z: torch.Tensor  # [m, rows * context] feature-major, the activations where positive (see update)
    scale: torch.Tensor  # [rows * context]
    half_window: int
    sample_keys: Optional[torch.Tensor] = None  # [rows * context] each token's sample key, when already known

    def windows(self, feature: torch.Tensor, local_token: torch.Tensor):
        """Token ids and ``feature``'s activations around each local token, plus its scale and document."""
        context = self.tokens.shape[1]
        row, pos = local_token // context, local_token % context
        offsets = torch.arange(-self.half_window, self.half_window + 1, device=self.z.device)
        positions = pos[:, None] + offsets[None, :]
        inside = (positions >= 0) & (positions < context)
        positions = positions.clamp(0, context - 1)
        flat = row[:, None] * context + positions
        tokens = torch.where(inside, self.tokens[row[:, None], positions], torch.full_like(flat, -1))
        acts = torch.where(inside, self.z[feature[:, None], flat], torch.zeros((), device=self.z.device))
        return tokens, acts, self.scale[local_token], self.doc_ids[row, pos]


@dataclass
class LayerStream:
    """Running scores of one layer's features."""

    n_features: int
    top_slots: ExampleSlots
    sample_slots: ExampleSlots
    seed: int = 0
    active_count: torch.Tensor = field(default=None)  # type: ignore[assignment]
    activation_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    activation_max: torch.Tensor = field(default=None)  # type: ignore[assignment]
    # the compiled pass's scratch and its record of each feature's weakest slots (see update_fused); a
    # stream is updated by one implementation only, so the record stays that of the slots
    _kernel_state: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default=None, repr=False)

    @classmethod
    def start(cls, m: int, top: int, sample: int, half_window: int, device, seed: int = 0) -> LayerStream:
        width = 2 * half_window + 1
        return cls(
            n_features=m,
            top_slots=ExampleSlots.empty(m, top, width, device),
            sample_slots=ExampleSlots.empty(m, sample, width, device),
            seed=seed,
            active_count=torch.zeros(m, dtype=torch.int64, device=device),
            activation_sum=torch.zeros(m, dtype=torch.float64, device=device),
            activation_max=torch.zeros(m, dtype=torch.float32, device=device),
        )

    def update(self, batch: BatchView, base_index: int) -> None:
        """Add one tile: ``batch.z`` [m, T] holds values whose positive part is the activation, for the
        tokens ``base_index`` .. ``base_index + T - 1``."""
        if batch.z.device.type == "cpu" and FUSED_ON_CPU and numba_available():
            self.update_fused(batch, base_index)
        else:
            self.update_torch(batch, base_index)

    def update_fused(self, batch: BatchView, base_index: int) -> None:
        """``update`` in one read of the tile (``tccli.features.scoring_kernel``), on the CPU."""
        import numba

        from tccli.features.scoring_kernel import scan_tile, weakest_slots

        z = batch.z.contiguous().numpy()
        top, sample = self.top_slots, self.sample_slots
        if self._kernel_state is None:
            threads = numba.config.NUMBA_NUM_THREADS
            self._kernel_state = (
                np.empty((threads, top.size), np.int64),
                np.empty((threads, sample.size), np.int64),
                weakest_slots(top.keys.numpy(), sample.keys.numpy()),
            )
        if not sample.size:
            sample_keys = np.zeros(0, np.int64)
        elif batch.sample_keys is not None:
            sample_keys = batch.sample_keys.contiguous().numpy()
        else:
            sample_keys = sample_token_keys(base_index + torch.arange(z.shape[1]), self.seed).numpy()
        numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        scan_tile(
            z,
            z.view(np.int32),
            base_index,
            batch.tokens.contiguous().numpy(),
            batch.doc_ids.contiguous().numpy(),
            batch.scale.contiguous().numpy(),
            sample_keys,
            batch.half_window,
            self.active_count.numpy(),
            self.activation_sum.numpy(),
            self.activation_max.numpy(),
            top.keys.numpy(),
            top.window_tokens.numpy(),
            top.window_acts.numpy(),
            top.scale.numpy(),
            top.doc.numpy(),
            self._kernel_state[0],
            sample.keys.numpy(),
            sample.window_tokens.numpy(),
            sample.window_acts.numpy(),
            sample.scale.numpy(),
            sample.doc.numpy(),
            *self._kernel_state[1:],
        )

    def update_torch(self, batch: BatchView, base_index: int) -> None:
        """``update`` in torch operations, for any device (the CPU uses ``update_fused``)."""
        z = batch.z.relu()  # [m, T]
        batch = replace(batch, z=z)
        # Features fire on a few percent of tokens, so one pass lists the active entries and all the rest
        # works on that list; each dense pass over [m, T] costs about as much as the encoding itself.
        flat_index = z.view(-1).nonzero().squeeze(1)
        value = z.view(-1)[flat_index]
        feature, local = flat_index // z.shape[1], flat_index % z.shape[1]
        self.active_count += torch.bincount(feature, minlength=self.n_features)
        self.activation_sum += z.sum(1).double()  # float32 within a batch (exact enough for T terms)
        self.activation_max = torch.maximum(self.activation_max, z.amax(1))
        index = base_index + local
        # An entry enters a feature's top-k only with a key above the weakest held one (EMPTY_KEY while
        # the top-k is not full); after a few thousand tokens that filter leaves few entries.
        floor = self.top_slots.keys.min(dim=1).values
        keys = activation_keys(value, index)
        enters = (keys > floor[feature]).nonzero().squeeze(1)
        self.top_slots.update(
            *best_per_feature(feature[enters], keys[enters], local[enters], self.top_slots.size), batch
        )
        if self.sample_slots.size:
            # the sample keeps each feature's active tokens of highest key priority << 32 | index; the key
            # depends on the token alone, so it is computed once per token, not per active entry
            keys = sample_token_keys(base_index + torch.arange(z.shape[1], device=z.device), self.seed)[local]
            enters = (keys > self.sample_slots.keys.min(dim=1).values[feature]).nonzero().squeeze(1)
            self.sample_slots.update(
                *best_per_feature(feature[enters], keys[enters], local[enters], self.sample_slots.size), batch
            )


def feature_major_encoder(transcoder) -> Callable[[torch.Tensor], torch.Tensor]:
    """mlp_in [T, d] -> [m, T] (feature-major, so per-feature work runs along rows) whose positive part
    is the activations. For a ReLU transcoder that is the pre-activation: the statistics read only
    positive values, so applying the ReLU would be one more pass over the tile for nothing."""
    if transcoder.config.activation != "relu":
        return lambda x: transcoder.encode(x).T.contiguous()

    def encode(x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(transcoder.b_enc[:, None], transcoder.W_enc.T, (x - transcoder.b_pre).T)

    return encode


# ============================================================================ input-invariant scores (pure)


# ============================================================================ results


@dataclass
class LayerScores:
    layer: int
    frequency: np.ndarray  # [m]
    mean_activation: np.ndarray  # [m], over the tokens where the feature fires
    max_activation: np.ndarray  # [m]
    top: ExampleArrays
    quantile: ExampleArrays
    context_free: np.ndarray  # [m]
    deembed_tokens: np.ndarray  # [m, n]
    deembed_values: np.ndarray
    promoted_tokens: np.ndarray
    promoted_values: np.ndarray
    suppressed_tokens: np.ndarray
    suppressed_values: np.ndarray
    pullback_layer: np.ndarray
    pullback_feature: np.ndarray
    pullback_value: np.ndarray
    # cross-layer transcoders only (tccli.features.cross_layer): the layers the features write to [n] and
    # each feature's decoder norm per target layer [m, n]; None for a per-layer transcoder
    decoder_targets: Optional[np.ndarray] = None
    decoder_norms: Optional[np.ndarray] = None

    @property
    def n_features(self) -> int:
        return int(self.frequency.shape[0])


@dataclass
class ScoreSettings:
    top: int = 20
    quantiles: int = 10
    per_quantile: int = 2
    half_window: int = 8
    top_tokens: int = 10
    batch_size: int = 32
    seed: int = 0


def stream_layers(
    encoders: dict[int, Callable[[torch.Tensor], torch.Tensor]],
    batches,
    n_features: dict[int, int],
    settings: ScoreSettings,
    device="cpu",
) -> tuple[dict[int, LayerStream], int]:
    """Run the streaming statistics over ``batches``.

    batches yields (tokens [rows, context], doc_ids [rows, context],
    {layer: (mlp_in [rows*context, d], scale [rows*context])});
    encoders maps a layer to a function mlp_in -> [m, rows*context] (feature-major) whose positive part
    is the activations (see ``feature_major_encoder``).
    Returns ({layer: LayerStream}, tokens seen).
    """
    streams = {
        layer: LayerStream.start(
            n_features[layer],
            settings.top,
            settings.quantiles * settings.per_quantile,
            settings.half_window,
            device,
            settings.seed,
        )
        for layer in encoders
    }
    seen = 0
    for tokens, doc_ids, inputs in batches:
        if seen + tokens.numel() > MAX_TOKENS:
            raise fail(f"tc score handles at most {MAX_TOKENS} tokens in one run")
        context = tokens.shape[1]
        # every layer's sample uses the same per-token keys: made once a batch (the CPU pass reads them)
        keys = (
            sample_token_keys(seen + torch.arange(tokens.numel(), device=tokens.device), settings.seed)
            if settings.quantiles * settings.per_quantile
            else None
        )
        for layer, encode in encoders.items():
            mlp_in, scale = inputs[layer]
            rows_per_tile = max(1, tile_values(device) // (n_features[layer] * context))
            for r0 in range(0, tokens.shape[0], rows_per_tile):  # tiles of whole rows: see TILE_VALUES
                r1 = min(tokens.shape[0], r0 + rows_per_tile)
                batch = BatchView(
                    tokens=tokens[r0:r1],
                    doc_ids=doc_ids[r0:r1],
                    z=encode(mlp_in[r0 * context : r1 * context]).float(),
                    scale=scale[r0 * context : r1 * context].float(),
                    half_window=settings.half_window,
                    sample_keys=None if keys is None else keys[r0 * context : r1 * context],
                )
                streams[layer].update(batch, seen + r0 * context)
        seen += tokens.numel()
    return streams, seen


def finish_layer(
    layer: int,
    stream: LayerStream,
    reads: LayerReads,
    W_E: torch.Tensor,
    W_U: torch.Tensor,
    earlier_decoders: dict[int, torch.Tensor],
    normalization: str,
    n_tokens: int,
    context: int,
    settings: ScoreSettings,
) -> LayerScores:
    """Turn a layer's streaming state and its transcoder's reads and writes into LayerScores. ``W_E`` is the
    embedding as it enters the residual (Gemma: scaled); ``earlier_decoders`` are earlier layers'
    ``LayerReads.decoders``."""
    count = stream.active_count.cpu().numpy()
    frequency = count / max(n_tokens, 1)
    mean = np.where(count > 0, stream.activation_sum.cpu().numpy() / np.maximum(count, 1), 0.0)
    top = examples_from_slots(stream.top_slots, decode_activation_keys, context, settings.half_window)
    sample = examples_from_slots(
        stream.sample_slots, lambda k: (None, sample_key_index(k)), context, settings.half_window
    )
    quantile = sort_into_bands(sample, settings.quantiles)

    with torch.no_grad():
        embed = embedding_for_norm(W_E, normalization)
        f_enc = reads.encoders
        deemb = deembedding_matrix(embed, f_enc)
        logits = logit_effect(reads.decoders, W_U.float())
        deembed_tokens, deembed_values = top_entries(deemb, settings.top_tokens)
        promoted_tokens, promoted_values = top_entries(logits, settings.top_tokens)
        suppressed_tokens, suppressed_values = top_entries(logits, settings.top_tokens, largest=False)
        pb_layer, pb_feature, pb_value = pullbacks(earlier_decoders, f_enc, settings.top_tokens)

        # the direct path of each top example's own token through the frozen normalisation
        centre_token = torch.as_tensor(top.window_tokens[:, :, settings.half_window]).clamp(min=0)
        scale = stream.top_slots.sorted().scale.float().cpu().clamp(min=1e-30)
        m = f_enc.shape[0]
        direct = torch.gather(deemb, 1, centre_token.reshape(m, -1))
        direct = (direct / scale if reads.scaled else direct) + reads.constant[:, None]
        context_free = context_free_scores(direct, torch.as_tensor(top.activation)).numpy()
    return LayerScores(
        layer=layer,
        frequency=frequency,
        mean_activation=mean.astype(np.float32),
        max_activation=stream.activation_max.cpu().numpy(),
        top=top,
        quantile=quantile,
        context_free=context_free,
        deembed_tokens=deembed_tokens,
        deembed_values=deembed_values,
        promoted_tokens=promoted_tokens,
        promoted_values=promoted_values,
        suppressed_tokens=suppressed_tokens,
        suppressed_values=suppressed_values,
        pullback_layer=pb_layer,
        pullback_feature=pb_feature,
        pullback_value=pb_value,
    )


# ============================================================================ the whole pass


def array_row_batches(rows: np.ndarray, doc_ids: np.ndarray, batch_size: int):
    """Rows already in memory (tests, benchmarks) as the batches a ``tccli.data.text.RowStream`` yields."""
    for start in range(0, len(rows), batch_size):
        yield rows[start : start + batch_size], doc_ids[start : start + batch_size]


def model_batches(capture, row_batches, progress=None, total_rows: Optional[int] = None):
    """Yield (tokens, doc_ids, {layer: (mlp_in [T, d], scale [T])}) for each (tokens, doc_ids) batch of
    ``row_batches`` from a ``tccli.model.loading.MlpCapture`` (which stops each pass at the last layer it captures)."""
    d_model = capture.info.d_model
    device = capture.loaded.device
    done = 0
    for rows, doc_ids in row_batches:
        tokens = torch.as_tensor(rows, dtype=torch.int64, device=device)
        captured = capture.capture(tokens)
        inputs = {
            layer: (acts["mlp_in"].reshape(-1, d_model), acts["mlp_scale"].reshape(-1))
            for layer, acts in captured.items()
        }
        yield tokens, torch.as_tensor(doc_ids, dtype=torch.int64, device=device), inputs
        done += len(rows)
        if progress is not None:
            progress("scoring", done, max(done, total_rows or 0))
    if progress is not None:  # the data may have held fewer rows than asked for: the total is now known
        progress("scoring", done, done)


def score_rows(
    loaded,
    transcoders: dict,
    row_batches,
    context: int,
    settings: ScoreSettings,
    progress=None,
    total_rows: Optional[int] = None,
    engine: str = "native",
    release_bridge: bool = False,
    log=lambda message: None,
) -> dict[int, LayerScores]:
    """Score every feature of ``transcoders`` ({layer: Transcoder}, or a CLT's ``LayerViews``: see
    tccli.features.cross_layer) in one pass over ``row_batches``.

    row_batches yields (tokens [b, context], doc_ids [b, context]) (a ``tccli.data.text.RowStream``, so memory
    does not grow with the number of tokens); each batch is one forward pass. ``total_rows`` (an upper
    bound is fine) is for progress only. ``engine`` reads the MLP inputs (see ``tccli.model.loading.MlpCapture``).
    With ``release_bridge`` the native engine drops the bridge (``loaded.bridge`` becomes None) once the
    embedding and unembedding have been read from it, so only one copy of the weights is held.
    """
    from tccli.model.loading import MlpCapture

    layers = sorted(transcoders)
    encoders = {layer: feature_major_encoder(transcoders[layer]) for layer in layers}
    n_features = {layer: transcoders[layer].n_features for layer in layers}
    bridge = loaded.bridge
    # the embedding as it enters the residual stream (Gemma scales it by sqrt(d_model))
    W_E = bridge.W_E.detach().float().cpu() * loaded.info.embed_scale
    W_U = bridge.W_U.detach().float().cpu()
    del bridge
    capture = MlpCapture(
        loaded,
        layers,
        engine,
        release_bridge=release_bridge,
        input_spaces={layer: transcoders[layer].config.input_space for layer in layers},
    )
    if capture.fallback_reason:
        log(capture.fallback_reason)
    with torch.no_grad():
        streams, n_tokens = stream_layers(
            encoders,
            model_batches(capture, row_batches, progress, total_rows),
            n_features,
            settings,
            device=loaded.device,
        )
    reads = {
        layer: LayerReads.of(transcoders[layer], loaded.spaces[layer] if loaded.spaces else None) for layer in layers
    }
    clt = cross_layer_of(transcoders)
    if clt is not None:  # decoders that write to every later layer (docs/method.md section 11)
        reads, pullback_decoders = cross_layer_reads(clt, reads, loaded.spaces)
    out = {}
    for layer in layers:
        earlier = (
            {lo: reads[lo].decoders for lo in layers if lo < layer} if clt is None else pullback_decoders.at(layer)
        )
        out[layer] = finish_layer(
            layer,
            streams[layer],
            reads[layer],
            W_E,
            W_U,
            earlier,
            loaded.info.normalization,
            n_tokens,
            context,
            settings,
        )
        if clt is not None:
            out[layer] = with_decoder_norms(out[layer], clt)
    return out


def score_model(
    loaded, transcoders: dict, rows: np.ndarray, doc_ids: np.ndarray, settings: ScoreSettings, progress=None, **options
) -> dict[int, LayerScores]:
    """``score_rows`` on rows held in memory (tests, benchmarks), ``settings.batch_size`` rows a pass."""
    return score_rows(
        loaded,
        transcoders,
        array_row_batches(rows, doc_ids, settings.batch_size),
        rows.shape[1],
        settings,
        progress,
        total_rows=len(rows),
        **options,
    )


def examples_from_slots(slots: ExampleSlots, decode, context: int, half_window: int) -> ExampleArrays:
    slots = slots.sorted()
    _, index = decode(slots.keys)
    index = index.cpu().numpy()
    empty = index < 0
    row, position = np.where(empty, -1, index // context), np.where(empty, -1, index % context)
    window_acts = slots.window_acts.cpu().numpy()
    return ExampleArrays(
        activation=window_acts[:, :, half_window].copy(),
        token_index=index,
        row=row,
        position=position,
        doc=slots.doc.cpu().numpy(),
        window_tokens=slots.window_tokens.cpu().numpy(),
        window_acts=window_acts,
    )
