"""Worker for benchmarks/clt_train_vs_crosslayer_coding.py: times utahnlp/crosslayer-coding's training step.

Runs under the Python of a separate virtual environment where crosslayer-coding (package ``clt``) is installed;
it imports nothing of tc. Its step is the body of ``clt.training.trainer.CLTTrainer.train``'s loop, on random
tensors already in memory (no activation store, no logging, evaluation or checkpoints): ``zero_grad``, the
trainer's ``model.get_feature_activations``, ``LossManager.compute_total_loss`` (which runs ``model(inputs)``
and the pre-activation loss, each encoding the inputs again, as the trainer does), the dead-neuron counters,
``backward``, the optimiser step, the decoder-norm cache reset and the scheduler step.

    python crosslayer_coding_worker.py '{"activation": "jumprelu", "layers": 6, "d": 128, "features": 1024,
        "batch_size": 1024, "k": 16, "threads": 1}'

then reads commands on stdin, one a line: ``N`` runs N steps and prints one JSON line ``{"seconds": [...]}``
(each step's wall time); ``quit`` (or end of input) exits. It prints ``{"ready": true}`` once warmed up.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from clt.config import CLTConfig, TrainingConfig
from clt.models.clt import CrossLayerTranscoder
from clt.training.losses import LossManager


def build(spec: dict):
    activation, k = spec["activation"], spec["k"]
    clt_config = CLTConfig(
        num_features=spec["features"],
        num_layers=spec["layers"],
        d_model=spec["d"],
        activation_fn=activation,
        batchtopk_k=k if activation == "batchtopk" else None,
        # tc's topk keeps k per layer and token; crosslayer-coding's per-layer mode does not run (its encode
        # path rejects topk), so its global mode keeps k x layers per token over every layer together
        topk_k=k * spec["layers"] if activation == "topk" else None,
        topk_mode="global",
        normalization_method="none",
    )
    training_config = TrainingConfig(
        learning_rate=1e-4,
        training_steps=1000,
        train_batch_size_tokens=spec["batch_size"],
        activation_path="unused",  # checked for presence only; no store is built here
        normalization_method="none",
    )
    device = torch.device("cpu")
    model = CrossLayerTranscoder(clt_config, process_group=None, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training_config.learning_rate)
    total = training_config.training_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
    losses = LossManager(training_config, clt_config=clt_config)
    since_fired = torch.zeros(clt_config.num_layers, clt_config.num_features, device=device)
    return clt_config, training_config, model, optimizer, scheduler, losses, since_fired


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    clt_config, training_config, model, optimizer, scheduler, losses, since_fired = build(spec)
    n, d, n_layers = spec["batch_size"], spec["d"], spec["layers"]
    gen = torch.Generator().manual_seed(0)
    inputs = {j: torch.randn(n, d, generator=gen) for j in range(n_layers)}
    mixers = [torch.randn(d, d, generator=gen) / d**0.5 for _ in range(n_layers)]
    targets = {j: torch.relu(inputs[j] @ mixers[j]) for j in range(n_layers)}
    step_count = [0]

    def step() -> None:
        step_count[0] += 1
        optimizer.zero_grad(set_to_none=True)
        activations = model.get_feature_activations(inputs)
        dead = (since_fired > training_config.dead_feature_window).detach()
        loss, _ = losses.compute_total_loss(
            model,
            inputs,
            targets,
            step_count[0],
            training_config.training_steps,
            precomputed_activations=activations,
            dead_neuron_mask=dead,
        )
        with torch.no_grad():
            for layer, acts in activations.items():
                fired = (acts.detach() > 1e-6).any(dim=0)
                since_fired[layer] += 1
                since_fired[layer][fired] = 0
        if not torch.isnan(loss):
            loss.backward()
            optimizer.step()
            model.decoder_module._cached_decoder_norms = None
        scheduler.step()

    step()  # warm-up
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        seconds = []
        for _ in range(int(command)):
            start = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start)
        print(json.dumps({"seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
