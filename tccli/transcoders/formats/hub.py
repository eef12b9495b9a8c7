"""Transcoders named by a HuggingFace hub id (``mntss/transcoder-Llama-3.2-1B``, with an optional
subfolder ``owner/repo/sub/folder`` and revision ``@rev``), downloaded through ``huggingface_hub`` into its
cache. Offline (no network, or ``HF_HUB_OFFLINE=1`` with nothing cached) it is one line saying so.

Only what the transcoders need is fetched: a circuit-tracer ``config.yaml`` first (when the repository has
one), then the files it lists or the ``layer_*.safetensors`` (a cross-layer transcoder's ``W_enc_*`` and
``W_dec_*.safetensors``) beside it; otherwise the subfolder named."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from tccli.errors import fail

_HUB_ID = re.compile(r"^(?:hf://)?(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?P<sub>(?:/[^@?]+)*)(?:@(?P<rev>[\w./-]+))?$")


def looks_like_hub_id(text: str) -> bool:
    """``owner/name[/sub...][@rev]`` (or an ``hf://`` URI) that is not a path on this machine."""
    if text.startswith(("/", ".", "~")) or Path(text).expanduser().exists():
        return False
    return bool(_HUB_ID.match(text))


def split_hub_id(text: str) -> tuple[str, Optional[str], Optional[str]]:
    """(repo id, subfolder or None, revision or None)."""
    match = _HUB_ID.match(text)
    if not match:
        raise fail(f"{text!r} is not a HuggingFace hub id (owner/name[/subfolder][@revision])")
    sub = match.group("sub").strip("/") or None
    return match.group("repo"), sub, match.group("rev")


def _hub_error(what: str, exc: Exception) -> Exception:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return fail(
        f"cannot download {what} from the HuggingFace hub ({reason[:200]}); offline, pass a local folder instead"
    )


def download_file(repo: str, filename: str, revision: Optional[str] = None) -> Path:
    """One file of a hub repository (from the cache when it is there)."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo, filename=filename, revision=revision))
    except Exception as exc:  # offline, unknown repo or file, gated repo, ...
        raise _hub_error(f"{repo}/{filename}", exc) from None


def download_uri(uri: str) -> Path:
    """An ``hf://owner/repo/path/in/repo[?revision=rev]`` file, as circuit-tracer's configs list them."""
    body, _, query = uri[len("hf://") :].partition("?")
    parts = body.split("/")
    if len(parts) < 3:
        raise fail(f"{uri!r} is not an hf://owner/repo/file URI")
    revision = None
    for item in query.split("&"):
        key, _, value = item.partition("=")
        if key == "revision" and value:
            revision = value
    return download_file("/".join(parts[:2]), "/".join(parts[2:]), revision)


def download(text: str) -> Path:
    """The local folder (or file) holding the transcoders a hub id names."""
    repo, sub, revision = split_hub_id(text)
    config = f"{sub}/config.yaml" if sub else "config.yaml"
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise _hub_error(text, exc) from None
    try:
        from huggingface_hub import file_exists

        has_config = file_exists(repo, config, revision=revision)
    except Exception:
        has_config = False  # offline: the snapshot below answers from the cache or says why not
    # a per-layer set's layer_*.safetensors, or a cross-layer transcoder's W_enc_*/W_dec_* files
    # (formats.circuit_tracer_clt); files a config lists by hf:// URI are fetched when read
    names = ["config.yaml", "layer_*.safetensors", "W_enc_*.safetensors", "W_dec_*.safetensors"]
    patterns = [f"{sub}/{name}" for name in names] if sub else names
    if not has_config:
        patterns = [f"{sub}/**"] if sub else None
    try:
        root = Path(snapshot_download(repo_id=repo, revision=revision, allow_patterns=patterns))
    except Exception as exc:
        raise _hub_error(text, exc) from None
    local = root / sub if sub else root
    if not local.exists():
        raise fail(f"{text}: the hub repository {repo} has no {sub}")
    return local
