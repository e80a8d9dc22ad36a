"""Checkpoints given by URL: downloaded once, verified against a SHA-256 the user gives, then read as data.

``--ckpt_path https://host/run/last.ckpt#sha256=<64 hex digits>``: the hash travels in the URL's fragment, which an
HTTP client never sends to the server, so one value says both where the file is and which file it must be. The file
goes through the same downloader as data URLs (:func:`lit_llm.data.sources.download`: a temporary name, verified,
then renamed into ``<cache>/downloads/``; later runs reuse it without the network) and is then an ordinary local
checkpoint, which Lightning reads with ``torch.load(weights_only=True)``. Without the hash the run stops before
anything is downloaded: Lightning alone would fetch the URL with ``torch.hub`` and unpickle it with
``weights_only=False``, running whatever code the file holds.

Other fsspec URLs (``s3://``, ``gs://`` ...) are read by Lightning straight from the store, as data
(:func:`read_as_data` sets ``weights_only``), and Lightning's model registry (``registry:...``) is refused: it
downloads without a checksum.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lit_llm.errors import CheckpointError, LitLLMError

__all__ = ["fetch_checkpoint", "read_as_data", "resolve_ckpt_path", "split_sha256"]

_FRAGMENT = re.compile(r"#sha256=([^#&]*)$")
_HEX = re.compile(r"[0-9a-fA-F]{64}")


def split_sha256(url: str) -> tuple[str, str | None]:
    """``"https://h/x.ckpt#sha256=ab.."`` -> ``("https://h/x.ckpt", "ab..")``; ``(url, None)`` without the fragment."""
    m = _FRAGMENT.search(url)
    if m is None:
        return url, None
    return url[: m.start()], m[1]


def fetch_checkpoint(url: str, cache_dir: str | Path | None = None, *, key: str = "--ckpt_path") -> Path:
    """Download the checkpoint ``url`` (``http(s)://...#sha256=<hex>``) once into the cache and verify it.

    Args:
        url: The URL with its required ``#sha256=<64 hex digits>`` fragment.
        cache_dir: The cache root (``$LIT_LLM_CACHE`` or ``~/.cache/lit_llm`` by default).
        key: The option named in error messages.

    Returns:
        The verified local file.

    Raises:
        CheckpointError: No or a malformed hash, the download failed, or the file's hash differs.
    """
    from lit_llm.data.sources import download

    plain, sha256 = split_sha256(url)
    if sha256 is None:
        raise CheckpointError(
            f"{key} {plain} is a URL without a SHA-256, and lit_llm reads no downloaded checkpoint it cannot verify; "
            f"append the file's hash (sha256sum FILE) as {plain}#sha256=<64 hex digits>, or download it yourself and "
            "pass the local path")
    if not _HEX.fullmatch(sha256):
        raise CheckpointError(f"{key} {plain}: #sha256={sha256!r} is not a SHA-256 hex digest; append the 64 hex "
                              "digits that sha256sum FILE prints")
    try:
        return download(plain, sha256.lower(), cache_dir, key=key)
    except LitLLMError as err:  # the downloader's DataError/ConfigError: about a checkpoint here
        raise CheckpointError(str(err).replace("set sha256 to", f"change #sha256= in {key} to")) from err


def resolve_ckpt_path(value: Any, cache_dir: str | Path | None = None) -> Any:
    """What ``--ckpt_path value`` becomes before Lightning sees it: a verified local copy of an ``http(s)`` URL;
    any other value unchanged, except Lightning's model registry, which is refused, and a relative local path that
    begins with ``http``, made absolute (Lightning would otherwise take it for a URL)."""
    if not isinstance(value, (str, Path)):
        return value
    text = str(value)
    if text.startswith(("http://", "https://")):
        return str(fetch_checkpoint(text, cache_dir))
    if text == "registry" or text.lower().startswith("registry:"):
        raise CheckpointError(
            f"--ckpt_path {text}: Lightning's model registry downloads a checkpoint without verifying it, which "
            "lit_llm does not resume from; download it, then pass the local file, or an https URL with #sha256=<hex>")
    if text.startswith("http") and "://" not in text:
        return str(Path(text).absolute())
    return value


def read_as_data(subcommand_config: Any, cache_dir: str | Path | None = None) -> None:
    """Prepare the ``fit``/``validate``/``test``/``predict`` arguments in place so that no checkpoint they name runs
    code: ``ckpt_path`` through :func:`resolve_ckpt_path`, and ``weights_only`` true unless the user set it (Lightning
    would leave it to ``torch.load``'s default, which ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` turns off)."""
    if subcommand_config is None:
        return
    if subcommand_config.get("ckpt_path") is not None:
        subcommand_config["ckpt_path"] = resolve_ckpt_path(subcommand_config["ckpt_path"], cache_dir)
    if "weights_only" in subcommand_config and subcommand_config.get("weights_only") is None:
        subcommand_config["weights_only"] = True
