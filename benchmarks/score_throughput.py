"""Throughput of `tc score`'s pass against a plain forward pass of the model, in the same run.

    python benchmarks/score_throughput.py [--model ../shared/models/stories260K] [--features 4096]
        [--tokens 131072] [--batch-size 32] [--device auto] [--threads N]

Random transcoders (``--features`` per layer, on every layer; the encoder bias is set so that a feature
fires on about ``--density`` of tokens, like a trained one) are scored on the TinyStories excerpt. It
prints tokens/s of (a) the model's plain forward pass (the HuggingFace model, no hooks) over the same
rows and batch size, (b) the scoring pass (tc score's capture to the last layer's MLP input + encoding +
streaming statistics), (c) all of score_model (b plus loading the plain model for the native engine and
the input-invariant scores), (d) "encode only": the capture and the encoder matmuls without any
statistics, the floor of any scorer that computes every feature's activation. Ratios: (b)/(a) (target
>= 0.5), and (d)/(a), the ceiling of that ratio on this machine.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def random_transcoders(info, n_features: int, density: float, seed: int = 0):
    from tccli.transcoder import Transcoder, TranscoderConfig

    out = {}
    # the MLP input is a normalised residual with |x| ~ sqrt(d); a unit-norm encoder column then gives a
    # pre-activation ~ N(0, 1), so a bias of -Phi^-1(1 - density) makes a feature fire on ~density of tokens
    threshold = float(torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - density)))
    for layer in range(info.n_layers):
        torch.manual_seed(seed + layer)
        tc = Transcoder(TranscoderConfig(d_in=info.d_model, d_out=info.d_model, n_features=n_features, layer=layer))
        with torch.no_grad():
            tc.W_enc.normal_().div_(tc.W_enc.norm(dim=0, keepdim=True))  # unit-norm columns
            tc.W_dec.normal_()
            tc.b_enc.fill_(-threshold)
        out[layer] = tc
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "stories260K"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "corpora" / "tinystories-valid-excerpt.txt"))
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--density", type=float, default=0.02)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--engine", default="native", help="how tc score reads activations: native or bridge")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from tccli.models import MlpCapture, load_model
    from tccli.scoring import (TILE_VALUES, ScoreSettings, array_row_batches, feature_major_encoder, model_batches,
                               score_model, stream_layers)
    from tccli.text import load_rows

    loaded = load_model(args.model, args.device)
    info = loaded.info
    packed = load_rows([args.data], loaded.tokenizer, info.bos_token_id, args.context, args.tokens, seed=0)
    rows = packed.tokens
    n_tokens = rows.size
    transcoders = {layer: tc.to(loaded.device) for layer, tc in
                   random_transcoders(info, args.features, args.density).items()}
    settings = ScoreSettings(batch_size=args.batch_size)
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(loaded.device).eval()
    capture = MlpCapture(loaded, sorted(transcoders), args.engine)

    def forward_pass() -> None:
        with torch.no_grad():
            for start in range(0, len(rows), args.batch_size):
                plain_model(torch.as_tensor(rows[start:start + args.batch_size], device=loaded.device))
        sync()

    def scoring_pass() -> None:
        layers = sorted(transcoders)
        with torch.no_grad():
            stream_layers({layer: feature_major_encoder(transcoders[layer]) for layer in layers},
                          model_batches(capture, array_row_batches(rows, packed.doc_ids, args.batch_size)),
                          {layer: args.features for layer in layers}, settings, device=loaded.device)
        sync()

    def bridge_forward() -> None:  # the TransformerBridge's forward: the denominator before --engine native
        with torch.no_grad():
            for start in range(0, len(rows), args.batch_size):
                loaded.bridge(torch.as_tensor(rows[start:start + args.batch_size], device=loaded.device),
                              return_type="logits")
        sync()

    def encode_only() -> None:  # the floor of any exact scorer: forward + the encoders, in the same tiles
        layers = sorted(transcoders)
        encoders = {layer: feature_major_encoder(transcoders[layer]) for layer in layers}
        rows_per_tile = max(1, TILE_VALUES // (args.features * args.context))
        with torch.no_grad():
            for _, _, inputs in model_batches(capture, array_row_batches(rows, packed.doc_ids, args.batch_size)):
                for layer in layers:
                    mlp_in = inputs[layer][0]
                    for t0 in range(0, mlp_in.shape[0], rows_per_tile * args.context):
                        encoders[layer](mlp_in[t0:t0 + rows_per_tile * args.context])
        sync()

    density: list = []

    def whole() -> None:
        scores = score_model(loaded, transcoders, rows, packed.doc_ids, settings, engine=args.engine)
        sync()
        density.append(sum(float(s.frequency.mean()) for s in scores.values()) / len(scores))

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    timed(lambda: forward_pass() if len(rows) < 64 else None)  # warm-up on tiny inputs is not needed
    results = {}
    for name, fn in (("forward", forward_pass), ("encode only", encode_only), ("scoring pass", scoring_pass),
                     ("score_model", whole), ("forward again", forward_pass), ("bridge forward", bridge_forward)):
        results[name] = timed(fn)
    forward = min(results["forward"], results["forward again"])
    print(f"model {info.name} ({info.n_layers} layers, d_model {info.d_model}) on {loaded.device}, "
          f"threads {torch.get_num_threads()}")
    print(f"{n_tokens} tokens, {args.features} features x {info.n_layers} layers, batch {args.batch_size} x "
          f"{args.context}, top {settings.top}, {settings.quantiles}x{settings.per_quantile} band samples; "
          f"measured density {density[0]:.4f} (asked {args.density})")
    for name, seconds in results.items():
        print(f"  {name:14s} {seconds:8.2f} s  {n_tokens / seconds:10.0f} tokens/s")
    print(f"ratio scoring pass / forward: {forward / results['scoring pass']:.2f}   "
          f"score_model / forward: {forward / results['score_model']:.2f}   (target >= 0.5)")
    print(f"ratio scoring pass / TransformerBridge forward: {results['bridge forward'] / results['scoring pass']:.2f}")
    print(f"ceiling of that ratio for any scorer that computes every activation (encode only / forward): "
          f"{forward / results['encode only']:.2f}; scoring pass / encode only: "
          f"{results['encode only'] / results['scoring pass']:.2f}")


if __name__ == "__main__":
    main()
