"""Helpers shared by the format tests: a random tc transcoder and its outputs."""

import torch

from tccli.config.transcoders import TranscoderConfig
from tccli.transcoders.transcoder import Transcoder

D, M = 8, 24


def random_transcoder(layer=1, kind="transcoder", activation="relu", k=None, seed=0, **extra):
    torch.manual_seed(seed)
    config = TranscoderConfig(
        d_in=D,
        d_out=D,
        n_features=M,
        activation=activation,
        k=k,
        kind=kind,
        layer=layer,
        model_name="some/model",
        model_architecture="GPT2LMHeadModel",
        weight_processing={"fold_ln": True},
        input_hook=f"blocks.{layer}.{'hook_mlp_out' if kind == 'sae' else 'ln2.hook_normalized'}",
        output_hook=f"blocks.{layer}.hook_mlp_out",
        feature_frequency=[0.5] * M,
        **extra,
    )
    transcoder = Transcoder(config)
    with torch.no_grad():
        for param in transcoder.parameters():
            param.normal_()
    return transcoder


def outputs(transcoder, x):
    with torch.no_grad():
        return transcoder(x)
