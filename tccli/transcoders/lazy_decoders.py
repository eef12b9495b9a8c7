"""Cross-layer transcoders whose decoders stay on disk (docs/method.md section 11).

A CLT's decoders grow as ``L^2 d m``: Gemma-2-2B's 426K-feature CLT holds far more decoder weights than the
model itself. Tracing a graph needs the decoder rows of the active features only, so, as circuit-tracer does
with ``lazy_decoder=True``, a ``LazyCrossLayerTranscoder`` keeps every encoder, bias and threshold in memory
and reads decoder rows from the safetensors files when asked (``safe_open(...).get_slice``): its ``W_dec`` is
no parameter, and no tensor of the full decoders' size is ever allocated by ``decoder_rows``, ``decode`` or
``layer_transcoder`` (whose view reads its own-layer block only when its ``W_dec`` is asked for, so that
`tc graph` and `tc circuit`, which read rows of active features only, never read a block).
``decoder(source, target)`` reads one block [m, d_out]; ``W_dec[str(layer)]`` still gives a layer's whole
decoder tensor, read from disk then, for the rare code that wants all of it.

Every reader of a CLT layout says where each layer's decoder lies (``DecoderLocation``: file, tensor name
and how many leading entries of its second axis to skip, for Gemma Scope 2's files, which hold decoders to
every layer, earlier ones included) and builds the CLT with ``build_cross_layer``, lazily or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from tccli.config.transcoders import CrossLayerConfig
from tccli.errors import fail
from tccli.transcoders.cross_layer import CrossLayerTranscoder
from tccli.transcoders.transcoder import Transcoder


@dataclass(frozen=True)
class DecoderLocation:
    """Where one source layer's decoders lie: ``file[name][:, skip:, :]`` is W_dec [m, n_later, d_out]."""

    file: Path
    name: str
    skip: int = 0


def _slice_error(location: DecoderLocation, exc: Exception) -> Exception:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return fail(f"cannot read {location.name} from {location.file}: {reason}")


def decoder_shape(location: DecoderLocation) -> tuple[int, ...]:
    """The stored tensor's shape, read from the file's header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(location.file), framework="pt") as f:
            if location.name not in f.keys():
                raise fail(f"{location.file} lacks tensor {location.name}")
            return tuple(f.get_slice(location.name).get_shape())
    except (SafetensorError, OSError) as exc:
        raise _slice_error(location, exc) from None


def read_decoder(location: DecoderLocation, rows=None, entry: Optional[int] = None) -> torch.Tensor:
    """float32 rows of a stored decoder: all of it ([m, n_later, d]), the given rows ([k, n_later, d]), or
    one target entry ([m or k, d]). Only what is asked for is read from the file."""
    from safetensors import SafetensorError, safe_open

    index = slice(None) if rows is None else torch.as_tensor(rows, dtype=torch.long).cpu()
    second = slice(location.skip, None) if entry is None else location.skip + entry
    try:
        with safe_open(str(location.file), framework="pt") as f:
            return f.get_slice(location.name)[index, second, :].to(torch.float32)
    except (SafetensorError, OSError) as exc:
        raise _slice_error(location, exc) from None


class DiskDecoders:
    """Stands for ``W_dec`` of a lazy CLT: ``[str(layer)]`` reads that layer's whole decoder from disk (on the
    CLT's device and dtype); ``rows`` and ``block`` read parts of it."""

    def __init__(self, locations: dict[int, DecoderLocation]):
        self.locations = {str(layer): location for layer, location in locations.items()}
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def _placed(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, self.dtype)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._placed(read_decoder(self.locations[key]))

    def __contains__(self, key: object) -> bool:
        return key in self.locations

    def keys(self):
        return self.locations.keys()

    def rows(self, layer: int, features) -> torch.Tensor:
        return self._placed(read_decoder(self.locations[str(layer)], rows=features))

    def block(self, layer: int, entry: int) -> torch.Tensor:
        return self._placed(read_decoder(self.locations[str(layer)], entry=entry))


class DiskLayerView(Transcoder):
    """One layer of a lazy CLT as a ``Transcoder``: the CLT's encoder tensors, b_dec and W_skip; ``W_dec`` (the
    own-layer block [m, d_out]) is read from disk on each access."""

    def __init__(self, config, read_block):
        with torch.device("meta"):  # no storage for tensors the CLT's own replace
            super().__init__(config)
        del self.W_dec
        # a plain attribute, not a submodule: moving the view never moves the CLT
        object.__setattr__(self, "_read_block", read_block)

    @property
    def W_dec(self) -> torch.Tensor:
        return self._read_block()


class LazyCrossLayerTranscoder(CrossLayerTranscoder):
    """A CrossLayerTranscoder whose decoders are read from disk on demand (see the module's docstring). Its
    other tensors are ordinary parameters; the math is the parent's."""

    def __init__(self, config: CrossLayerConfig, locations: dict[int, DecoderLocation]):
        # every tensor on the meta device first, so that the decoders are never allocated; the others are
        # then given real storage
        with torch.device("meta"):
            super().__init__(config)
        del self.W_dec
        for name in ("W_enc", "b_enc", "b_pre", "b_dec", "threshold", "W_skip"):
            group = getattr(self, name)
            if group is None:
                continue
            for key in list(group.keys()):
                group[key] = nn.Parameter(torch.zeros(group[key].shape))
        self.W_dec = DiskDecoders(locations)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        probe = self.b_dec[str(self.config.layers[0])]
        self.W_dec.device, self.W_dec.dtype = probe.device, probe.dtype
        return out

    def decoder(self, source: int, target: int) -> torch.Tensor:
        j, t = self._index(source), self._index(target)
        if t < j:
            raise fail(f"layer {source}'s features write only to layers {self.config.layers[j:]}, not {target}")
        return self.W_dec.block(source, t - j)

    def decoder_rows(self, source: int, features: torch.Tensor) -> torch.Tensor:
        self._index(source)
        return self.W_dec.rows(source, features)

    def decode(self, activations: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """The parent's decode, reading only the decoder rows of features active somewhere in ``activations``
        (an inactive feature adds exactly zero to every output)."""
        if not activations:
            return {}
        first = self._index(min(activations))
        out: dict[int, torch.Tensor] = {}
        for source, z in sorted(activations.items()):
            j = self._index(source)
            active = (z.reshape(-1, z.shape[-1]) != 0).any(0).nonzero().squeeze(1)
            rows = self.decoder_rows(source, active.cpu())
            z_active = z[..., active]
            for offset, target in enumerate(self.config.layers[j:]):
                write = z_active @ rows[:, offset, :]
                out[target] = write if target not in out else out[target] + write
        shape = next(iter(activations.values())).shape[:-1]
        for target in self.config.layers[first:]:
            bias = self.b_dec[str(target)]
            out[target] = out[target] + bias if target in out else bias.expand(*shape, -1)
        return out

    def layer_transcoder(self, layer: int) -> Transcoder:
        """As the parent's, except that the own-layer decoder block is read from disk only when the view's
        ``W_dec`` is asked for (each time: nothing is kept), so that code reading the views' encoders (checks,
        targets, graphs) never reads a whole block."""
        self._index(layer)
        key = str(layer)
        view = DiskLayerView(self.config.layer_config(layer), lambda: self.decoder(layer, layer))
        view.W_enc, view.b_enc, view.b_pre, view.b_dec = (
            self.W_enc[key],
            self.b_enc[key],
            self.b_pre[key],
            self.b_dec[key],
        )
        if self.threshold is not None:
            view.threshold = self.threshold[key]
        if self.W_skip is not None:
            view.W_skip = self.W_skip[key]
        return view

    def eager(self) -> CrossLayerTranscoder:
        """The same CLT with every decoder in memory (for writing it out)."""
        clt = CrossLayerTranscoder(self.config)
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, param in clt.named_parameters():
                base, key = name.split(".")
                param.copy_(self.W_dec[key] if base == "W_dec" else params[name])
        return clt.to(self.b_dec[str(self.config.layers[0])].device)


def build_cross_layer(
    config: CrossLayerConfig,
    tensors: dict[int, dict[str, torch.Tensor]],
    decoders: dict[int, DecoderLocation],
    lazy: bool,
    where: str,
) -> CrossLayerTranscoder:
    """A CLT of ``config`` from each layer's tensors in tc's names and orientation (W_enc [d_in, m], b_enc,
    b_pre, b_dec, threshold, W_skip [d_in, d_out]) and where each layer's decoder lies; every shape checked
    against the config (one line naming the file and tensor otherwise), the decoders' from the files' headers."""
    config.validate(where)
    clt = LazyCrossLayerTranscoder(config, decoders) if lazy else CrossLayerTranscoder(config)
    n = len(config.layers)
    for j, layer in enumerate(config.layers):
        location = decoders[layer]
        stored = decoder_shape(location)
        expected = (config.n_features, location.skip + n - j, config.d_out)
        if stored != expected:
            raise fail(
                f"{location.file}: tensor {location.name} has shape {stored}, expected {expected} "
                f"(features, {'layers' if location.skip else 'this and later layers'}, d_out)"
            )
    with torch.no_grad():
        for name, param in clt.named_parameters():
            base, key = name.split(".")
            layer = int(key)
            if base == "W_dec":
                value = read_decoder(decoders[layer])
            else:
                value = tensors[layer].get(base)
                if value is None:
                    raise fail(f"{where}: layer {layer} lacks tensor {base}")
                if tuple(value.shape) != tuple(param.shape):
                    raise fail(
                        f"{where}: layer {layer}'s {base} has shape {tuple(value.shape)}, expected {tuple(param.shape)}"
                    )
            param.copy_(value.to(torch.float32))
    return clt


def read_tensors(file: Path, leave_out: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file but those named in ``leave_out`` (which are not read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys() if name not in leave_out}
    except (SafetensorError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise fail(f"cannot read {file}: {reason}") from None


def load_tc_cross_layer_lazily(folder: str | Path, device: str | torch.device = "cpu") -> LazyCrossLayerTranscoder:
    """tc's own CLT folder (tccli.transcoders.files) with its decoders left on disk."""
    from tccli.transcoders.files import CONFIG_FILE, clt_layer_file, read_cross_layer_config

    folder = Path(folder)
    config = read_cross_layer_config(folder / CONFIG_FILE)
    tensors, decoders = {}, {}
    for layer in config.layers:
        file = folder / clt_layer_file(layer)
        if not file.is_file():
            raise fail(f"{file} does not exist: the cross-layer transcoder {folder} has layer {layer}")
        tensors[layer] = read_tensors(file, leave_out=("W_dec",))
        decoders[layer] = DecoderLocation(file, "W_dec")
    return build_cross_layer(config, tensors, decoders, True, str(folder)).to(device)
