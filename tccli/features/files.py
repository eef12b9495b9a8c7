"""Features files written by `tc score` and read by `tc show`: HDF5 (.h5) or JSONL (.jsonl).

Both carry the same metadata (format, tc version, model info, transcoder configs, data sources and
token count, the score settings, the model's vocabulary as strings) so a file can be shown without the
model and checked against a model.

HDF5: dataset ``metadata`` (JSON as uint8 bytes, because attributes are limited to 64 KiB and a
vocabulary is larger); group ``layers/{L}`` with one dataset per field of ``scoring.LayerScores``
(``top/...`` and ``quantile/...`` for the example arrays). JSONL: the first line is the metadata
record ``{"format": "tc-features", ...}``, then one line per feature (see ``feature_record``).

Either way ``FeaturesFile.feature(layer, index)`` returns the same record dict.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any, BinaryIO, Optional

import numpy as np

from tccli.errors import fail
from tccli.features.examples import ExampleArrays
from tccli.features.scoring import LayerScores
from tccli.runtime import inputs, outputs

FORMAT = "tc-features"
FORMAT_VERSION = 1
EXAMPLE_GROUPS = ("top", "quantile")
# LayerScores fields a layer may lack (a cross-layer transcoder's), with how a pick of features selects
# from each: the target layers are one list for the whole layer.
OPTIONAL_FIELDS = {"decoder_targets": lambda pick: slice(None), "decoder_norms": lambda pick: pick}


def vocabulary(tokenizer: Any, d_vocab: int) -> list[str]:
    """Each token id's text as it reads inside a text (ids beyond the tokenizer: '<id>').

    Decoding a token alone drops a SentencePiece token's leading space, so each token is decoded after
    an anchor token and the anchor's own text is cut off again.
    """
    size = min(d_vocab, len(tokenizer))
    anchor_ids = tokenizer.encode("a", add_special_tokens=False)[-1:]
    anchor = tokenizer.decode(anchor_ids, clean_up_tokenization_spaces=False) if anchor_ids else ""
    pairs = tokenizer.batch_decode([anchor_ids + [i] for i in range(size)], clean_up_tokenization_spaces=False)
    alone = tokenizer.batch_decode([[i] for i in range(size)], clean_up_tokenization_spaces=False)
    texts = [
        pair[len(anchor) :] if anchor and pair.startswith(anchor) else single for pair, single in zip(pairs, alone)
    ]
    return texts + [f"<{i}>" for i in range(size, d_vocab)]


# ============================================================================ records


def _examples(arrays: ExampleArrays, i: int) -> list[dict]:
    out = []
    for j in range(arrays.token_index.shape[1]):
        if arrays.token_index[i, j] < 0:
            continue
        example = {
            "activation": float(arrays.activation[i, j]),
            "doc": int(arrays.doc[i, j]),
            "row": int(arrays.row[i, j]),
            "position": int(arrays.position[i, j]),
            "token_index": int(arrays.token_index[i, j]),
            "tokens": [int(t) for t in arrays.window_tokens[i, j]],
            "acts": [round(float(a), 6) for a in arrays.window_acts[i, j]],
        }
        if arrays.band is not None:
            example["band"] = int(arrays.band[i, j])
        out.append(example)
    return out


def _pairs(ids: np.ndarray, values: np.ndarray) -> list[list]:
    return [[int(t), float(v)] for t, v in zip(ids, values)]


def feature_record(scores: LayerScores, i: int) -> dict:
    """One feature as a plain dict: the JSONL line, and what FeaturesFile.feature returns."""
    context_free = float(scores.context_free[i])
    return {
        "layer": scores.layer,
        "feature": i,
        "frequency": float(scores.frequency[i]),
        "mean_activation": float(scores.mean_activation[i]),
        "max_activation": float(scores.max_activation[i]),
        "context_free": None if np.isnan(context_free) else context_free,
        "top_examples": _examples(scores.top, i),
        "quantile_examples": _examples(scores.quantile, i),
        "deembedding": _pairs(scores.deembed_tokens[i], scores.deembed_values[i]),
        "logit_promoted": _pairs(scores.promoted_tokens[i], scores.promoted_values[i]),
        "logit_suppressed": _pairs(scores.suppressed_tokens[i], scores.suppressed_values[i]),
        "pullbacks": [
            [int(layer), int(f), float(v)]
            for layer, f, v in zip(scores.pullback_layer[i], scores.pullback_feature[i], scores.pullback_value[i])
            if layer >= 0
        ],
    } | _decoder_norms(scores, i)


def _decoder_norms(scores: LayerScores, i: int) -> dict:
    """A cross-layer transcoder feature's decoder norm per layer it writes to: {"decoder_norms": [[layer,
    norm], ...]}; nothing for a per-layer transcoder's feature."""
    if scores.decoder_norms is None:
        return {}
    return {"decoder_norms": [[int(t), float(v)] for t, v in zip(scores.decoder_targets, scores.decoder_norms[i])]}


# ============================================================================ writing


def write_features(path: str | Path, scores: dict[int, LayerScores], metadata: dict) -> Path:
    """Write all layers' scores to ``path`` (.h5/.hdf5 or .jsonl), atomically (temp file + rename)."""
    path = Path(path)
    meta = dict(
        metadata,
        format=FORMAT,
        format_version=FORMAT_VERSION,
        layers=sorted(int(layer) for layer in scores),
        n_features={str(layer): s.n_features for layer, s in scores.items()},
    )
    if path.parent and not path.parent.exists():
        raise fail(f"cannot write {path}: folder {path.parent} does not exist")
    if path.suffix == ".jsonl":
        outputs.atomic_write(path, lambda tmp: _write_jsonl(tmp, scores, meta))
    elif path.suffix in (".h5", ".hdf5"):
        outputs.atomic_write(path, lambda tmp: _write_h5(tmp, scores, meta))
    else:
        raise fail(f"features file {path} must end in .h5 or .jsonl")
    return path


def _write_jsonl(path: Path, scores: dict[int, LayerScores], meta: dict) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps(meta) + "\n")
        for layer in sorted(scores):
            for i in range(scores[layer].n_features):
                handle.write(json.dumps(feature_record(scores[layer], i)) + "\n")


def _write_h5(path: Path, scores: dict[int, LayerScores], meta: dict) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.create_dataset("metadata", data=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8))
        for layer, layer_scores in scores.items():
            group = f.create_group(f"layers/{layer}")
            for fld in fields(LayerScores):
                value = getattr(layer_scores, fld.name)
                if fld.name in EXAMPLE_GROUPS:
                    sub = group.create_group(fld.name)
                    for ex_field in fields(ExampleArrays):
                        arr = getattr(value, ex_field.name)
                        if arr is not None:
                            _dataset(sub, ex_field.name, arr)
                elif isinstance(value, np.ndarray):
                    _dataset(group, fld.name, value)


def _dataset(group: Any, name: str, array: np.ndarray) -> None:
    # HDF5 cannot chunk (so cannot compress) an empty array, e.g. layer 0's pullbacks
    options = dict(compression="gzip", compression_opts=4) if array.size else {}
    group.create_dataset(name, data=array, **options)


# ============================================================================ reading


class FeaturesFile:
    """A features file opened for reading; ``feature(layer, i)`` gives one feature's record."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.meta = meta

    @staticmethod
    def open(path: str | Path) -> FeaturesFile:
        """The features file at ``path``; `-` reads a JSONL one from stdin (HDF5 cannot come from a pipe)."""
        if inputs.is_stdin(path):
            data = inputs.read_stdin("a tc features file (JSONL written by tc score)", (FORMAT,))
            return _JsonlFeatures.load(Path("stdin"), lambda mode="rb": io.BytesIO(data))
        path = Path(path)
        if path.is_dir():
            raise fail(f"{path} is a folder, not a features file (.h5 or .jsonl written by tc score)")
        if not path.is_file():
            raise fail(f"features file {path} does not exist")
        if path.suffix == ".jsonl":
            return _JsonlFeatures.load(path, path.open)
        if path.suffix in (".h5", ".hdf5"):
            return _H5Features.load(path)
        raise fail(f"{path} is not a features file (.h5 or .jsonl)")

    @property
    def layers(self) -> list[int]:
        return [int(layer) for layer in self.meta["layers"]]

    @property
    def vocab(self) -> list[str]:
        return self.meta.get("vocab", [])

    def n_features(self, layer: int) -> int:
        self.check_layer(layer)
        return int(self.meta["n_features"][str(layer)])

    def check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise fail(f"{self.path} has no layer {layer} (layers: {', '.join(map(str, self.layers))})")

    def check_feature(self, layer: int, index: int) -> None:
        n = self.n_features(layer)
        if not 0 <= index < n:
            raise fail(f"no feature L{layer}.F{index} in {self.path}: layer {layer} has features 0-{n - 1}")

    def token_text(self, token: int) -> str:
        vocab = self.vocab
        return vocab[token] if 0 <= token < len(vocab) else f"<{token}>"

    def feature(self, layer: int, index: int) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    def frequencies(self, layer: int) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def active_means(self, layer: int) -> np.ndarray:  # pragma: no cover - overridden
        """[m]: each feature's mean activation over the tokens where it fires."""
        raise NotImplementedError

    def mean_activations(self, layer: int) -> np.ndarray:
        """[m]: each feature's mean activation over every token scored (0 where it never fires):
        the value a mean ablation sets it to."""
        return (self.frequencies(layer).astype(np.float64) * self.active_means(layer)).astype(np.float32)


def _check_meta(meta: Any, path: Path) -> dict:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise fail(f"{path} is not a tc features file (written by tc score)")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise fail(f"{path} has features format {meta['format_version']}; this tc reads up to {FORMAT_VERSION}")
    return meta


class _JsonlFeatures(FeaturesFile):
    """A JSONL features file, indexed by the byte offset of each feature's line in ``source()`` (a binary
    handle on the file, or on the bytes read from stdin)."""

    def __init__(
        self,
        path: Path,
        meta: dict,
        offsets: dict[tuple[int, int], int],
        freqs: dict[int, np.ndarray],
        means: Optional[dict[int, np.ndarray]] = None,
        source: Optional[Callable[..., BinaryIO]] = None,
    ):
        super().__init__(path, meta)
        self._offsets = offsets
        self._freqs = freqs
        self._means = means or {}
        self._source = source or path.open

    @classmethod
    def load(cls, path: Path, source: Callable[..., BinaryIO]) -> _JsonlFeatures:
        offsets: dict[tuple[int, int], int] = {}
        freqs: dict[int, dict[int, float]] = {}
        means: dict[int, dict[int, float]] = {}
        with source("rb") as handle:
            first = handle.readline()
            try:
                meta = _check_meta(json.loads(first or b"null"), path)
            except json.JSONDecodeError:
                raise fail(f"{path} is not a tc features file (its first line is not JSON)") from None
            while True:
                offset = handle.tell()
                line = handle.readline()
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    key = (int(record["layer"]), int(record["feature"]))
                    freqs.setdefault(key[0], {})[key[1]] = float(record["frequency"])
                    means.setdefault(key[0], {})[key[1]] = float(record["mean_activation"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    raise fail(f"{path}: a corrupt feature line at byte {offset}") from None
                offsets[key] = offset

        def arrays(per_layer: dict[int, dict[int, float]]) -> dict[int, np.ndarray]:
            return {layer: np.array([values[i] for i in sorted(values)]) for layer, values in per_layer.items()}

        return cls(path, meta, offsets, arrays(freqs), arrays(means), source)

    def feature(self, layer: int, index: int) -> dict:
        self.check_feature(layer, index)
        if (layer, index) not in self._offsets:
            raise fail(f"{self.path} is missing feature L{layer}.F{index} (truncated file?)")
        with self._source("rb") as handle:
            handle.seek(self._offsets[(layer, index)])
            return json.loads(handle.readline())

    def frequencies(self, layer: int) -> np.ndarray:
        self.check_layer(layer)
        return self._freqs.get(layer, np.zeros(0))

    def active_means(self, layer: int) -> np.ndarray:
        self.check_layer(layer)
        return self._means.get(layer, np.zeros(0))


class _H5Features(FeaturesFile):
    @classmethod
    def load(cls, path: Path) -> _H5Features:
        import h5py

        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") != FORMAT or "metadata" not in f:
                    raise fail(f"{path} is not a tc features file (written by tc score)")
                meta = json.loads(bytes(f["metadata"][()]).decode("utf-8"))
        except OSError:
            raise fail(f"{path} is not a readable HDF5 file") from None
        return cls(path, _check_meta(meta, path))

    def _read_layer(self, layer: int, index: Optional[int]) -> LayerScores:
        """The layer's scores, restricted to feature ``index`` (kept as a length-1 axis) when given."""
        import h5py

        pick = slice(None) if index is None else slice(index, index + 1)
        try:
            with h5py.File(self.path, "r") as f:
                group = f[f"layers/{layer}"]
                values: dict[str, Any] = {"layer": layer}
                for fld in fields(LayerScores):
                    if fld.name == "layer":
                        continue
                    if fld.name in EXAMPLE_GROUPS:
                        sub = group[fld.name]
                        values[fld.name] = ExampleArrays(
                            **{
                                ef.name: (sub[ef.name][pick] if ef.name in sub else None)
                                for ef in fields(ExampleArrays)
                            }
                        )
                    elif fld.name in OPTIONAL_FIELDS:  # absent for per-layer transcoders and older files
                        values[fld.name] = (
                            None if fld.name not in group else group[fld.name][OPTIONAL_FIELDS[fld.name](pick)]
                        )
                    else:
                        values[fld.name] = group[fld.name][pick]
        except (OSError, KeyError) as exc:
            raise fail(f"{self.path} is corrupt: {exc}") from None
        return LayerScores(**values)

    def feature(self, layer: int, index: int) -> dict:
        self.check_feature(layer, index)
        record = feature_record(self._read_layer(layer, index), 0)
        record["feature"] = index
        return record

    def frequencies(self, layer: int) -> np.ndarray:
        return self._layer_array(layer, "frequency")

    def active_means(self, layer: int) -> np.ndarray:
        return self._layer_array(layer, "mean_activation")

    def _layer_array(self, layer: int, name: str) -> np.ndarray:
        import h5py

        self.check_layer(layer)
        try:
            with h5py.File(self.path, "r") as f:
                return f[f"layers/{layer}/{name}"][()]
        except (OSError, KeyError) as exc:
            raise fail(f"{self.path} is corrupt: {exc}") from None


def iter_features(features: FeaturesFile, refs: Optional[list[tuple[int, int]]] = None) -> Iterator[dict]:
    """Records of the given (layer, index) refs, or of every feature in file order."""
    if refs is None:
        refs = [(layer, i) for layer in features.layers for i in range(features.n_features(layer))]
    for layer, index in refs:
        yield features.feature(layer, index)


MODEL_FIELDS = ("architecture", "n_layers", "d_model", "d_vocab", "n_heads", "normalization")


def check_features_match_model(features: FeaturesFile, info: Any) -> None:
    """Refuse a features file computed on another model (info: models.ModelInfo)."""
    recorded = features.meta.get("model_info", {})
    for name in MODEL_FIELDS:
        if recorded.get(name) != getattr(info, name):
            raise fail(
                f"{features.path} was computed on another model: {recorded.get('name')!r} has "
                f"{name}={recorded.get(name)!r}, {info.name!r} has {getattr(info, name)!r}"
            )
