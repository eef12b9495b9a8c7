"""The paper's GPT-2 .pt files: read without the reference code, and no pickle ever runs."""

import os
import sys
import types

import pytest
import torch

from format_helpers import D, M, outputs
from tccli.errors import TcError
from tccli.transcoders.formats import load_transcoder_set, paper

# ----------------------------------------------------------------------------- the paper's .pt files


def paper_config_class(module_name="sae_training.config", class_name="LanguageModelSAERunnerConfig"):
    """A class pickled under the reference code's module path, as the released files were."""
    module = types.ModuleType(module_name)

    class Config:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    Config.__name__ = Config.__qualname__ = class_name
    Config.__module__ = module_name
    setattr(module, class_name, Config)
    return module, Config


def save_pickled(path, payload, module):
    """torch.save with the foreign module importable only while saving."""
    names = [module.__name__]
    parents = module.__name__.split(".")[:-1]
    for i in range(len(parents)):
        names.append(".".join(parents[: i + 1]))
    previous = {name: sys.modules.get(name) for name in names}
    for name in names[1:]:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[module.__name__] = module
    try:
        torch.save(payload, str(path))
    finally:
        for name, old in previous.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def paper_payload(config_object, layer=5):
    generator = torch.Generator().manual_seed(3)
    state = {
        "W_enc": torch.randn(D, M, generator=generator),
        "b_enc": torch.randn(M, generator=generator),
        "W_dec": torch.randn(M, D, generator=generator),
        "b_dec": torch.randn(D, generator=generator),
        "b_dec_out": torch.randn(D, generator=generator),
    }
    return {"cfg": config_object, "state_dict": state}


def test_read_paper_file_without_the_reference_code(tmp_path):
    module, Config = paper_config_class()
    layer = 5
    cfg = Config(
        model_name="gpt2-small",
        hook_point=f"blocks.{layer}.ln2.hook_normalized",
        out_hook_point=f"blocks.{layer}.hook_mlp_out",
        hook_point_layer=layer,
        d_in=D,
        d_sae=M,
        is_transcoder=True,
        dtype=torch.float32,
        device=torch.device("cpu"),
        l1_coefficient=1.4e-4,
        # as in the reference dataclass: a stray trailing comma made this a tuple; None fields
        use_ghost_grads=(True,),
        hook_point_head_index=None,
        d_out=None,
        expansion_factor=3,
    )
    payload = paper_payload(cfg)
    path = tmp_path / f"final_sparse_autoencoder_gpt2-small_blocks.{layer}.ln2.hook_normalized_{M}.pt"
    save_pickled(path, payload, module)
    assert "sae_training.config" not in sys.modules
    transcoder = paper.read(path)
    state = payload["state_dict"]
    assert transcoder.config.kind == "transcoder" and transcoder.config.layer == layer
    assert transcoder.config.input_hook == f"blocks.{layer}.ln2.hook_normalized"
    assert transcoder.config.output_hook == f"blocks.{layer}.hook_mlp_out"
    assert transcoder.config.training["reference_config"]["l1_coefficient"] == 1.4e-4
    assert torch.equal(transcoder.b_pre, state["b_dec"]) and torch.equal(transcoder.b_dec, state["b_dec_out"])
    x = torch.randn(20, D)
    z = torch.relu((x - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
    assert torch.equal(outputs(transcoder, x)[0], z @ state["W_dec"] + state["b_dec_out"])
    # every command that takes transcoders reads it too, alone or in a folder
    assert list(load_transcoder_set(path)) == [layer]
    assert list(load_transcoder_set(tmp_path)) == [layer]


class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(paper_payload(RunsAShellCommand(marker)), str(path))
    with pytest.raises(TcError, match=r"refusing to load .*system.*nothing in the file was executed"):
        paper.read(path)
    assert not marker.exists()
    # a config class from anywhere else is refused as well, even when named like a config
    module, Config = paper_config_class("innocent.looking", "TrainerConfig")
    save_pickled(tmp_path / "other.pt", paper_payload(Config(d_in=D)), module)
    with pytest.raises(TcError, match="innocent.looking.TrainerConfig"):
        paper.read(tmp_path / "other.pt")


def test_unreadable_paper_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(TcError, match="refusing to load .*junk.pt: it is not a torch.save file"):
        paper.read(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, str(tmp_path / "bare.pt"))
    with pytest.raises(TcError, match="needs 'cfg' and 'state_dict'"):
        paper.read(tmp_path / "bare.pt")
    torch.save(
        {"cfg": {"hook_point": "blocks.0.ln2.hook_normalized"}, "state_dict": {"W_enc": torch.zeros(2, 3)}},
        str(tmp_path / "partial.pt"),
    )
    with pytest.raises(TcError, match="state_dict lacks one of W_enc, b_enc, W_dec, b_dec"):
        paper.read(tmp_path / "partial.pt")
