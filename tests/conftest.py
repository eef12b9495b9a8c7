"""Shared fixtures: tiny random models of the three architectures, and the real stories260K.

Tiny models are random HuggingFace configs saved to a temp folder with a byte-level BPE tokenizer
trained here on a few sentences, so nothing is downloaded. They are built once per test session, and so are
what tests share on top of them: the models loaded (tiny_models, builtin_model) and random transcoder sets
saved (random_transcoder_folder). Tests only read these shared objects: they run and hook a loaded model for
one call, never change its weights or settings, and never write into a shared folder.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
CORPORA = SHARED / "corpora"

ARCHITECTURES = ("gpt2", "neox", "llama")
# Built on demand (fixture modern_model_dirs), not in the default parametrisation every test runs over:
# Gemma-2 (post-norms, (1 + w) RMSNorm, soft-capping, sliding windows, scaled embeddings), Qwen3
# (RMSNorm on queries and keys, grouped-query attention) and Gemma 3's text model (Gemma-2's post-norms
# and scaled embeddings, RMSNorm on queries and keys, no soft-capping, sliding and full attention layers
# with their own RoPE bases).
MODERN_ARCHITECTURES = ("gemma2", "qwen3", "gemma3")

TOKENIZER_TEXT = [
    "The war lasted from 1735 to 1789. The cat sat on the mat.",
    "Once upon a time there was a little girl named Lily. She liked to play outside.",
    "One, two, three, four, five. 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "In the beginning was the word, and the word was with the model.",
]


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TOKENIZER_TEXT * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    return fast


def build_tiny_model(arch: str, folder: Path, n_layers: int = 2, d_model: int = 32, seed: int = 0) -> Path:
    """A random model of ``arch`` ('gpt2', 'neox', 'llama', 'gemma2', 'qwen3', 'gemma3') saved as a HuggingFace
    folder."""
    from transformers import (
        AutoModelForCausalLM,
        Gemma2Config,
        Gemma3TextConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        Qwen3Config,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    vocab = len(tokenizer)
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_positions=128,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
        )
    elif arch == "neox":
        config = GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            intermediate_size=4 * d_model,
            max_position_embeddings=128,
            use_parallel_residual=True,
            rotary_pct=0.25,
            bos_token_id=0,
            eos_token_id=0,
        )
    elif arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=3 * d_model // 2,
            max_position_embeddings=128,
            bos_token_id=0,
            eos_token_id=0,
        )
    elif arch == "gemma2":  # a sliding window shorter than the test prompts, both soft-caps on
        config = Gemma2Config(
            vocab_size=vocab,
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=3 * d_model // 2,
            max_position_embeddings=128,
            sliding_window=4,
            query_pre_attn_scalar=8,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        )
    elif arch == "gemma3":  # one sliding layer (window shorter than the test prompts) and one full one
        config = Gemma3TextConfig(
            vocab_size=vocab,
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=3 * d_model // 2,
            max_position_embeddings=128,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"] * (n_layers // 2)
            + ["sliding_attention"] * (n_layers % 2),
            rope_theta=1_000_000.0,
            rope_local_base_freq=10_000.0,
            query_pre_attn_scalar=8,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        )
    elif arch == "qwen3":
        config = Qwen3Config(
            vocab_size=vocab,
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=3 * d_model // 2,
            max_position_embeddings=128,
            bos_token_id=0,
            eos_token_id=0,
            tie_word_embeddings=False,
        )
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # non-trivial norm weights, so weight folding is exercised
            for name, param in model.named_parameters():
                if "norm" in name or ".ln" in name:
                    param.add_(0.3 * torch.randn_like(param))
        model.save_pretrained(folder)
    return folder


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu (default): hide any GPU, so every command's default device (auto) is the CPU, as "
        "in CI; cuda: leave the GPU visible, so auto means cuda (scripts/device_check.sh)",
    )
    parser.addoption(
        "--real-processes",
        action="store_true",
        help="run every case of the bad-input battery as a real `tc` process (default: the flag-level "
        "cases run in this process through the CLI's entry point; sandboxed ones always run as processes)",
    )


def pytest_configure(config):
    REAL_PROCESSES["on"] = config.getoption("real_processes")
    # set before anything starts CUDA; the tc subprocesses the tests run inherit it
    if config.getoption("device") == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: no GPU is visible to torch here")


@pytest.fixture()
def one_torch_thread():
    """2 cores shared by many processes: several OpenMP threads per op make tiny models 50x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def modern_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("modern_models")
    return {arch: build_tiny_model(arch, root / arch) for arch in MODERN_ARCHITECTURES}


@pytest.fixture(scope="session")
def all_model_dirs(tiny_model_dirs, modern_model_dirs) -> dict[str, Path]:
    """All six tiny architectures."""
    return {**tiny_model_dirs, **modern_model_dirs}


@pytest.fixture(scope="session", params=ARCHITECTURES)
def tiny_model_dir(request, tiny_model_dirs) -> Path:
    """Parametrised over the three architectures."""
    return tiny_model_dirs[request.param]


class LoadedModels(Mapping):
    """name -> the model in that folder loaded on the CPU in float32, on first use: circuit_helpers.loaded_model
    loads each once per test process, for these fixtures and the tests that call it directly alike."""

    def __init__(self, dirs: Mapping[str, Path]):
        self.dirs = dirs

    def __getitem__(self, name: str):
        from circuit_helpers import loaded_model

        return loaded_model(self.dirs[name])

    def __iter__(self):
        return iter(self.dirs)

    def __len__(self) -> int:
        return len(self.dirs)


@pytest.fixture(scope="session")
def tiny_models(tiny_model_dirs) -> LoadedModels:
    """arch -> the tiny model of the three architectures, loaded (float32, CPU) when a test first asks for it."""
    return LoadedModels(tiny_model_dirs)


@pytest.fixture(scope="session")
def random_transcoder_folder(tiny_models, tmp_path_factory):
    """(arch, bias_shift) -> a folder holding circuit_helpers.random_transcoders(48 features, seed 0, bias_shift)
    for every layer of that tiny model, saved the first time a test asks for it."""
    saved: dict[tuple[str, float], Path] = {}

    def folder(arch: str, bias_shift: float = 0.0) -> Path:
        from circuit_helpers import random_transcoders, save_transcoders

        if (arch, bias_shift) not in saved:
            transcoders = random_transcoders(tiny_models[arch].info, 48, 0, bias_shift=bias_shift)
            saved[arch, bias_shift] = save_transcoders(transcoders, tmp_path_factory.mktemp(f"transcoders_{arch}"))
        return saved[arch, bias_shift]

    return folder


@pytest.fixture(scope="session")
def random_clt_folder(tiny_models, tmp_path_factory):
    """(arch, activation, skip, off_diagonal) -> a tc cross-layer transcoder folder holding
    circuit_helpers.random_clt(48 features per layer, seed 0) over every layer of that tiny model, saved the
    first time a test asks for it."""
    saved: dict[tuple, Path] = {}

    def folder(arch: str, activation: str = "relu", skip: bool = False, off_diagonal: float = 1.0) -> Path:
        from circuit_helpers import random_clt
        from tccli.transcoders.files import save_cross_layer

        key = (arch, activation, skip, off_diagonal)
        if key not in saved:
            clt = random_clt(tiny_models[arch].info, 48, 0, off_diagonal, activation=activation, skip=skip)
            saved[key] = save_cross_layer(clt, tmp_path_factory.mktemp(f"clt_{arch}"))
        return saved[key]

    return folder


@pytest.fixture(scope="session")
def builtin_model():
    """The model shipped in tccli/builtin/model, loaded on the CPU with the hub offline: nothing may be fetched."""
    from tccli.model.loading import load_model

    with pytest.MonkeyPatch.context() as offline:
        offline.setenv("HF_HUB_OFFLINE", "1")
        offline.setenv("TRANSFORMERS_OFFLINE", "1")
        return load_model("builtin", device="cpu")


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not (STORIES / "config.json").exists():
        pytest.skip(f"{STORIES} is absent (../shared is not beside the checkout)")
    return STORIES


@pytest.fixture(scope="session")
def corpora_dir() -> Path:
    if not CORPORA.is_dir():
        pytest.skip(f"{CORPORA} is absent (../shared is not beside the checkout)")
    return CORPORA


@pytest.fixture()
def text_file(tmp_path) -> Path:
    """A small plain-text corpus: documents separated by blank lines."""
    docs = [f"Story {i}. " + " ".join(TOKENIZER_TEXT[i % 4].split()[: 5 + i % 7]) * 3 for i in range(60)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


class Pipe:
    """What ``sys.stdin`` is for a `tc` run in this process fed by a pipe: bytes, not a terminal."""

    def __init__(self, data: bytes):
        import io

        self.buffer = io.BytesIO(data)
        self.closed = False

    def isatty(self) -> bool:
        return False


@pytest.fixture()
def pipe_into_stdin(monkeypatch):
    """``pipe_into_stdin(data)``: standard input becomes a pipe holding ``data``, unread (tccli.runtime.inputs
    keeps what it reads for the run; that is forgotten too, and again after the test)."""
    from tccli.runtime import inputs

    def feed(data: bytes) -> None:
        monkeypatch.setattr("sys.stdin", Pipe(data))
        inputs.forget_stdin()

    yield feed
    inputs.forget_stdin()


REAL_PROCESSES = {"on": False}  # pytest --real-processes (pytest_configure sets it)


def run_tc(
    *args: str, input: str | None = None, env: dict | None = None, cwd: Path | None = None, process: bool = False
):
    """`tc ARGS` as a user runs it: a CompletedProcess with the exit status, stdout and stderr.

    By default it runs in this process through the CLI's entry point (``battery.run_in_process``: the code a
    `tc` process runs, without ~2.5 s of CPU to import torch again per call). A real `python -m tccli`
    subprocess runs instead when the test is about the process itself (``process=True``: start-up,
    imports, signals), when it needs an environment of its own (``env``), and under --real-processes."""
    import subprocess
    import sys

    if not (process or env or REAL_PROCESSES["on"]):
        import battery

        return battery.run_in_process(*args, stdin=input, cwd=cwd)
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("TC_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "tccli", *args],
        input=input,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=600,
        cwd=cwd,
    )


def run_tc_in_terminal(
    *args: str, cwd: Path | None = None, timeout: float = 600, columns: int = 80, program: tuple[str, ...] | None = None
) -> tuple[int, str]:
    """Run `tc ARGS` (or ``program``) with stdin, stdout and stderr on a pseudo-terminal of ``columns`` x 24,
    as in an interactive shell; (exit code, everything it wrote to the terminal, ANSI codes removed)."""
    import fcntl
    import pty
    import re
    import struct
    import subprocess
    import sys
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = dict(os.environ, TERM="xterm-256color", COLUMNS=str(columns), OMP_NUM_THREADS="1")
    env.pop("TC_DEBUG", None)
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(name, None)
    command = list(program) if program else [sys.executable, "-m", "tccli", *args]
    proc = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, start_new_session=True)
    os.close(slave)
    chunks = []
    deadline = time.time() + timeout
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not data:
            break
        chunks.append(data)
        if time.time() > deadline:
            proc.kill()
            break
    os.close(master)
    code = proc.wait(timeout=60)
    text = b"".join(chunks).decode("utf-8", errors="replace")
    return code, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r", "", text)


@pytest.fixture(scope="session")
def artefacts(tmp_path_factory):
    """A cache, transcoders, an SAE, a features file, a graph and another model, made once per session by
    real `tc` runs (tests/battery.py); tests read them and never write them."""
    import battery

    return battery.build_artefacts(tmp_path_factory.mktemp("battery") / "shared")


# Where each verified architecture keeps the norm in front of the MLP and the MLP, written out by hand
# (tc derives these from the bridge's module tree), and whether TransformerLens normalises with
# x * rsqrt(var + eps) (True) or x / sqrt(var + eps) (False) there.
PLAIN_MLP_MODULES = {
    "GPT2LMHeadModel": ("transformer.h.{}.ln_2", "transformer.h.{}.mlp", False),
    "GPTNeoXForCausalLM": ("gpt_neox.layers.{}.post_attention_layernorm", "gpt_neox.layers.{}.mlp", True),
    "LlamaForCausalLM": ("model.layers.{}.post_attention_layernorm", "model.layers.{}.mlp", True),
}


def plain_model_reference(model_dir: Path, tokens, layers: list[int], batch_size: int) -> dict:
    """{(layer, 'mlp_in'|'mlp_out'): float32 [n_tokens, d]} from a plain HuggingFace forward pass over the
    same batches: the norm input normalised and the MLP output centred as compatibility mode defines them.
    What the native engine must store, computed independently of tccli.model.loading.MlpCapture's plumbing."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from tccli.model.loading import compat_mlp_out, compat_normalized

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    architecture = model.config.architectures[0]
    norm_path, mlp_path, inverse_sqrt = PLAIN_MLP_MODULES[architecture]
    normalization = "rmsnorm" if architecture == "LlamaForCausalLM" else "layernorm"
    seen: dict = {}
    for layer in layers:
        norm = model.get_submodule(norm_path.format(layer))
        norm.register_forward_pre_hook(lambda m, args, layer=layer: seen.__setitem__((layer, "in"), args[0]))
        model.get_submodule(mlp_path.format(layer)).register_forward_hook(
            lambda m, args, out, layer=layer: seen.__setitem__((layer, "out"), out)
        )
    eps = {
        layer: float(
            getattr(model.get_submodule(norm_path.format(layer)), "eps", None)
            or model.get_submodule(norm_path.format(layer)).variance_epsilon
        )
        for layer in layers
    }
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.int64)
    parts: dict = {(layer, which): [] for layer in layers for which in ("mlp_in", "mlp_out")}
    for lo in range(0, tokens.shape[0], batch_size):
        with torch.no_grad():
            model(input_ids=tokens[lo : lo + batch_size])
        for layer in layers:
            normalized, _ = compat_normalized(seen[layer, "in"], normalization, eps[layer], inverse_sqrt)
            parts[layer, "mlp_in"].append(normalized.reshape(-1, normalized.shape[-1]))
            out = compat_mlp_out(seen[layer, "out"], normalization).float()
            parts[layer, "mlp_out"].append(out.reshape(-1, out.shape[-1]))
    return {key: torch.cat(chunks) for key, chunks in parts.items()}
