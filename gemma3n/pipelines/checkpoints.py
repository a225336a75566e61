"""Finding a checkpoint directory from what a user typed: a local folder, "tiny-random", or a Hugging Face hub id."""

from __future__ import annotations

import sys
from pathlib import Path

TINY_RANDOM = "tiny-random"


class ModelNotFoundError(ValueError):
    """A model name that names no usable checkpoint; the message says how to provide one."""


def resolve_checkpoint(name: str | Path, *, announce: bool = True) -> Path:
    """The local directory holding ``name``'s files.

    * an existing directory: used as is (it must hold a config.json);
    * ``"tiny-random"``: a small random-weight checkpoint, built once into ``$GEMMA3N_CACHE/tiny-random`` (default
      ``~/.cache/gemma3n/tiny-random``); a note that its outputs are meaningless goes to stderr when ``announce``;
    * ``owner/name``: a hub id, looked up in the huggingface_hub cache first, then downloaded (needs huggingface_hub).
    """
    text = str(name)
    if text == TINY_RANDOM:
        from ..tiny_random import WARNING, default_cache_dir, ensure_tiny_random

        if announce:
            exists = (default_cache_dir() / "model.safetensors").is_file()
            print(
                f"{WARNING}{'' if exists else ' (building it once in ' + str(default_cache_dir()) + ')'}",
                file=sys.stderr,
            )
        return ensure_tiny_random()
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"model {text!r} is a file; pass the checkpoint directory that holds config.json")
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model directory {text!r} has no config.json; is it a Gemma 3n checkpoint?")
        return path
    if _looks_like_hub_id(text):
        return _from_hub(text)
    raise ModelNotFoundError(
        f"model {text!r} is neither a local checkpoint directory nor a hub id (owner/name); "
        f"pass a directory with config.json and model.safetensors, or {TINY_RANDOM!r} to try a random model"
    )


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def _from_hub(repo_id: str) -> Path:
    try:
        import huggingface_hub
    except ImportError:
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a local directory and huggingface_hub is not installed; either "
            f"`pip install huggingface_hub` (and accept the model's license on huggingface.co), or download the "
            f"checkpoint yourself and pass its directory"
        ) from None
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not in the local cache: try a normal download
        pass
    try:
        return Path(huggingface_hub.snapshot_download(repo_id))
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(
            f"cannot get model {repo_id!r} from the Hugging Face hub ({reason}); check the id, your network and "
            f"access (gated models need `huggingface-cli login`), or pass a local checkpoint directory"
        ) from None
