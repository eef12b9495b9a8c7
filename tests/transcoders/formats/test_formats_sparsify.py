"""sparsify sparse coders (EleutherAI): read against sparsify's own formula, written and read back."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tccli.errors import TcError
from tccli.transcoders.formats import sparsify

D, M, K = 8, 32, 4


def sparsify_folder(folder, transcode=True, skip=True, seed=0, activation="topk"):
    """A layers.N.mlp folder laid out as SparseCoder.save_to_disk writes it."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "encoder.weight": torch.randn(M, D, generator=generator),
        "encoder.bias": torch.randn(M, generator=generator),
        "W_dec": torch.randn(M, D, generator=generator),
        "b_dec": torch.randn(D, generator=generator),
    }
    if skip:
        tensors["W_skip"] = torch.randn(D, D, generator=generator)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "sae.safetensors"))
    cfg = {
        "activation": activation,
        "expansion_factor": 4,
        "normalize_decoder": True,
        "num_latents": M,
        "k": K,
        "multi_topk": False,
        "skip_connection": skip,
        "transcode": transcode,
        "d_in": D,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return tensors


def sparsify_formula(tensors, x, transcode=True):
    """SparseCoder.forward (sparsify/sparse_coder.py, fused_encoder.py) written out."""
    source = x if transcode else x - tensors["b_dec"]
    pre = torch.relu(source @ tensors["encoder.weight"].T + tensors["encoder.bias"])
    values, indices = pre.topk(K, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, indices, values)
    y = z @ tensors["W_dec"] + tensors["b_dec"]
    if "W_skip" in tensors:
        y = y + x @ tensors["W_skip"].mT
    return y, z


@pytest.mark.parametrize("skip", [True, False])
def test_sparsify_transcoder_is_read_exactly(tmp_path, skip):
    tensors = sparsify_folder(tmp_path / "layers.3.mlp", skip=skip)
    transcoder = sparsify.read(tmp_path / "layers.3.mlp")
    config = transcoder.config
    assert (config.kind, config.activation, config.k, config.layer, config.skip) == ("transcoder", "topk", K, 3, skip)
    assert (config.input_space, config.output_space) == ("mlp_input", "mlp_output")
    x = torch.randn(40, D)
    y, z = sparsify_formula(tensors, x)
    with torch.no_grad():
        y_tc, z_tc = transcoder(x)
    assert torch.allclose(z_tc, z, atol=1e-5) and torch.allclose(y_tc, y, atol=1e-4)
    sparsify.write(transcoder, tmp_path / "out" / "layers.3.mlp")
    written = load_file(str(tmp_path / "out" / "layers.3.mlp" / "sae.safetensors"))
    assert torch.allclose(sparsify_formula(written, x)[0], y, atol=1e-4)
    again = sparsify.read(tmp_path / "out" / "layers.3.mlp")
    with torch.no_grad():
        assert torch.allclose(again(x)[0], y, atol=1e-4)


def test_sparsify_sae_on_the_mlp_output(tmp_path):
    tensors = sparsify_folder(tmp_path / "h.1.mlp", transcode=False, skip=False)
    sae = sparsify.read(tmp_path / "h.1.mlp")
    assert sae.config.kind == "sae" and sae.config.input_space == sae.config.output_space == "mlp_output"
    x = torch.randn(10, D)
    with torch.no_grad():
        assert torch.allclose(sae(x)[0], sparsify_formula(tensors, x, transcode=False)[0], atol=1e-4)


def test_sparsify_refusals(tmp_path):
    sparsify_folder(tmp_path / "layers.2", seed=1)
    with pytest.raises(TcError, match="not an MLP module"):
        sparsify.read(tmp_path / "layers.2")
    sparsify_folder(tmp_path / "layers.2.mlp", activation="groupmax")
    with pytest.raises(TcError, match="groupmax"):
        sparsify.read(tmp_path / "layers.2.mlp")


# ----------------------------------------------------------------------------- sparsify run folders


def sparsify_run(run, layers=(1, 3), hookpoint="layers.{}.mlp"):
    """A run folder as sparsify's Trainer.save leaves it: config.json, one folder per hookpoint, and the
    optimizer, scheduler and trainer state (torch.save files) beside them."""
    hookpoints = [hookpoint.format(layer) for layer in layers]
    tensors = {h: sparsify_folder(run / h, seed=i) for i, h in enumerate(hookpoints)}
    config = {"sae": {"k": K, "transcode": True}, "batch_size": 8, "hookpoints": hookpoints, "init_seeds": [0]}
    (run / "config.json").write_text(json.dumps(config))
    weight = torch.nn.Parameter(torch.zeros(M, D))
    optimizer = torch.optim.Adam([weight])
    weight.grad = torch.ones(M, D)
    optimizer.step()
    torch.save(optimizer.state_dict(), run / "optimizer_0.pt")
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer)
    torch.save(scheduler.state_dict(), run / "lr_scheduler_0.pt")
    torch.save({"global_step": 100}, run / "state.pt")
    torch.save(
        {"num_tokens_since_fired": {h: torch.zeros(M, dtype=torch.long) for h in hookpoints}}, run / "rank_0_state.pt"
    )
    return tensors


def test_a_sparsify_run_folder_is_read_without_its_optimizer_state(tmp_path):
    from tccli.transcoders.formats import format_of, load_transcoder_set

    run = tmp_path / "run"
    tensors = sparsify_run(run)
    # --save_best with sparsify's default fvu loss: best/<hookpoint>/ is a run folder of that hookpoint alone
    best = run / "best" / "layers.3.mlp"
    best_tensors = sparsify_run(best, layers=(3,))
    assert format_of(run) == "sparsify"
    coders = load_transcoder_set(run)
    assert sorted(coders) == [1, 3]
    x = torch.randn(20, D)
    for layer in (1, 3):
        assert coders[layer].config.input_hook == f"layers.{layer}.mlp"
        with torch.no_grad():
            y_tc, z_tc = coders[layer](x)
        y, z = sparsify_formula(tensors[f"layers.{layer}.mlp"], x)
        assert torch.allclose(z_tc, z, atol=1e-5) and torch.allclose(y_tc, y, atol=1e-4)
    assert sorted(load_transcoder_set(run, layers=[3])) == [3]
    best_coder = load_transcoder_set(best)[3]
    assert torch.equal(best_coder.W_dec.detach(), best_tensors["layers.3.mlp"]["W_dec"])


def test_tc_info_reads_a_sparsify_run_folder(tmp_path):
    from conftest import run_tc

    sparsify_run(tmp_path / "run", hookpoint="h.{}.mlp")
    result = run_tc("info", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert "set of 2 transcoders (sparsify)" in result.stdout


def test_sparsify_run_folders_tc_cannot_read_say_what_tc_looked_for(tmp_path):
    from tccli.transcoders.formats import load_transcoder_set

    run = tmp_path / "run"
    sparsify_run(run)
    for hookpoint in ("layers.1.mlp", "layers.3.mlp"):
        (run / hookpoint).rename(tmp_path / hookpoint)
    with pytest.raises(
        TcError,
        match=r"run is a sparsify run folder \(config.json\) but holds no coders: tc looked "
        r"for hookpoint folders such as layers.0.mlp/ holding cfg.json \+ sae.safetensors",
    ):
        load_transcoder_set(run)
    # several init seeds: one coder per seed in each hookpoint folder
    for seed in (0, 1):
        sparsify_folder(run / "layers.1.mlp" / f"seed{seed}", seed=seed)
    with pytest.raises(TcError, match=r"layers.1.mlp holds one sparse coder per init seed \(seed0, seed1\)"):
        load_transcoder_set(run)


def test_a_folder_entry_tc_cannot_read_says_what_tc_looked_for(tmp_path):
    from tccli.transcoders.formats import load_transcoder_set

    folder = tmp_path / "set"
    sparsify_folder(folder / "layers.1.mlp")
    torch.save({"step": 3}, folder / "notes.pt")  # not sparsify's state, not a paper transcoder
    with pytest.raises(TcError) as caught:
        load_transcoder_set(folder)
    message = str(caught.value)
    assert "notes.pt is not a transcoder file of the paper's code" in message
    assert (
        f"tc read {folder} as a folder of transcoders, one per layer: tc, SAELens, sparsify or Peek folders" in message
    )
