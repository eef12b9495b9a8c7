"""The bad-input battery: what a user meets first must never break `tc`.

Every case runs `tc` as a real subprocess on a bad input (missing, unreadable, corrupt, foreign, empty or
oversized inputs; malformed specs; existing, read-only and full outputs; outputs that would destroy an
input; a locked output) and asserts what the standards promise: one line on stderr naming the problem
(``tc: error: ...`` containing the case's fragment), the case's non-zero exit, nothing on stdout, no
traceback, nothing already written changed (the shared artefacts are hashed before and after), and no
temporary or lock files left. Interruptions (SIGINT, SIGTERM, SIGKILL at several moments) and concurrent
runs, which need more than one command, are the test functions at the end.

HOW TO ADD CASES. Find your subcommand's list in ``CASES`` (or add ``CASES["yours"] = [...]``) and append
``Case(id, args, message)``:

    Case("missing-graph", ("graph", "--transcoders", "{tcs}", "--prompt", "hi", "--out", "{tmp}/g.json"),
         "does not exist"),

- ``args`` may use the shared artefacts (``{text}``, ``{cache}``, ``{tcs}``, ``{tc0}``, ``{sae}``,
  ``{features}``, ``{graph}``, ``{saelens}``, ``{png}``, ``{other_model}``, ``{other_tcs}``: see
  ``battery.Artefacts``) and ``{tmp}``, a fresh folder for the case (the command runs there).
  Never pass an artefact as an output: they are checked to stay unchanged.
- ``setup=lambda tmp, a: {...}`` creates further inputs in ``tmp`` and returns names for ``args``
  (``bad_config(...)``, ``write_file(...)`` below help).
- ``sandbox="readonly"`` or ``"full"`` makes ``{mnt}`` a read-only or 4 KiB filesystem (skipped where
  the machine has no user namespaces).
- ``exit_code`` if it is not 2.
Each case becomes its own test id ``test_bad_input[command-id]``. Cases run a few at a time on a thread
pool (``battery.Runner``); a case costs about one `tc` start-up (~2 s of CPU), so keep them to inputs
that fail early unless the point is a late failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import battery
from battery import Case

# ============================================================================ setup helpers


def write_file(name: str, content: str | bytes):
    """setup: a file ``name`` in the case folder holding ``content``; its path is ``{file}``."""

    def setup(tmp: Path, a) -> dict:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return {"file": path}

    return setup


def bad_config(**changes):
    """setup: a copy of the layer-0 transcoder with ``changes`` made to its config.json: ``{bad}``."""

    def setup(tmp: Path, a) -> dict:
        folder = tmp / "bad_tc"
        shutil.copytree(a.tc0, folder)
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
        return {"bad": folder}

    return setup


def bad_saelens(**changes):
    """setup: a copy of the converted SAELens layer 0 with ``changes`` to cfg.json and no tc_config: ``{bad}``."""

    def setup(tmp: Path, a) -> dict:
        folder = tmp / "bad_sae"
        shutil.copytree(a.saelens / "layer_0", folder)
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg.pop("tc_config", None)
        cfg.update(changes)
        (folder / "cfg.json").write_text(json.dumps(cfg))
        return {"bad": folder}

    return setup


def bad_peek(target: str, **changes):
    """setup: the layer-0 transcoder written as a Peek folder (no tc_config) with ``changes`` to ``target``
    (sae.json or sae_info.json; no changes: the file removed): ``{bad}``."""

    def setup(tmp: Path, a) -> dict:
        from tccli.transcoders.formats import load_transcoder_set, peek

        folder = peek.write(load_transcoder_set(a.tc0)[0], tmp / "bad_peek")
        info = json.loads((folder / "sae_info.json").read_text())
        info.pop("tc_config")
        (folder / "sae_info.json").write_text(json.dumps(info))
        if not changes:
            (folder / target).unlink()
        else:
            data = json.loads((folder / target).read_text())
            data.update(changes)
            (folder / target).write_text(json.dumps(data))
        return {"bad": folder}

    return setup


def truncated(artefact: str, inner: str = "", keep: int = 200):
    """setup: a copy of an artefact (file, or ``inner`` file of a folder) cut to ``keep`` bytes: ``{bad}``."""

    def setup(tmp: Path, a) -> dict:
        source = getattr(a, artefact)
        target = tmp / source.name
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy(source, target)
        victim = target / inner if inner else target
        victim.write_bytes(victim.read_bytes()[:keep])
        return {"bad": target}

    return setup


def truncated_gemma_scope(tmp: Path, a) -> dict:
    """setup: a Gemma Scope layer_0/params.npz cut short as an interrupted download leaves it (the zip's
    directory, at its end, gone): ``{bad}`` the file, ``{bad_set}`` its set folder."""
    folder = tmp / "gemma_scope" / "layer_0"
    folder.mkdir(parents=True)
    shapes = {"W_enc": (16, 64), "W_dec": (64, 16), "b_enc": (64,), "b_dec": (16,), "threshold": (64,)}
    np.savez(folder / "params.npz", **{name: np.ones(shape, dtype=np.float32) for name, shape in shapes.items()})
    params = folder / "params.npz"
    params.write_bytes(params.read_bytes()[:400])
    return {"bad": params, "bad_set": tmp / "gemma_scope"}


def circuit_tracer_gap(tmp: Path, a) -> dict:
    """setup: the shared set (layers 0 and 1) written as a circuit-tracer set, layer_0.safetensors removed:
    ``{bad}``."""
    from tccli.transcoders.formats import circuit_tracer, load_transcoder_set

    folder = tmp / "circuit_tracer"
    circuit_tracer.write_set(load_transcoder_set(a.tcs), folder)
    (folder / "layer_0.safetensors").unlink()
    return {"bad": folder}


def circuit_tracer_clt(breakage: str):
    """setup: a 2-layer cross-layer transcoder in circuit-tracer's layout (W_enc_i/W_dec_i files, config.yaml)
    broken as ``breakage`` says: ``{bad}``."""

    def setup(tmp: Path, a) -> dict:
        import torch
        import yaml
        from safetensors.torch import save_file

        folder, m, d = tmp / "clt", 6, 4
        folder.mkdir()
        for i in range(2):
            encoder = {f"W_enc_{i}": torch.ones(m, d), f"b_enc_{i}": torch.zeros(m), f"b_dec_{i}": torch.zeros(d)}
            save_file(encoder, str(folder / f"W_enc_{i}.safetensors"))
            save_file({f"W_dec_{i}": torch.ones(m, 2 - i, d)}, str(folder / f"W_dec_{i}.safetensors"))
        config = {
            "model_kind": "cross_layer_transcoder",
            "feature_input_hook": "hook_resid_mid",
            "feature_output_hook": "hook_mlp_out",
        }
        if breakage == "missing-layer":
            (folder / "W_dec_1.safetensors").unlink()
        elif breakage == "wrong-shape":
            save_file({"W_dec_0": torch.ones(m, 3, d)}, str(folder / "W_dec_0.safetensors"))
        elif breakage == "unknown-activation":
            config["activation"] = "gelu"
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        return {"bad": folder}

    return setup


def existing_output(name: str):
    """setup: an existing file ``name`` in the case folder (an output that must not be overwritten): ``{file}``."""
    return write_file(name, "precious\n")


def foreign_h5(tmp: Path, a) -> dict:
    path = tmp / "foreign.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    return {"file": path}


def incomplete_cache(tmp: Path, a) -> dict:
    path = tmp / "incomplete.h5"
    shutil.copy(a.cache, path)
    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = False
    return {"file": path}


def graph_edit(edit):
    """setup: a copy of the shared graph JSON changed by ``edit(data)``: ``{file}``."""

    def setup(tmp: Path, a) -> dict:
        data = json.loads(a.graph.read_text())
        edit(data)
        path = tmp / "edited.json"
        path.write_text(json.dumps(data))
        return {"file": path}

    return setup


def _head_99(data: dict) -> None:
    data["nodes"].append(
        {
            "id": "L0.H99@3",
            "kind": "head",
            "layer": 0,
            "head": 99,
            "position": 3,
            "token": "x",
            "path_contribution": 1e9,
        }
    )


def _other_model(data: dict) -> None:
    data["graph"]["metadata"]["n_layers"] = 12


def _no_kind(data: dict) -> None:
    for node in data["nodes"]:
        node.pop("kind", None)


def direction(values):
    """setup: a .npy direction file holding ``values``: ``{file}``."""

    def setup(tmp: Path, a) -> dict:
        path = tmp / "direction.npy"
        np.save(path, np.asarray(values))
        return {"file": path}

    return setup


def malicious_pt(tmp: Path, a) -> dict:
    """A .pt file whose pickle asks to run os.system: must be refused before anything runs."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp / "pwned"),))

    path = tmp / "evil.pt"
    path.write_bytes(pickle.dumps({"cfg": Boom(), "state_dict": {}}))
    return {"file": path}


def locked_output(name: str, folder: bool = False):
    """setup: hold the lock another `tc` run would hold on output ``name`` (a file, or a folder); ``{out}``.

    The lock is taken by a child process that lives until the case's command has run (it exits when its
    stdin closes, which the case's `tc` run does not touch), so the case meets a real concurrent writer."""

    def setup(tmp: Path, a) -> dict:
        out = tmp / name
        target = out if folder else out.with_name(out.name + ".lock")
        if folder:
            out.mkdir()
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import fcntl, os, sys, time\n"
                f"fd = os.open({str(target)!r}, os.O_RDONLY if {folder} else os.O_RDWR | os.O_CREAT)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(120)\n",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout.readline().strip() == "held"
        HOLDERS.append((holder, target, folder))
        return {"out": out}

    return setup


HOLDERS: list = []

# ============================================================================ the cases

T = "--transcoders"
CPU = ("--device", "cpu")
SMALL = ("--tokens", "1k", "--context", "64")

CASES: dict[str, list[Case]] = {}

CASES["cli"] = [
    Case("unknown-command", ("frobnicate",), "No such command"),
    Case("unknown-option", ("cache", "--bogus"), "No such option: --bogus"),
    Case("missing-required", ("train",), "Missing option"),
    Case("option-without-value", ("cache", "--data"), "requires an argument"),
    Case("bad-count", ("cache", "--data", "{text}", "--tokens", "lots"), "expected a count like 4096"),
    Case("fractional-count", ("cache", "--data", "{text}", "--tokens", "1.5"), "not a whole number"),
    Case("int-not-int", ("train", "--cache", "{cache}", "--out", "{tmp}/o", "--k", "four"), "Invalid value for '--k'"),
    Case(
        "float-not-float",
        ("train", "--cache", "{cache}", "--out", "{tmp}/o", "--lr", "fast"),
        "Invalid value for '--lr'",
    ),
]

CASES["cache"] = [
    Case("no-data", ("cache", "--out", "{tmp}/a.h5"), "no text given"),
    Case("missing-data", ("cache", "--data", "{tmp}/missing.txt", "--out", "{tmp}/a.h5", *CPU), "does not exist"),
    Case(
        "empty-data",
        ("cache", "--data", "{file}", "--out", "{tmp}/a.h5", *CPU),
        "no text in",
        setup=write_file("empty.txt", "\n\n"),
    ),
    Case("binary-data", ("cache", "--data", "{png}", "--out", "{tmp}/a.h5", *CPU), "is not UTF-8 text"),
    Case(
        "jsonl-not-json",
        ("cache", "--data", "{file}", "--out", "{tmp}/a.h5", *CPU),
        "is not valid JSON",
        setup=write_file("d.jsonl", '{"text": "ok"}\nnot json\n'),
    ),
    Case(
        "jsonl-no-text",
        ("cache", "--data", "{file}", "--out", "{tmp}/a.h5", *CPU),
        "no string 'text' field",
        setup=write_file("d.jsonl", '{"body": "ok"}\n'),
    ),
    Case(
        "data-folder-not-dataset",
        ("cache", "--data", "{tmp}/folder", "--out", "{tmp}/a.h5", *CPU),
        "datasets",
        setup=write_file("folder/notes.txt", "not a dataset"),
    ),
    Case("empty-stdin", ("cache", "--data", "-", "--out", "{tmp}/a.h5", *CPU), "no text in stdin", stdin=""),
    Case(
        "too-little-data",
        ("cache", "--data", "{file}", "--out", "{tmp}/a.h5", "--context", "64", *CPU),
        "fewer than one row",
        setup=write_file("short.txt", "Once upon a time.\n"),
    ),
    Case(
        "tokens-below-context", ("cache", "--data", "{text}", "--tokens", "10", "--context", "64"), "less than one row"
    ),
    Case("context-1", ("cache", "--data", "{text}", "--context", "1"), "--context must be at least 2"),
    Case(
        "context-too-long",
        ("cache", "--data", "{text}", "--tokens", "100k", "--context", "5000", "--out", "{tmp}/a.h5", *CPU),
        "longer than the model's maximum context of 256",
    ),
    Case(
        "layer-out-of-range",
        ("cache", "--data", "{text}", *SMALL, "--layers", "9", "--out", "{tmp}/a.h5", *CPU),
        "layer 9 is out of range",
    ),
    Case(
        "layer-spec-garbage",
        ("cache", "--data", "{text}", *SMALL, "--layers", "a-b", "--out", "{tmp}/a.h5", *CPU),
        "bad layer list",
    ),
    Case(
        "layer-range-backwards",
        ("cache", "--data", "{text}", *SMALL, "--layers", "3-1", "--out", "{tmp}/a.h5", *CPU),
        "end before start",
    ),
    Case("bad-dtype", ("cache", "--data", "{text}", "--dtype", "int8"), "--dtype must be one of"),
    Case("bad-model-dtype", ("cache", "--data", "{text}", "--model-dtype", "float8"), "--model-dtype must be one of"),
    Case("bad-compression", ("cache", "--data", "{text}", "--compression", "zip"), "--compression must be one of"),
    Case("bad-engine", ("cache", "--data", "{text}", "--engine", "turbo"), "--engine must be one of"),
    Case("batch-size-0", ("cache", "--data", "{text}", "--batch-size", "0"), "--batch-size must be at least 1"),
    Case("resume-and-force", ("cache", "--data", "{text}", "--resume", "--force"), "contradict"),
    Case(
        "missing-model", ("cache", "--model", "{tmp}/nope", "--data", "{text}", "--out", "{tmp}/a.h5"), "does not exist"
    ),
    Case(
        "model-not-hf-folder",
        ("cache", "--model", "{tmp}/folder", "--data", "{text}", "--out", "{tmp}/a.h5", *CPU),
        "not a HuggingFace model folder",
        setup=write_file("folder/notes.txt", "not a model"),
    ),
    Case(
        "model-is-a-file",
        ("cache", "--model", "{png}", "--data", "{text}", "--out", "{tmp}/a.h5", *CPU),
        "is not a folder",
    ),
    Case("unknown-device", ("cache", "--data", "{text}", "--device", "tpu", "--out", "{tmp}/a.h5"), "unknown --device"),
    Case(
        "existing-output",
        ("cache", "--data", "{text}", *SMALL, "--out", "{file}", *CPU),
        "already exists",
        setup=existing_output("a.h5"),
    ),
    Case("output-is-folder", ("cache", "--data", "{text}", *SMALL, "--out", "{tmp}", *CPU), "is a folder"),
    Case(
        "output-folder-missing", ("cache", "--data", "{text}", *SMALL, "--out", "{tmp}/no/a.h5", *CPU), "does not exist"
    ),
    Case(
        "output-is-the-data",
        ("cache", "--data", "{file}", *SMALL, "--out", "{file}", "--force", *CPU),
        "would overwrite the input",
        setup=write_file("d.txt", "Some text.\n\nMore text.\n"),
    ),
    Case(
        "resume-foreign-h5",
        ("cache", "--data", "{text}", *SMALL, "--out", "{file}", "--resume", *CPU),
        "not a tc activation cache",
        setup=foreign_h5,
    ),
    Case(
        "resume-other-arguments",
        (
            "cache",
            "--data",
            "{text}",
            "--tokens",
            "4k",
            "--context",
            "64",
            "--layers",
            "0-1",
            "--batch-size",
            "2",
            "--seed",
            "5",
            "--out",
            "{file}",
            "--resume",
            *CPU,
        ),
        "other arguments",
        setup=lambda tmp, a: {"file": shutil.copy(a.cache, tmp / "acts.h5")},
    ),
    Case(
        "locked-output",
        ("cache", "--data", "{text}", *SMALL, "--out", "{out}", *CPU),
        "is being written by another tc process",
        setup=locked_output("a.h5"),
    ),
    Case(
        "read-only-folder",
        ("cache", "--data", "{text}", *SMALL, "--out", "{mnt}/a.h5", *CPU),
        "Read-only file system",
        sandbox="readonly",
    ),
    Case(
        "full-disk",
        ("cache", "--data", "{text}", *SMALL, "--out", "{mnt}/a.h5", *CPU, "--quiet"),
        "not enough disk space",
        sandbox="full",
    ),
]

TRAIN = ("--tokens", "2048", "--batch-size", "256", "--expansion", "2", "--quiet")
TR = ("train", "--cache", "{cache}", "--out", "{tmp}/o")
CASES["train"] = [
    Case("missing-cache", ("train", "--cache", "{tmp}/missing.h5", "--out", "{tmp}/o"), "does not exist"),
    Case("cache-is-text", ("train", "--cache", "{text}", "--out", "{tmp}/o"), "not a readable HDF5 file"),
    Case("cache-is-folder", ("train", "--cache", "{tmp}", "--out", "{tmp}/o"), "is a folder"),
    Case(
        "cache-foreign-h5",
        ("train", "--cache", "{file}", "--out", "{tmp}/o"),
        "not a tc activation cache",
        setup=foreign_h5,
    ),
    Case(
        "cache-truncated",
        ("train", "--cache", "{bad}", "--out", "{tmp}/o"),
        "not a readable HDF5 file",
        setup=truncated("cache", keep=4000),
    ),
    Case(
        "cache-incomplete",
        ("train", "--cache", "{file}", "--out", "{tmp}/o", *TRAIN),
        "is incomplete",
        setup=incomplete_cache,
    ),
    Case("layer-not-cached", (*TR, "--layers", "3", *TRAIN), "not layer 3"),
    Case("layer-out-of-range", (*TR, "--layers", "7", *TRAIN), "layer 7 is out of range"),
    Case("lr-nan", (*TR, "--lr", "nan"), "--lr must be a finite number"),
    Case("lr-zero", (*TR, "--lr", "0"), "--lr must be a finite number"),
    Case("lr-inf", (*TR, "--lr", "inf"), "--lr must be a finite number"),
    Case("expansion-0", (*TR, "--expansion", "0"), "--expansion must be at least 1"),
    Case("features-0", (*TR, "--features", "0"), "--features must be at least 1"),
    Case("k-0", (*TR, "--k", "0"), "--k must be at least 1"),
    Case("activation-gelu", (*TR, "--activation", "gelu"), "--activation must be one of"),
    Case("kind-unknown", (*TR, "--kind", "banana"), "--kind must be one of"),
    Case("tokens-below-batch", (*TR, "--tokens", "100"), "less than one batch"),
    Case("batch-size-0", (*TR, "--batch-size", "0"), "--batch-size must be at least 1"),
    Case("lr-decay-2", (*TR, "--lr-decay", "2"), "--lr-decay"),
    Case("l1-negative", (*TR, "--l1", "-1"), "--l1 must be"),
    Case("checkpoint-every-negative", (*TR, "--checkpoint-every", "-1"), "--checkpoint-every must be >= 0"),
    Case("batch-larger-than-cache", (*TR, "--batch-size", "1M", "--tokens", "2M"), "fewer than one batch"),
    Case("resume-and-force", (*TR, "--resume", "--force"), "contradict"),
    Case(
        "out-is-a-file",
        ("train", "--cache", "{cache}", "--out", "{file}", *TRAIN),
        "is a file",
        setup=existing_output("o"),
    ),
    Case(
        "out-not-empty",
        ("train", "--cache", "{cache}", "--out", "{tmp}", *TRAIN),
        "already exists and is not empty",
        setup=existing_output("notes.txt"),
    ),
    Case(
        "resume-nothing-there",
        ("train", "--cache", "{cache}", "--out", "{tmp}", "--resume", *TRAIN),
        "holds no tc train run",
        setup=existing_output("notes.txt"),
    ),
    Case(
        "resume-changed-k",
        ("train", "--cache", "{cache}", "--out", "{file}", "--resume", *TRAIN, "--k", "5"),
        "--k is 5 but the run in --out used 4",
        setup=lambda tmp, a: {"file": shutil.copytree(a.tcs, tmp / "run")},
    ),
    Case(
        "resume-corrupt-checkpoint",
        (
            "train",
            "--cache",
            "{cache}",
            "--out",
            "{bad}",
            "--resume",
            "--tokens",
            "2048",
            "--batch-size",
            "256",
            "--expansion",
            "2",
            "--k",
            "4",
            "--warmup-steps",
            "2",
            "--quiet",
        ),
        "cannot read checkpoint",
        setup=truncated("tcs", "checkpoint.tcstate", keep=300),
    ),
    Case("diverges", (*TR, *TRAIN, "--lr", "1e30", "--warmup-steps", "0"), "no checkpoint had been written"),
    Case(
        "locked-out",
        ("train", "--cache", "{cache}", "--out", "{out}", *TRAIN),
        "is being written by another tc process",
        setup=locked_output("run", folder=True),
    ),
    Case(
        "read-only-folder",
        ("train", "--cache", "{cache}", "--out", "{mnt}/run", *TRAIN),
        "Read-only file system",
        sandbox="readonly",
    ),
    Case(
        "full-disk",
        ("train", "--cache", "{cache}", "--out", "{mnt}/run", *TRAIN),
        "No space left on device",
        sandbox="full",
    ),
]

EVAL = ("eval", "--data", "{text}", *SMALL, *CPU)
CASES["eval"] = [
    Case("no-transcoders", ("eval", "--data", "{text}"), "Missing option"),
    Case("missing-transcoders", (*EVAL, T, "{tmp}/none"), "do not exist"),
    Case("empty-folder", (*EVAL, T, "{tmp}"), "holds no transcoder folders"),
    Case("transcoders-is-text", (*EVAL, T, "{text}"), "is not a transcoder"),
    Case("bad-config-d_in", (*EVAL, T, "{bad}"), "d_in must be a positive integer", setup=bad_config(d_in="wide")),
    Case(
        "bad-config-activation", (*EVAL, T, "{bad}"), "activation must be one of", setup=bad_config(activation="gelu")
    ),
    Case("bad-config-k", (*EVAL, T, "{bad}"), "needs k, a positive integer", setup=bad_config(k=-4)),
    Case("bad-config-unknown-field", (*EVAL, T, "{bad}"), "unknown field", setup=bad_config(colour="blue")),
    Case("config-not-json", (*EVAL, T, "{bad}"), "cannot read", setup=truncated("tc0", "config.json", keep=40)),
    Case(
        "weights-truncated",
        (*EVAL, T, "{bad}"),
        "cannot read",
        setup=truncated("tc0", "transcoder.safetensors", keep=100),
    ),
    Case(
        "other-model-shape",
        ("eval", "--model", "{other_model}", "--data", "{text}", *SMALL, *CPU, T, "{tcs}"),
        "was trained on the model",
    ),
    Case(
        "context-too-long",
        ("eval", "--data", "{text}", "--tokens", "100k", "--context", "1000", *CPU, T, "{tcs}"),
        "longer than the model's maximum context",
    ),
    Case("kind-unknown", (*EVAL, T, "{tcs}", "--kind", "banana"), "--kind must be one of"),
    Case("mean-ablation-unknown", (*EVAL, T, "{tcs}", "--mean-ablation", "median"), "--mean-ablation must be"),
    Case("dense-threshold-2", (*EVAL, T, "{tcs}", "--dense-threshold", "2"), "--dense-threshold must be a fraction"),
    Case("batch-size-0", (*EVAL, T, "{tcs}", "--batch-size", "0"), "--batch-size must be at least 1"),
    Case("layer-without-transcoder", (*EVAL, T, "{tcs}", "--layers", "3"), "no transcoder for layer 3"),
    Case("missing-data", ("eval", "--data", "{tmp}/none.txt", *SMALL, *CPU, T, "{tcs}"), "does not exist"),
    Case(
        "set-for-another-model-without-model",
        (*EVAL, T, "{bad}"),
        "trained on the model gpt2, but no --model was given",
        setup=bad_config(model_name="gpt2"),
    ),
    Case(
        "gemma-scope-truncated",
        (*EVAL, T, "{bad_set}"),
        "params.npz: not a complete npz archive",
        setup=truncated_gemma_scope,
    ),
]

SCORE = ("score", "--data", "{text}", *SMALL, *CPU, T, "{tcs}")
CASES["score"] = [
    Case("out-wrong-suffix", (*SCORE, "--out", "{tmp}/f.txt"), "--out must end in .h5 or .jsonl"),
    Case("out-exists", (*SCORE, "--out", "{file}"), "already exists", setup=existing_output("f.jsonl")),
    Case("out-folder-missing", (*SCORE, "--out", "{tmp}/no/f.jsonl"), "does not exist"),
    Case(
        "out-is-the-data",
        ("score", "--data", "{file}", *SMALL, *CPU, T, "{tcs}", "--out", "{file}", "--force"),
        "would overwrite the input",
        setup=write_file("d.jsonl", '{"text": "Once upon a time."}\n'),
    ),
    Case(
        "out-inside-transcoders",
        ("score", "--data", "{text}", *SMALL, *CPU, T, "{file}", "--out", "{file}/layer_0/f.jsonl"),
        "would overwrite the input",
        setup=lambda tmp, a: {"file": shutil.copytree(a.tcs, tmp / "tcs")},
    ),
    Case("top-0", (*SCORE, "--out", "{tmp}/f.jsonl", "--top", "0"), "--top must be at least 1"),
    Case("features-into-a-file", (*SCORE, "--format", "neuronpedia-features", "--out", "{tmp}/f.h5"), "into a folder"),
    Case(
        "features-scan-outside",
        (*SCORE, "--format", "neuronpedia-features", "--scan", "/abs", "--out", "{tmp}/v/"),
        "cannot write feature files",
    ),
    Case(
        "features-scan-exists",
        (*SCORE, "--format", "neuronpedia-features", "--scan", "s", "--out", "{tmp}/v/"),
        "already exists; pass --force",
        setup=existing_output("v/features/s/0.json"),
    ),
    Case("scan-without-features", (*SCORE, "--out", "{tmp}/f.h5", "--scan", "s"), "--scan names the feature files"),
    Case("quantiles-negative", (*SCORE, "--out", "{tmp}/f.jsonl", "--quantiles", "-1"), "must not be negative"),
    Case(
        "context-too-long",
        (
            "score",
            "--data",
            "{text}",
            "--tokens",
            "100k",
            "--context",
            "300",
            *CPU,
            T,
            "{tcs}",
            "--out",
            "{tmp}/f.jsonl",
        ),
        "longer than the model's maximum context",
    ),
    Case(
        "sae-not-transcoder",
        ("score", "--data", "{text}", *SMALL, *CPU, T, "{sae}", "--out", "{tmp}/f.jsonl"),
        "scores transcoders",
    ),
    Case("layer-without-transcoder", (*SCORE, "--out", "{tmp}/f.jsonl", "--layers", "3"), "no transcoder for layer 3"),
    Case(
        "other-model",
        ("score", "--model", "{other_model}", "--data", "{text}", *SMALL, *CPU, T, "{tcs}", "--out", "{tmp}/f.jsonl"),
        "was trained on the model",
    ),
    Case(
        "binary-data",
        ("score", "--data", "{png}", *SMALL, *CPU, T, "{tcs}", "--out", "{tmp}/f.jsonl"),
        "is not UTF-8 text",
    ),
    Case(
        "locked-out",
        (*SCORE, "--out", "{out}"),
        "is being written by another tc process",
        setup=locked_output("f.jsonl"),
    ),
    Case("read-only-folder", (*SCORE, "--out", "{mnt}/f.jsonl"), "Read-only file system", sandbox="readonly"),
    Case("full-disk", (*SCORE, "--out", "{mnt}/f.jsonl"), "No space left on device", sandbox="full"),
]

CASES["show"] = [
    Case("missing-file", ("show", "{tmp}/none.jsonl", "L0.F1"), "does not exist"),
    Case("folder", ("show", "{tmp}", "L0.F1"), "is a folder"),
    Case("wrong-suffix", ("show", "{text}", "L0.F1"), "is not a features file"),
    Case(
        "jsonl-not-json",
        ("show", "{file}", "L0.F1"),
        "is not a tc features file",
        setup=write_file("f.jsonl", "garbage\n"),
    ),
    Case(
        "jsonl-other-json",
        ("show", "{file}", "L0.F1"),
        "is not a tc features file",
        setup=write_file("f.jsonl", '{"format": "something"}\n'),
    ),
    Case("h5-not-features", ("show", "{file}", "L0.F1"), "not a tc features file", setup=foreign_h5),
    Case(
        "h5-truncated",
        ("show", "{file}", "L0.F1"),
        "not a readable HDF5 file",
        setup=write_file("f.h5", b"\x89HDF\r\n\x1a\n" + b"\x00" * 64),
    ),
    Case("truncated-jsonl", ("show", "{bad}", "L1.F200"), "truncated", setup=truncated("features", keep=200_000)),
    Case("bad-feature-name", ("show", "{features}", "X9"), "bad feature name"),
    Case("feature-out-of-range", ("show", "{features}", "L0.F99999"), "no feature L0.F99999"),
    Case("layer-not-in-file", ("show", "{features}", "L7.F0"), "has no layer 7"),
    Case("nothing-to-show", ("show", "{features}"), "nothing to show"),
    Case("html-wrong-suffix", ("show", "{features}", "--html", "{tmp}/page.txt"), "--html must name an .html file"),
    Case(
        "html-exists", ("show", "{features}", "--html", "{file}"), "already exists", setup=existing_output("page.html")
    ),
    Case("html-folder-missing", ("show", "{features}", "--html", "{tmp}/no/page.html"), "does not exist"),
    Case("examples-0", ("show", "{features}", "L0.F1", "--examples", "0"), "--examples and --limit must be at least 1"),
    Case("other-model", ("show", "{features}", "L0.F1", "--model", "{tmp}/none"), "does not exist"),
    Case(
        "html-read-only",
        ("show", "{features}", "--html", "{mnt}/page.html"),
        "Read-only file system",
        sandbox="readonly",
    ),
    Case(
        "html-full-disk",
        ("show", "{features}", "--html", "{mnt}/page.html", "--limit", "200"),
        "No space left on device",
        sandbox="full",
    ),
]

PROMPT = ("--prompt", "The war lasted from the year 1735 to the year 17")
CIRCUIT = ("circuit", T, "{tcs}", *PROMPT, *CPU, "--iters", "1", "--branches", "2")
CASES["circuit"] = [
    Case("no-target", ("circuit", T, "{tcs}", *PROMPT), "give exactly one target"),
    Case(
        "two-targets", ("circuit", T, "{tcs}", *PROMPT, "--logit", "4", "--feature", "L0.F1"), "give exactly one target"
    ),
    Case("logit-diff-one-token", ("circuit", T, "{tcs}", *PROMPT, "--logit-diff", "4"), "needs exactly two tokens"),
    Case("logit-multi-token", (*CIRCUIT, "--logit", "hello"), "not one"),
    Case("feature-bad-spec", (*CIRCUIT, "--feature", "eight"), "bad feature"),
    Case("feature-out-of-range", (*CIRCUIT, "--feature", "L0.F99999"), "feature 99999 is out of range"),
    Case("feature-no-transcoder", (*CIRCUIT, "--feature", "L3.F1"), "no transcoder for layer 3"),
    Case("direction-missing", (*CIRCUIT, "--direction", "{tmp}/none.npy", "--layer", "1"), "cannot read direction"),
    Case(
        "direction-nan",
        (*CIRCUIT, "--direction", "{file}", "--layer", "1"),
        "non-finite values",
        setup=direction([float("nan")] * 128),
    ),
    Case(
        "direction-zero",
        (*CIRCUIT, "--direction", "{file}", "--layer", "1"),
        "is all zeros",
        setup=direction([0.0] * 128),
    ),
    Case(
        "direction-wrong-shape",
        (*CIRCUIT, "--direction", "{file}", "--layer", "1"),
        "the model's d_model is 128",
        setup=direction([1.0] * 7),
    ),
    Case("direction-text", (*CIRCUIT, "--direction", "{text}", "--layer", "1"), "cannot read direction"),
    Case("direction-without-layer", (*CIRCUIT, "--direction", "{file}"), "needs --layer", setup=direction([1.0] * 128)),
    Case(
        "direction-layer-out-of-range",
        (*CIRCUIT, "--direction", "{file}", "--layer", "9"),
        "out of range",
        setup=direction([1.0] * 128),
    ),
    Case("pos-out-of-range", (*CIRCUIT, "--logit", "4", "--pos", "500"), "outside the prompt"),
    Case("iters-0", ("circuit", T, "{tcs}", *PROMPT, "--logit", "4", "--iters", "0"), "must be at least 1"),
    Case("format-png", ("circuit", T, "{tcs}", *PROMPT, "--logit", "4", "--format", "png"), "--format must be one of"),
    Case("empty-prompt", ("circuit", T, "{tcs}", "--prompt", " ", "--logit", "4", *CPU), "the prompt is empty"),
    Case(
        "empty-prompt-stdin",
        ("circuit", T, "{tcs}", "--prompt", "-", "--logit", "4", *CPU),
        "the prompt is empty",
        stdin="\n",
    ),
    Case(
        "prompt-too-long",
        ("circuit", T, "{tcs}", "--prompt", "one two three " * 200, "--logit", "4", *CPU),
        "longer than the model's context",
    ),
    Case("out-exists", (*CIRCUIT, "--logit", "4", "--out", "{file}"), "already exists", setup=existing_output("g.dot")),
    Case(
        "out-inside-transcoders",
        ("circuit", T, "{file}", *PROMPT, *CPU, "--logit", "4", "--out", "{file}/layer_0/config.json", "--force"),
        "would overwrite the input",
        setup=lambda tmp, a: {"file": shutil.copytree(a.tcs, tmp / "tcs")},
    ),
    Case(
        "bad-config-d_in",
        ("circuit", T, "{bad}", *PROMPT, *CPU, "--logit", "4"),
        "d_in must be a positive integer",
        setup=bad_config(d_in="wide"),
    ),
    Case(
        "bad-config-activation",
        ("circuit", T, "{bad}", *PROMPT, *CPU, "--logit", "4"),
        "activation must be one of",
        setup=bad_config(activation="gelu"),
    ),
    Case(
        "bad-config-k",
        ("circuit", T, "{bad}", *PROMPT, *CPU, "--logit", "4"),
        "needs k, a positive integer",
        setup=bad_config(k=-4),
    ),
    Case("other-model", ("circuit", T, "{other_tcs}", *PROMPT, *CPU, "--logit", "4"), "was trained on the model"),
    Case("sae", ("circuit", T, "{sae}", *PROMPT, *CPU, "--logit", "4"), "holds an SAE"),
    Case(
        "out-read-only", (*CIRCUIT, "--logit", "4", "--out", "{mnt}/g.dot"), "Read-only file system", sandbox="readonly"
    ),
    Case(
        "out-full-disk",
        (*CIRCUIT, "--logit", "4", "--format", "json", "--out", "{mnt}/g.json"),
        "No space left on device",
        sandbox="full",
    ),
]

CASES["export"] = [
    Case("missing-graph", ("export", "{tmp}/none.json"), "does not exist"),
    Case("folder", ("export", "{tmp}"), "is a folder"),
    Case("png-as-graph", ("export", "{png}"), "is not a tc circuit graph"),
    Case("text-as-graph", ("export", "{text}"), "is not JSON"),
    Case("other-json", ("export", "{file}"), "is not a tc circuit graph", setup=write_file("g.json", '{"a": 1}')),
    Case("json-list", ("export", "{file}"), "is not a tc circuit graph", setup=write_file("g.json", "[1, 2]")),
    Case("damaged-graph", ("export", "{file}"), "damaged", setup=graph_edit(_no_kind)),
    Case(
        "graph-without-nodes",
        ("export", "{file}"),
        "damaged",
        setup=write_file("g.json", '{"format": "tc-circuit-graph", "directed": true}'),
    ),
    Case("bad-format", ("export", "{graph}", "--format", "bmp"), "--format must be one of"),
    Case(
        "out-is-input",
        ("export", "{file}", "--format", "dot", "--out", "{file}", "--force"),
        "would overwrite the input",
        setup=lambda tmp, a: {"file": shutil.copy(a.graph, tmp / "g.json")},
    ),
    Case(
        "out-is-input-other-spelling",
        ("export", "{file}", "--format", "dot", "--out", "./g.json", "--force"),
        "would overwrite the input",
        setup=lambda tmp, a: {"file": shutil.copy(a.graph, tmp / "g.json")},
    ),
    Case("out-exists", ("export", "{graph}", "--out", "{file}"), "already exists", setup=existing_output("g.dot")),
    Case("out-folder-missing", ("export", "{graph}", "--out", "{tmp}/no/g.dot"), "does not exist"),
    Case("out-read-only", ("export", "{graph}", "--out", "{mnt}/g.dot"), "Read-only file system", sandbox="readonly"),
    Case(
        "out-full-disk",
        ("export", "{graph}", "--format", "json", "--out", "{mnt}/g.json"),
        "No space left on device",
        sandbox="full",
    ),
]

CASES["view"] = [
    Case("missing-graph", ("view", "{tmp}/none.json", "--out", "{tmp}/v.html"), "does not exist"),
    Case("folder", ("view", "{tmp}", "--out", "{tmp}/v.html"), "is a folder"),
    Case("png-as-graph", ("view", "{png}", "--out", "{tmp}/v.html"), "is not a graph"),
    Case("text-as-graph", ("view", "{text}", "--out", "{tmp}/v.html"), "is not JSON"),
    Case(
        "other-json",
        ("view", "{file}", "--out", "{tmp}/v.html"),
        "is not a tc circuit graph nor a Neuronpedia graph",
        setup=write_file("g.json", '{"a": 1}'),
    ),
    Case("damaged-graph", ("view", "{file}", "--out", "{tmp}/v.html"), "damaged", setup=graph_edit(_no_kind)),
    Case("no-out", ("view", "{graph}"), "--out"),
    Case("out-not-html", ("view", "{graph}", "--out", "{tmp}/v.svg"), "--out must name an .html file"),
    Case("out-exists", ("view", "{graph}", "--out", "{file}"), "already exists", setup=existing_output("v.html")),
    Case(
        "out-is-input",
        ("view", "{file}", "--out", "{file}", "--force"),
        "would overwrite the input",
        setup=lambda tmp, a: {"file": shutil.copy(a.graph, tmp / "g.html")},
    ),
    Case(
        "features-missing", ("view", "{graph}", "--features", "{tmp}/f.h5", "--out", "{tmp}/v.html"), "does not exist"
    ),
    Case(
        "features-not-features", ("view", "{graph}", "--features", "{text}", "--out", "{tmp}/v.html"), "features file"
    ),
    Case(
        "bad-examples", ("view", "{graph}", "--examples", "0", "--out", "{tmp}/v.html"), "--examples must be at least 1"
    ),
    Case("bad-min-edge", ("view", "{graph}", "--min-edge", "-1", "--out", "{tmp}/v.html"), "--min-edge must be"),
]

SERVE = ("serve", T, "{tcs}", *CPU, "--port", "0")  # any free port: a case that got through would serve
CASES["serve"] = [  # tc serve (issue 26): every case fails before it serves
    Case("no-transcoders", ("serve",), "Missing option"),
    Case("bad-port", (*SERVE, "--port", "70000"), "--port must be in 0-65535"),
    Case("bad-queue", (*SERVE, "--queue", "0"), "--queue must be at least 1"),
    Case("bad-min-edge", (*SERVE, "--min-edge", "nan"), "--min-edge must be"),
    Case("bad-threshold", (*SERVE, "--node-threshold", "2"), "--node-threshold must be between 0 and 1"),
    Case("empty-host", (*SERVE, "--host", " "), "--host is empty"),
    Case("missing-transcoders", ("serve", T, "{tmp}/none", *CPU, "--port", "0"), "do not exist"),
    Case("sae", ("serve", T, "{sae}", *CPU, "--port", "0"), "holds an SAE"),
    Case("other-model", ("serve", T, "{other_tcs}", *CPU, "--port", "0"), "was trained on the model"),
    Case("features-missing", (*SERVE, "--features", "{tmp}/f.h5"), "does not exist"),
    Case("features-not-features", (*SERVE, "--features", "{text}"), "features file"),
]

DEEMBED = ("deembed", T, "{tcs}", *CPU)
CASES["deembed"] = [
    Case("no-feature", ("deembed", T, "{tcs}"), "Missing option"),
    Case("bad-feature", (*DEEMBED, "--feature", "zero"), "bad feature"),
    Case("feature-out-of-range", (*DEEMBED, "--feature", "L0.F99999"), "feature 99999 is out of range"),
    Case("layer-without-transcoder", (*DEEMBED, "--feature", "L2.F0"), "no transcoder for layer 2"),
    Case("bad-head", (*DEEMBED, "--feature", "L1.F0", "--head", "H"), "bad head"),
    Case("head-out-of-range", (*DEEMBED, "--feature", "L1.F0", "--head", "L0.H9"), "head 9 is out of range"),
    Case("head-downstream", (*DEEMBED, "--feature", "L0.F0", "--head", "L1.H0"), "is not upstream"),
    Case("top-0", (*DEEMBED, "--feature", "L0.F0", "--top", "0"), "--top must be at least 1"),
    Case("other-model", ("deembed", T, "{other_tcs}", *CPU, "--feature", "L0.F0"), "was trained on the model"),
    Case("missing-transcoders", ("deembed", T, "{tmp}/none", *CPU, "--feature", "L0.F0"), "do not exist"),
    Case("sae", ("deembed", T, "{sae}", *CPU, "--feature", "L0.F0"), "holds an SAE"),
    Case(
        "set-for-another-model-without-model",
        ("deembed", T, "{bad}", *CPU, "--feature", "L0.F0"),
        "was trained on the model gpt2, but no --model was given, so the built-in model would run: pass --model gpt2",
        setup=bad_config(model_name="gpt2"),
    ),
]

GT = ("greater-than", *CPU)
CASES["greater-than"] = [
    Case("layers-without-transcoders", (*GT, "--layers", "0"), "--layers given without --transcoders"),
    Case("graph-without-transcoders", (*GT, "--graph", "{graph}"), "--graph needs --transcoders"),
    Case("graph-png", (*GT, T, "{tcs}", "--graph", "{png}"), "is not a tc circuit graph"),
    Case("graph-missing", (*GT, T, "{tcs}", "--graph", "{tmp}/none.json"), "does not exist"),
    Case(
        "graph-of-other-model",
        (*GT, T, "{tcs}", "--graph", "{file}"),
        "was traced on the model",
        setup=graph_edit(_other_model),
    ),
    Case("graph-head-the-model-lacks", (*GT, T, "{tcs}", "--graph", "{file}"), "heads 0-3", setup=graph_edit(_head_99)),
    Case("top-0", (*GT, "--top", "0"), "--top must be at least 1"),
    Case("empty-noun", (*GT, "--noun", " "), "--noun must not be empty"),
    Case("layer-out-of-range", (*GT, T, "{tcs}", "--layers", "9"), "layer 9 is out of range"),
    Case("missing-transcoders", (*GT, T, "{tmp}/none"), "do not exist"),
    Case("other-model-transcoders", (*GT, T, "{other_tcs}"), "was trained on the model"),
]

CASES["info"] = [
    Case("missing", ("info", "{tmp}/none"), "does not exist"),
    Case("empty-folder", ("info", "{tmp}"), "is not something tc knows"),
    Case("text", ("info", "{text}"), "is not something tc knows"),
    Case("png", ("info", "{png}"), "is not something tc knows"),
    Case("truncated-cache", ("info", "{bad}"), "not a readable HDF5 file", setup=truncated("cache", keep=3000)),
    Case("foreign-h5", ("info", "{file}"), "not a tc activation cache", setup=foreign_h5),
    Case("truncated-weights", ("info", "{bad}"), "cannot read", setup=truncated("tc0", "transcoder.safetensors")),
    Case("bad-config", ("info", "{bad}"), "activation must be one of", setup=bad_config(activation="gelu")),
    Case("gemma-scope-truncated", ("info", "{bad}"), "not a complete npz archive", setup=truncated_gemma_scope),
    Case("circuit-tracer-gap", ("info", "{bad}"), "layer_0.safetensors does not exist", setup=circuit_tracer_gap),
    Case(
        "clt-missing-layer",
        ("info", "{bad}"),
        "W_dec_1.safetensors does not exist",
        setup=circuit_tracer_clt("missing-layer"),
    ),
    Case(
        "clt-wrong-shape",
        ("info", "{bad}"),
        "tensor W_dec_0 has shape (6, 3, 4), expected (6, 2, 4)",
        setup=circuit_tracer_clt("wrong-shape"),
    ),
    Case(
        "clt-unknown-activation",
        ("info", "{bad}"),
        "activation 'gelu' is not one a circuit-tracer cross-layer transcoder has",
        setup=circuit_tracer_clt("unknown-activation"),
    ),
]

CONVERT = ("convert", "--to", "saelens")
CASES["convert"] = [
    Case("missing-input", (*CONVERT, "--input", "{tmp}/none", "--out", "{tmp}/o"), "do not exist"),
    Case("bad-format", ("convert", "--input", "{tcs}", "--out", "{tmp}/o", "--to", "pt"), "--to must be one of"),
    Case(
        "out-not-empty",
        (*CONVERT, "--input", "{tcs}", "--out", "{tmp}"),
        "already exists",
        setup=existing_output("notes.txt"),
    ),
    Case(
        "out-is-input",
        (*CONVERT, "--input", "{file}", "--out", "{file}"),
        "would overwrite the input",
        setup=lambda tmp, a: {"file": shutil.copytree(a.tcs, tmp / "tcs")},
    ),
    Case(
        "out-inside-input",
        (*CONVERT, "--input", "{file}", "--out", "{file}/sub"),
        "would overwrite the input",
        setup=lambda tmp, a: {"file": shutil.copytree(a.tcs, tmp / "tcs")},
    ),
    Case(
        "bad-config-d_in",
        (*CONVERT, "--input", "{bad}", "--out", "{tmp}/o"),
        "d_in must be a positive integer",
        setup=bad_config(d_in="wide"),
    ),
    Case(
        "bad-config-activation",
        (*CONVERT, "--input", "{bad}", "--out", "{tmp}/o"),
        "activation must be one of",
        setup=bad_config(activation="gelu"),
    ),
    Case(
        "bad-config-k",
        (*CONVERT, "--input", "{bad}", "--out", "{tmp}/o"),
        "needs k, a positive integer",
        setup=bad_config(k=-4),
    ),
    Case(
        "saelens-d_in",
        (*CONVERT, "--input", "{bad}", "--out", "{tmp}/o"),
        "d_in must be a positive integer",
        setup=bad_saelens(d_in="wide"),
    ),
    Case(
        "saelens-activation",
        (*CONVERT, "--input", "{bad}", "--out", "{tmp}/o"),
        "is not supported",
        setup=bad_saelens(architecture="standard", activation_fn="gelu"),
    ),
    Case(
        "saelens-k", (*CONVERT, "--input", "{bad}", "--out", "{tmp}/o"), "positive integer k", setup=bad_saelens(k=-4)
    ),
    Case(
        "saelens-tc-config",
        (*CONVERT, "--input", "{bad}", "--out", "{tmp}/o"),
        "d_in must be a positive integer",
        setup=lambda tmp, a: _saelens_tc_config(tmp, a, d_in="wide"),
    ),
    Case(
        "peek-act-fn",
        (*CONVERT, "--input", "{bad}", "--out", "{tmp}/o"),
        "act_fn 'id' is not supported",
        setup=bad_peek("sae.json", act_fn="id"),
    ),
    Case(
        "peek-dtype",
        (*CONVERT, "--input", "{bad}", "--out", "{tmp}/o"),
        "is not a floating-point type",
        setup=bad_peek("sae.json", dtype="torch.int64"),
    ),
    Case(
        "peek-num-features",
        (*CONVERT, "--input", "{bad}", "--out", "{tmp}/o"),
        "num_features must be a positive",
        setup=bad_peek("sae.json", num_features=0),
    ),
    Case(
        "peek-sublayer",
        (*CONVERT, "--input", "{bad}", "--out", "{tmp}/o"),
        "sublayer 'attn_out' is not supported",
        setup=bad_peek("sae_info.json", input_layer={"layer": 0, "sublayer": "attn_out"}),
    ),
    Case(
        "peek-no-info",
        (*CONVERT, "--input", "{bad}", "--out", "{tmp}/o"),
        "needs sae_info.json",
        setup=bad_peek("sae_info.json"),
    ),
    Case("malicious-pt", (*CONVERT, "--input", "{file}", "--out", "{tmp}/o"), "refusing to load", setup=malicious_pt),
    Case(
        "pt-not-torch",
        (*CONVERT, "--input", "{file}", "--out", "{tmp}/o"),
        "is not a torch.save file",
        setup=write_file("x.pt", "not a torch file"),
    ),
    Case(
        "gemma-scope-truncated",
        (*CONVERT, "--input", "{bad}", "--out", "{tmp}/o"),
        "params.npz: not a complete npz archive",
        setup=truncated_gemma_scope,
    ),
    Case(
        "circuit-tracer-gap",
        (*CONVERT, "--input", "{bad}", "--out", "{tmp}/o"),
        "a circuit-tracer set needs a transcoder for every layer from 0 to 1",
        setup=circuit_tracer_gap,
    ),
    Case(
        "clt-missing-layer",
        ("convert", "--to", "tc", "--input", "{bad}", "--out", "{tmp}/o"),
        "W_dec_1.safetensors does not exist",
        setup=circuit_tracer_clt("missing-layer"),
    ),
    Case(
        "clt-wrong-shape",
        ("convert", "--to", "tc", "--input", "{bad}", "--out", "{tmp}/o"),
        "expected (6, 2, 4)",
        setup=circuit_tracer_clt("wrong-shape"),
    ),
    Case(
        "clt-to-saelens",
        (*CONVERT, "--input", "{bad}", "--out", "{tmp}/o"),
        "is a cross-layer transcoder: it converts to tc or circuit-tracer only",
        setup=circuit_tracer_clt("none"),
    ),
    Case(
        "out-read-only", (*CONVERT, "--input", "{tcs}", "--out", "{mnt}/o"), "Read-only file system", sandbox="readonly"
    ),
    Case(
        "out-full-disk", (*CONVERT, "--input", "{tcs}", "--out", "{mnt}/o"), "No space left on device", sandbox="full"
    ),
]


GRAPH = ("graph", T, "{tcs}", *PROMPT, *CPU)
CASES["graph"] = [  # tc graph (issue 13): whoever extends the command extends this list
    Case("two-targets", (*GRAPH, "--logit", "4", "--feature", "L0.F1"), "give at most one target"),
    Case("missing-transcoders", ("graph", T, "{tmp}/none", *PROMPT, *CPU), "do not exist"),
    Case("feature-no-transcoder", (*GRAPH, "--feature", "L3.F1"), "no transcoder for layer 3"),
    Case("out-exists", (*GRAPH, "--out", "{file}"), "already exists", setup=existing_output("g.json")),
    Case(
        "out-inside-transcoders",
        ("graph", T, "{file}", *PROMPT, *CPU, "--out", "{file}/layer_0/g.json", "--force"),
        "would overwrite the input",
        setup=lambda tmp, a: {"file": shutil.copytree(a.tcs, tmp / "tcs")},
    ),
    Case("other-model", ("graph", T, "{other_tcs}", *PROMPT, *CPU), "was trained on the model"),
    Case("out-read-only", (*GRAPH, "--out", "{mnt}/g.json", "--quiet"), "Read-only file system", sandbox="readonly"),
    Case("out-full-disk", (*GRAPH, "--out", "{mnt}/g.json", "--quiet"), "No space left on device", sandbox="full"),
    Case(
        "locked-out",
        (*GRAPH, "--out", "{out}"),
        "is being written by another tc process",
        setup=locked_output("g.json"),
    ),
    Case("empty-prompt", ("graph", T, "{tcs}", "--prompt", " ", *CPU), "the prompt is empty"),
    Case(
        "prompt-too-long",
        ("graph", T, "{tcs}", "--prompt", "one two three " * 200, *CPU),
        "longer than the model's context",
    ),
    Case("sae", ("graph", T, "{sae}", *PROMPT, *CPU), "holds an SAE"),
    Case("bad-format", (*GRAPH, "--format", "bmp"), "--format must be one of"),
    Case("node-threshold-2", (*GRAPH, "--node-threshold", "2"), "--node-threshold must be between 0 and 1"),
    Case("target-unknown", (*GRAPH, "--target", "words"), "--target must be 'logits'"),
    Case("batch-size-0", (*GRAPH, "--batch-size", "0"), "--batch-size must be at least 1"),
    Case(
        "direction-nan",
        (*GRAPH, "--direction", "{file}", "--layer", "1"),
        "non-finite values",
        setup=direction([float("nan")] * 128),
    ),
    Case("logit-multi-token", (*GRAPH, "--logit", "hello"), "not one"),
    Case("pos-outside", (*GRAPH, "--pos", "99"), "outside the prompt"),
    Case("folder-needs-neuronpedia", (*GRAPH, "--out", "{tmp}/viewer/"), "only --format neuronpedia"),
    Case(
        "folder-list-unreadable",
        (*GRAPH, "--format", "neuronpedia", "--out", "{tmp}/"),
        "graph-metadata.json",
        setup=write_file("graph-metadata.json", '{"graphs": "no"}'),
    ),
    Case(
        "folder-graph-exists",
        (*GRAPH, "--format", "neuronpedia", "--slug", "g", "--out", "{tmp}/"),
        "already exists",
        setup=existing_output("g.json"),
    ),
    Case("slug-path", (*GRAPH, "--slug", "../g"), "--slug must be"),
    Case("scan-space", (*GRAPH, "--scan", "a b"), "--scan must be"),
]

CASES["plot"] = [  # tc plot (issue 12)
    Case("what-unknown", ("plot", "bars", "{text}", "-o", "{tmp}/p.svg"), "the first argument must be one of"),
    Case("no-files", ("plot", "pareto", "-o", "{tmp}/p.svg"), "give at least one file"),
    Case(
        "out-suffix",
        ("plot", "training", "{file}", "-o", "{tmp}/p.txt"),
        "the suffix must be one of",
        setup=lambda tmp, a: {"file": a.tcs / "train_log.jsonl"},
    ),
    Case(
        "out-exists",
        ("plot", "training", "{log}", "-o", "{file}"),
        "already exists",
        setup=lambda tmp, a: {**existing_output("p.svg")(tmp, a), "log": a.tcs / "train_log.jsonl"},
    ),
    Case(
        "out-is-input",
        ("plot", "training", "{file}", "-o", "{file}", "--force"),
        "would overwrite the input",
        setup=lambda tmp, a: {"file": shutil.copy(a.tcs / "train_log.jsonl", tmp / "log.svg")},
    ),
    Case("pareto-png", ("plot", "pareto", "{png}", "-o", "{tmp}/p.svg"), "cannot read"),
    Case("training-png", ("plot", "training", "{png}", "-o", "{tmp}/p.svg"), "cannot read"),
    Case("pareto-not-eval", ("plot", "pareto", "{graph}", "-o", "{tmp}/p.svg"), "is not the output of `tc eval"),
    Case(
        "out-read-only",
        ("plot", "training", "{log}", "-o", "{mnt}/p.svg"),
        "Read-only file system",
        setup=lambda tmp, a: {"log": a.tcs / "train_log.jsonl"},
        sandbox="readonly",
    ),
    Case("input-missing", ("plot", "training", "{tmp}/none.jsonl", "-o", "{tmp}/p.svg"), "does not exist"),
]


IV = ("intervene", T, "{tcs}", *PROMPT, *CPU)
CASES["intervene"] = [  # tc intervene (issue 14): prints to stdout, writes no file
    Case("no-prompt", ("intervene", T, "{tcs}"), "Missing option"),
    Case("missing-transcoders", ("intervene", T, "{tmp}/none", *PROMPT, *CPU), "do not exist"),
    Case("transcoders-is-text", ("intervene", T, "{text}", *PROMPT, *CPU), "is not a transcoder"),
    Case(
        "bad-config-activation",
        ("intervene", T, "{bad}", *PROMPT, *CPU),
        "activation must be one of",
        setup=bad_config(activation="gelu"),
    ),
    Case(
        "bad-config-k", ("intervene", T, "{bad}", *PROMPT, *CPU), "needs k, a positive integer", setup=bad_config(k=-4)
    ),
    Case("other-model", ("intervene", T, "{other_tcs}", *PROMPT, *CPU), "was trained on the model"),
    Case("sae", ("intervene", T, "{sae}", *PROMPT, *CPU, "--ablate", "mlp0.f1@3"), "holds an SAE"),
    Case("node-garbage", (*IV, "--ablate", "garbage"), "bad node 'garbage'"),
    Case("node-layer-out-of-range", (*IV, "--ablate", "mlp9.f1@3"), "layer 9 is out of range"),
    Case("node-no-transcoder", (*IV, "--ablate", "mlp3.f1@3"), "no transcoder for layer 3"),
    Case("node-feature-out-of-range", (*IV, "--ablate", "mlp0.f99999@3"), "feature 99999 is out of range"),
    Case("node-head-out-of-range", (*IV, "--ablate", "attn0.h9@3"), "head 9 is out of range"),
    Case("node-position-outside", (*IV, "--ablate", "mlp0.f1@300"), "outside the prompt"),
    Case("set-without-value", (*IV, "--set", "mlp0.f1@3"), "bad --set"),
    Case("set-nan", (*IV, "--set", "mlp0.f1@3=nan"), "bad --set"),
    Case("scale-inf", (*IV, "--scale", "mlp0.f1@3=inf"), "bad --scale"),
    Case("scale-not-a-number", (*IV, "--scale", "mlp0.f1@3=abc"), "bad --scale"),
    Case("mode-unknown", (*IV, "--mode", "weird"), "--mode must be one of"),
    Case("top-0", (*IV, "--top", "0"), "--top must be at least 1"),
    Case("empty-prompt", ("intervene", T, "{tcs}", "--prompt", " ", *CPU), "the prompt is empty"),
    Case(
        "prompt-too-long",
        ("intervene", T, "{tcs}", "--prompt", "one two three " * 200, *CPU),
        "longer than the model's context",
    ),
    Case("logit-multi-token", (*IV, "--logit", "hello"), "not one"),
    Case("logit-diff-one-token", (*IV, "--logit-diff", "4"), "needs exactly two tokens"),
    Case("pos-outside", (*IV, "--logit", "4", "--pos", "99"), "outside the prompt"),
    Case(
        "direction-nan",
        (*IV, "--direction", "{file}", "--layer", "1"),
        "non-finite values",
        setup=direction([float("nan")] * 128),
    ),
    Case(
        "direction-wrong-shape",
        (*IV, "--direction", "{file}", "--layer", "1"),
        "the model's d_model is 128",
        setup=direction([1.0] * 7),
    ),
    Case("mean-without-features", (*IV, "--ablation", "mean"), "--ablation mean needs --features"),
    Case("ablation-unknown", (*IV, "--ablation", "median"), "--ablation must be one of"),
    Case("features-png", (*IV, "--ablation", "mean", "--features", "{png}"), "is not a features file"),
    Case("features-missing", (*IV, "--ablation", "mean", "--features", "{tmp}/none.jsonl"), "does not exist"),
]

VALIDATE = ("validate", "{graph}", *CPU, "--random", "1")
CASES["validate"] = [  # tc validate (issue 14)
    Case("missing-graph", ("validate", "{tmp}/none.json"), "does not exist"),
    Case("graph-folder", ("validate", "{tmp}"), "is a folder"),
    Case("graph-png", ("validate", "{png}"), "is not a tc circuit graph"),
    Case("graph-text", ("validate", "{text}"), "is not JSON"),
    Case(
        "graph-other-json", ("validate", "{file}"), "is not a tc circuit graph", setup=write_file("g.json", '{"a": 1}')
    ),
    Case("graph-damaged", ("validate", "{file}", *CPU), "damaged", setup=graph_edit(_no_kind)),
    Case(
        "graph-of-other-model",
        ("validate", "{file}", *CPU, "--model", "{other_model}"),
        "was trained on the model",
        setup=lambda tmp, a: {"file": a.graph},
    ),
    Case("transcoders-missing", (*VALIDATE, T, "{tmp}/none"), "are not here"),
    Case("transcoders-of-other-model", (*VALIDATE, T, "{other_tcs}"), "was trained on the model"),
    Case("model-missing", (*VALIDATE, "--model", "{tmp}/none"), "does not exist"),
    Case("mode-unknown", (*VALIDATE, "--mode", "direct"), "--mode must be one of"),
    Case("task-unknown", (*VALIDATE, "--task", "less-than"), "--task must be one of"),
    Case("task-and-prompts", (*VALIDATE, "--task", "greater-than", "--prompts", "{text}"), "not both"),
    Case("random-negative", (*VALIDATE, "--random", "-1"), "--random must be at least 0"),
    Case("top-0", (*VALIDATE, "--top", "0"), "--top must be at least 1"),
    Case("batch-size-0", (*VALIDATE, "--batch-size", "0"), "--batch-size must be at least 1"),
    Case("prompts-missing", (*VALIDATE, "--prompts", "{tmp}/none.txt"), "does not exist"),
    Case("prompts-empty", (*VALIDATE, "--prompts", "{file}"), "holds no prompts", setup=write_file("p.txt", "\n \n")),
    Case("prompts-binary", (*VALIDATE, "--prompts", "{png}"), "is not UTF-8 text"),
    Case("mean-without-features", (*VALIDATE, "--ablation", "mean"), "--ablation mean needs --features"),
    Case("features-png", (*VALIDATE, "--ablation", "mean", "--features", "{png}"), "is not a features file"),
    Case(
        "out-is-the-graph",
        ("validate", "{file}", *CPU, "--out", "{file}", "--force"),
        "is the graph being read",
        setup=lambda tmp, a: {"file": shutil.copy(a.graph, tmp / "g.json")},
    ),
    Case(
        "out-is-the-graph-other-spelling",
        ("validate", "{file}", *CPU, "--out", "./g.json", "--force"),
        "is the graph being read",
        setup=lambda tmp, a: {"file": shutil.copy(a.graph, tmp / "g.json")},
    ),
    Case(
        "out-inside-transcoders",
        (*VALIDATE, T, "{file}", "--out", "{file}/layer_0/config.json", "--force"),
        "would overwrite the input",
        setup=lambda tmp, a: {"file": shutil.copytree(a.tcs, tmp / "tcs")},
    ),
    Case("out-exists", (*VALIDATE, "--out", "{file}"), "exists; pass --force", setup=existing_output("v.json")),
    Case("out-folder-missing", (*VALIDATE, "--out", "{tmp}/no/v.json"), "does not exist"),
    Case("out-is-a-folder", (*VALIDATE, "--out", "{tmp}", "--force"), "is a folder"),
    Case(
        "locked-out",
        (*VALIDATE, "--out", "{out}"),
        "is being written by another tc process",
        setup=locked_output("v.json"),
    ),
    Case("out-read-only", (*VALIDATE, "--out", "{mnt}/v.json"), "Read-only file system", sandbox="readonly"),
    Case("out-full-disk", (*VALIDATE, "--out", "{mnt}/v.json"), "No space left on device", sandbox="full"),
]


def _saelens_tc_config(tmp: Path, a, **changes) -> dict:
    folder = tmp / "bad_sae"
    shutil.copytree(a.saelens / "layer_0", folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["tc_config"].update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return {"bad": folder}


for _cases in CASES.values():  # every full-disk case also runs where no namespace can mount a tmpfs
    _cases += [battery.fsize_twin(case) for case in _cases if case.sandbox == "full"]

ALL_CASES = [(f"{command}-{case.id}", case) for command, cases in CASES.items() for case in cases]

# ============================================================================ fixtures


@pytest.fixture(scope="session")
def runner(request, artefacts, tmp_path_factory):
    """Submits every selected case at once, so they run a few at a time while the tests wait in order."""
    runner = battery.Runner(
        artefacts,
        lambda key: tmp_path_factory.mktemp(key.replace("/", "_")[:60]),
        workers=max(2, min(4, os.cpu_count() or 2)),
        real_processes=request.config.getoption("--real-processes"),
    )
    selected = [
        item.callspec.id
        for item in request.session.items
        if item.originalname == "test_bad_input" and hasattr(item, "callspec")
    ]
    by_key = dict(ALL_CASES)
    for key in selected:
        case = by_key[key]
        if not _needs_namespaces(case) or battery.sandbox_available():
            runner.submit(key, case)
    yield runner
    runner.close()
    for holder, _, _ in HOLDERS:
        holder.kill()
        holder.wait()


# ============================================================================ the battery


def _needs_namespaces(case: Case) -> bool:
    return case.sandbox in ("readonly", "full")


# Sandboxed cases need a real process (a mount namespace, a file size limit): make test-all runs them.
@pytest.mark.parametrize(
    "case",
    [pytest.param(case, id=key, marks=[pytest.mark.process] if case.sandbox else []) for key, case in ALL_CASES],
)
def test_bad_input(case: Case, request, runner, artefacts):
    if _needs_namespaces(case) and not battery.sandbox_available():
        pytest.skip("no user/mount namespaces here (unshare -rm): cannot make a read-only or full filesystem")
    outcome = runner.outcome(request.node.callspec.id, case)
    result = outcome.result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == case.exit_code, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tc: error: ") and "internal error" not in lines[0], lines[0]
    assert case.message in lines[0], lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert battery.digest_tree(artefacts.root) == artefacts.digests, "a shared input was changed"
    held = {str(target.relative_to(outcome.tmp)) for _, target, _ in HOLDERS if target.is_relative_to(outcome.tmp)}
    after = battery.digest_tree(outcome.tmp)  # the case's own inputs and existing outputs: all still there, unchanged
    assert {name: after.get(name) for name in outcome.before if name not in held} == {
        name: digest for name, digest in outcome.before.items() if name not in held
    }
    assert [name for name in battery.debris(outcome.tmp) if name not in held] == []  # the other writer's lock stays
    assert battery.debris(artefacts.root) == []
    if outcome.sandbox_listing is not None:
        assert not [name for name in outcome.sandbox_listing if name.endswith(battery.DEBRIS_SUFFIXES)]
    assert not (outcome.tmp / "pwned").exists()  # the malicious pickle ran nothing


def test_the_battery_is_big_enough():
    assert len(ALL_CASES) >= 150
    assert len({key for key, _ in ALL_CASES}) == len(ALL_CASES)  # every id unique


# ============================================================================ interruptions and concurrent runs


def _start(*args: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TC_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "tccli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=env,
    )


def _wait_until(condition, timeout: float = 300, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _committed_units(progress: Path) -> int:
    try:
        return len(json.loads(progress.read_text())["units"])
    except (OSError, ValueError, KeyError):
        return 0


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.process
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["INT", "TERM", "KILL"])
@pytest.mark.parametrize("moment", ["starting", "writing"])
def test_cache_interrupted_then_resumed_equals_an_uninterrupted_run(artefacts, tmp_path, signum, moment):
    from cache_helpers import file_content

    out = tmp_path / "acts.h5"
    args = battery.cache_args(artefacts, out)
    proc = _start(*args, "--commit-every", "4", "--quiet", cwd=tmp_path)
    if moment == "starting":  # loading the model and reading the text: nothing on disk yet
        time.sleep(1.0)
    else:
        _wait_until(
            lambda: _committed_units(Path(f"{out}.progress")) >= 1 or proc.poll() is not None,
            what="a first committed unit",
        )
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived (a very fast machine)")
    if signum == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + signum, stderr
        assert _one_line(stderr) == "tc: interrupted; resume with --resume"
        assert battery.debris(tmp_path) == []
    result = battery.run_tc(*args, "--resume", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert file_content(out) == file_content(artefacts.cache)
    assert battery.debris(tmp_path) == [] and not Path(f"{out}.progress").exists()


@pytest.mark.process
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_train_interrupted_keeps_a_checkpoint_and_resumes(artefacts, tmp_path, signum):
    out = tmp_path / "run"
    args = (
        "train",
        "--cache",
        str(artefacts.cache),
        "--out",
        str(out),
        "--tokens",
        "200k",
        "--batch-size",
        "64",
        "--expansion",
        "2",
        "--log-every",
        "1",
        "--checkpoint-every",
        "0",
        "--quiet",
    )
    proc = _start(*args, cwd=tmp_path)
    _wait_until(
        lambda: (out / "train_log.jsonl").exists() and (out / "train_log.jsonl").stat().st_size > 0,
        what="the first logged step",
    )
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, stderr
    line = _one_line(stderr)
    match = re.fullmatch(
        r"tc: interrupted; stopped at step (\d+) of 3125 with a checkpoint; resume with --resume", line
    )
    assert match, line
    import torch

    assert torch.load(out / "checkpoint.tcstate", weights_only=True)["step"] == int(match.group(1))
    assert battery.debris(tmp_path) == [] and not (out / "layer_0").exists()
    resumed = _start(*args[:-1], "--tokens", "4k", "--resume", "--quiet", cwd=tmp_path)  # other --tokens: refused
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 2 and "--tokens is 4000 but the run in --out used 200000" in _one_line(stderr)


@pytest.mark.process
def test_train_killed_before_anything_was_saved_resumes_from_step_0(artefacts, tmp_path):
    out = tmp_path / "run"
    args = (
        "train",
        "--cache",
        str(artefacts.cache),
        "--out",
        str(out),
        "--tokens",
        "2048",
        "--batch-size",
        "256",
        "--expansion",
        "2",
        "--k",
        "4",
        "--warmup-steps",
        "2",
        "--quiet",
    )
    proc = _start(*args, cwd=tmp_path)
    _wait_until(lambda: (out / "train_config.json").exists() or proc.poll() is not None, what="the run's config")
    proc.kill()
    proc.wait()
    result = battery.run_tc(*args, "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for layer in (0, 1):  # the same transcoders as the shared, uninterrupted run of these arguments
        for name in ("config.json", "transcoder.safetensors"):
            ours = json.loads((out / f"layer_{layer}" / name).read_text()) if name.endswith("json") else None
            if ours is None:
                assert (out / f"layer_{layer}" / name).read_bytes() == (
                    artefacts.tcs / f"layer_{layer}" / name
                ).read_bytes()
            else:
                theirs = json.loads((artefacts.tcs / f"layer_{layer}" / name).read_text())
                ours["training"].pop("cache"), ours["training"].pop("out")
                theirs["training"].pop("cache"), theirs["training"].pop("out")
                assert ours == theirs
    assert battery.debris(tmp_path) == []


@pytest.mark.process
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
@pytest.mark.parametrize("command", ["score", "circuit", "eval", "graph", "validate"])
def test_commands_without_resume_say_nothing_was_written(artefacts, tmp_path, signum, command):
    out = tmp_path / ("f.jsonl" if command == "score" else "g.json")
    args = {
        "score": (
            "score",
            "--data",
            str(artefacts.text),
            "--tokens",
            "400k",
            "--context",
            "64",
            "--device",
            "cpu",
            "--transcoders",
            str(artefacts.tcs),
            "--batch-size",
            "1",
            "--out",
            str(out),
        ),
        "circuit": (
            "circuit",
            "--transcoders",
            str(artefacts.tcs),
            "--prompt",
            "one two three " * 18,
            "--logit",
            "4",
            "--device",
            "cpu",
            "--iters",
            "200",
            "--branches",
            "200",
            "--format",
            "json",
            "--out",
            str(out),
        ),
        "eval": (
            "eval",
            "--data",
            str(artefacts.text),
            "--tokens",
            "400k",
            "--context",
            "64",
            "--device",
            "cpu",
            "--transcoders",
            str(artefacts.tcs),
            "--batch-size",
            "1",
        ),
        "graph": (
            "graph",
            "--transcoders",
            str(artefacts.tcs),
            "--prompt",
            "one two three " * 18,
            "--device",
            "cpu",
            "--batch-size",
            "1",
            "--out",
            str(out),
        ),
        "validate": (
            "validate",
            str(artefacts.graph),
            "--task",
            "greater-than",
            "--device",
            "cpu",
            "--batch-size",
            "1",
            "--out",
            str(out),
        ),
    }[command]
    proc = _start(*args, cwd=tmp_path)
    if command == "eval":
        time.sleep(4.0)
    else:
        _wait_until(lambda: Path(f"{out}.lock").exists() or proc.poll() is not None, what="the output's lock")
        time.sleep(3.0)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, stderr
    assert _one_line(stderr) == "tc: interrupted; nothing was written" and stdout == ""
    assert not out.exists() and battery.debris(tmp_path) == []


@pytest.mark.process
def test_score_killed_then_run_again_leaves_nothing_behind(artefacts, tmp_path):
    """SIGKILL cannot be caught: the kill leaves the lock file (and, mid-rename, a temporary file); the next
    run of the same output takes the lock, removes both and writes the output."""
    out = tmp_path / "f.jsonl"

    def score(tokens: str, *more: str) -> tuple[str, ...]:
        return (
            "score",
            "--data",
            str(artefacts.text),
            "--tokens",
            tokens,
            "--context",
            "64",
            "--device",
            "cpu",
            "--transcoders",
            str(artefacts.tcs),
            "--top",
            "4",
            "--out",
            str(out),
            "--quiet",
            *more,
        )

    proc = _start(*score("400k", "--batch-size", "1"), cwd=tmp_path)
    _wait_until(lambda: Path(f"{out}.lock").exists() or proc.poll() is not None, what="the output's lock")
    time.sleep(2.0)
    proc.kill()
    proc.wait()
    assert not out.exists()
    (tmp_path / f"{out.name}.{proc.pid}.tmp").write_text("half a file")  # as a kill inside the rename would
    result = battery.run_tc(*score("1k"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(out.read_text().splitlines()) == len(artefacts.features.read_text().splitlines())
    assert battery.debris(tmp_path) == []


@pytest.mark.process
def test_two_trains_of_one_folder_at_once_then_ctrl_c(artefacts, tmp_path):
    """A second `tc train --out` of a folder in use gets one line and exit 2 without touching it; the
    first, interrupted, keeps a checkpoint its --resume continues from."""
    out = tmp_path / "run"
    args = (
        "train",
        "--cache",
        str(artefacts.cache),
        "--out",
        str(out),
        "--tokens",
        "200k",
        "--batch-size",
        "64",
        "--expansion",
        "2",
        "--log-every",
        "1",
        "--checkpoint-every",
        "0",
        "--quiet",
    )
    first = _start(*args, cwd=tmp_path)
    _wait_until(
        lambda: (out / "train_log.jsonl").exists() and (out / "train_log.jsonl").stat().st_size > 0,
        what="the first logged step",
    )
    before = {p.name for p in out.iterdir()}
    second = battery.run_tc(*args, cwd=tmp_path)
    assert second.returncode == 2 and "is being written by another tc process" in _one_line(second.stderr)
    forced = battery.run_tc(*args, "--force", cwd=tmp_path)  # --force does not take a folder in use either
    assert forced.returncode == 2 and "is being written by another tc process" in _one_line(forced.stderr)
    assert {p.name for p in out.iterdir()} >= before
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 130 and "with a checkpoint; resume with --resume" in _one_line(stderr)
    assert (out / "checkpoint.tcstate").exists() and battery.debris(tmp_path) == []


@pytest.mark.process
def test_two_caches_of_one_output_at_once(artefacts, tmp_path):
    out = tmp_path / "acts.h5"
    first = _start(*battery.cache_args(artefacts, out), "--quiet", cwd=tmp_path)
    _wait_until(lambda: Path(f"{out}.lock").exists() or first.poll() is not None, what="the first run's lock")
    second = battery.run_tc(*battery.cache_args(artefacts, out), "--quiet", cwd=tmp_path)
    assert second.returncode == 2, second.stderr
    assert "is being written by another tc process" in _one_line(second.stderr)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    from cache_helpers import file_content

    assert file_content(out) == file_content(artefacts.cache) and battery.debris(tmp_path) == []


@pytest.mark.process
@pytest.mark.skipif(not battery.sandbox_available(), reason="no user/mount namespaces (unshare -rm)")
def test_cache_meeting_a_full_disk_keeps_its_committed_rows_and_resumes(artefacts, tmp_path):
    """The disk fills while the cache is being written (another program takes the space): one line, the
    rows committed are kept, and --resume after space is freed completes the same file."""
    from cache_helpers import file_content

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = mnt / "acts.h5"
    script = tmp_path / "fill.sh"
    args = " ".join(f"'{a}'" for a in battery.cache_args(artefacts, out))
    script.write_text(f"""
set -u
mount -t tmpfs -o size=6m tmpfs {mnt}
{sys.executable} -m tccli {args} --commit-every 4 --quiet 2> {tmp_path}/first.err &
pid=$!
python_units() {{
  {sys.executable} -c "import json,sys; print(len(json.load(open(sys.argv[1]))['units']))" "$1" 2>/dev/null || echo 0
}}
while [ "$(python_units {out}.progress)" -lt 1 ] && kill -0 $pid 2>/dev/null; do sleep 0.05; done
dd if=/dev/zero of={mnt}/ballast bs=64k 2>/dev/null
wait $pid; echo $? > {tmp_path}/first.rc
ls -A {mnt} > {tmp_path}/after-failure.txt
rm {mnt}/ballast
{sys.executable} -m tccli {args} --resume --quiet 2> {tmp_path}/second.err; echo $? > {tmp_path}/second.rc
ls -A {mnt} > {tmp_path}/after-resume.txt
cp {out} {tmp_path}/resumed.h5
""")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(["unshare", "-rm", "sh", str(script)], check=True, timeout=900, env=env)
    first_rc = int((tmp_path / "first.rc").read_text())
    line = _one_line((tmp_path / "first.err").read_text())
    if first_rc == 0:
        pytest.skip("the cache finished before the ballast filled the disk")
    assert first_rc == 2 and "No space left on device" in line and "run again with --resume" in line, line
    left = (tmp_path / "after-failure.txt").read_text().split()
    assert (
        "acts.h5" in left
        and "acts.h5.progress" in left
        and not [n for n in left if n.endswith(battery.DEBRIS_SUFFIXES)]
    ), left
    assert int((tmp_path / "second.rc").read_text()) == 0, (tmp_path / "second.err").read_text()
    assert (tmp_path / "after-resume.txt").read_text().split() == ["acts.h5"]
    assert file_content(tmp_path / "resumed.h5") == file_content(artefacts.cache)
