"""The CPU kernel of `tc score`'s streaming statistics: one pass over a [features x tokens] tile.

Pure arithmetic on numpy arrays, compiled by numba. ``tccli.features.scoring`` defines what is computed (the
exact keys, the slots, the windows); this module computes the same thing on the CPU in one read of the
tile, where the torch formulation (``LayerStream.update_torch``, kept for GPUs) makes several dense
passes over it plus a ``nonzero`` that alone costs more than the encoder matmul on a small model.

numba is the optional extra ``tccli[fast-score]``: only ``LayerStream.update_fused`` imports this module,
and only once ``scoring.numba_available()`` said numba imports.

For each feature (row of the tile, in parallel over features) and each token in order:
- a value v > 0 is an active entry: count, float64 running sum (in token order, so the sum does not
  depend on batch size or tiling), max;
- it enters the feature's top slots when its key (float32 bits of v << 32 | (2**32 - 1 - token index))
  beats the weakest held key. Later tokens have larger indices, so that is exactly "v above the weakest
  held activation" (or a slot still empty), and the key is built only on entry;
- it enters the sample slots when the token's sample key (priority << 32 | token index, one per token)
  beats the weakest held sample key.
An entry replaces the weakest slot at once (the threshold rises as the row is read). Keys are unique,
so the slots end as the top k of everything seen, whatever the order of insertion. Once the row is
read, each slot that changed gets its payload (window of tokens and activations, scale, document) from
the tile, which holds whole rows of the text.
"""

from __future__ import annotations

import numpy as np
from numba import get_thread_id, njit, prange

INDEX_MASK = (1 << 32) - 1


@njit(cache=True, inline="always")
def _weakest(keys, f):
    """(slot, key) of the smallest key in row f (an empty slot holds -1, the smallest)."""
    slot = 0
    weakest = keys[f, 0]
    for j in range(1, keys.shape[1]):
        if keys[f, j] < weakest:
            weakest = keys[f, j]
            slot = j
    return slot, weakest


@njit(cache=True, inline="always")
def _write_window(
    f, slot, local, z, tokens, doc_ids, scale, half_window, window_tokens, window_acts, slot_scale, slot_doc
):
    context = tokens.shape[1]
    row = local // context
    pos = local - row * context
    for j in range(2 * half_window + 1):
        p = pos - half_window + j
        if 0 <= p < context:
            window_tokens[f, slot, j] = tokens[row, p]
            v = z[f, row * context + p]
            window_acts[f, slot, j] = v if v > 0 else np.float32(0.0)
        else:
            window_tokens[f, slot, j] = -1
            window_acts[f, slot, j] = 0.0
    slot_scale[f, slot] = scale[local]
    slot_doc[f, slot] = doc_ids[row, pos]


@njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def scan_tile(
    z,
    z_bits,
    base_index,
    tokens,
    doc_ids,
    scale,
    sample_token_keys,
    half_window,
    active_count,
    activation_sum,
    activation_max,
    top_keys,
    top_window_tokens,
    top_window_acts,
    top_scale,
    top_doc,
    top_changed,
    sample_keys,
    sample_window_tokens,
    sample_window_acts,
    sample_scale,
    sample_doc,
    sample_changed,
    weakest,
):
    """Update a layer's statistics and example slots (all modified in place) with one tile.

    z [m, T] float32, C-contiguous: the tile's activations (a value <= 0 is inactive, so a ReLU
    transcoder's pre-activations can be passed as they are); z_bits: the same memory as int32;
    base_index: global index of the tile's token 0; tokens, doc_ids [T / context, context] int64;
    scale [T] float32; sample_token_keys [T] int64. Statistics [m]: active_count int64, activation_sum
    float64, activation_max float32. Slots: keys [m, k] int64, window_tokens [m, k, W] int64,
    window_acts [m, k, W] float32, scale [m, k] float32, doc [m, k] int64; ``*_changed`` [threads, k]
    int64 scratch (a row per numba thread). The sample slots may have k = 0. weakest [4, m] int64: per
    feature the slot holding the weakest top key, that key, the same for the sample (kept up to date
    here, so that a feature's k slots are read only when an entry enters; ``weakest_slots`` makes it).
    """
    m, n_tokens = z.shape
    n_top = top_keys.shape[1]
    n_sample = sample_keys.shape[1]
    for f in prange(m):
        thread = get_thread_id()  # this thread's scratch row: which slots changed, and to which token
        count = active_count[f]
        total = activation_sum[f]
        largest = activation_max[f]
        top_any = False
        top_slot, top_weakest = weakest[0, f], weakest[1, f]
        # Bits of positive float32 values order like the values, and a later token never wins a tie, so
        # a key beats the weakest held key exactly when its activation's bits beat the weakest's (any
        # positive activation while a slot is still empty).
        top_floor = np.int32(top_weakest >> 32) if top_weakest >= 0 else np.int32(0)
        sample_slot, sample_weakest = weakest[2, f], weakest[3, f]
        sample_any = False
        for t in range(n_tokens):
            v = z[f, t]
            if v > 0:
                count += 1
                total += v
                if v > largest:
                    largest = v
                bits = z_bits[f, t]
                if bits > top_floor:
                    top_keys[f, top_slot] = (np.int64(bits) << 32) | (INDEX_MASK - (base_index + t))
                    if not top_any:
                        top_changed[thread, :] = -1
                        top_any = True
                    top_changed[thread, top_slot] = t
                    top_slot, top_weakest = _weakest(top_keys, f)
                    if top_weakest >= 0:
                        top_floor = np.int32(top_weakest >> 32)
                if n_sample and sample_token_keys[t] > sample_weakest:
                    sample_keys[f, sample_slot] = sample_token_keys[t]
                    if not sample_any:
                        sample_changed[thread, :] = -1
                        sample_any = True
                    sample_changed[thread, sample_slot] = t
                    sample_slot, sample_weakest = _weakest(sample_keys, f)
        active_count[f] = count
        activation_sum[f] = total
        activation_max[f] = largest
        weakest[0, f], weakest[1, f], weakest[2, f], weakest[3, f] = top_slot, top_weakest, sample_slot, sample_weakest
        if top_any:
            for j in range(n_top):
                if top_changed[thread, j] >= 0:
                    _write_window(
                        f,
                        j,
                        top_changed[thread, j],
                        z,
                        tokens,
                        doc_ids,
                        scale,
                        half_window,
                        top_window_tokens,
                        top_window_acts,
                        top_scale,
                        top_doc,
                    )
        if sample_any:
            for j in range(n_sample):
                if sample_changed[thread, j] >= 0:
                    _write_window(
                        f,
                        j,
                        sample_changed[thread, j],
                        z,
                        tokens,
                        doc_ids,
                        scale,
                        half_window,
                        sample_window_tokens,
                        sample_window_acts,
                        sample_scale,
                        sample_doc,
                    )


def weakest_slots(top_keys: np.ndarray, sample_keys: np.ndarray) -> np.ndarray:
    """``scan_tile``'s weakest [4, m] for slots as they are (a slot with the smallest key; any of several)."""
    m = top_keys.shape[0]
    out = np.zeros((4, m), np.int64)
    for row, keys in ((0, top_keys), (2, sample_keys)):
        if keys.shape[1]:
            out[row] = keys.argmin(axis=1)
            out[row + 1] = keys[np.arange(m), out[row]]
    return out
