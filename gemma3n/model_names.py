"""Model names -> checkpoint directories: the one place every entry point resolves what a user typed.

``gemma3n.load``, ``Processor.from_pretrained``, ``gemma3n.pipeline`` and the ``gemma3n`` command all accept:

* a local checkpoint directory (``path/to/gemma-3n-E2B-it``);
* ``"tiny-random"``: a small random-weight checkpoint, built once into ``$GEMMA3N_CACHE/tiny-random`` (default
  ``~/.cache/gemma3n/tiny-random``);
* a Hugging Face hub id (``google/gemma-3n-E2B-it``): huggingface_hub's local cache first, then a download.

No torch import here (the command line resolves names before it needs the model).
"""

from __future__ import annotations

import sys
from pathlib import Path

TINY_RANDOM = "tiny-random"
HUB_LOGIN_COMMAND = "hf auth login"  # huggingface_hub >= 1.0 (`huggingface-cli login` was removed)


class ModelNotFoundError(FileNotFoundError):
    """A model name that names no usable checkpoint; the message says how to provide one."""


def resolve_model_name(
    name: str | Path, *, announce: bool = True, kind: str = "model", required_file: str | None = "config.json"
) -> Path:
    """The local directory holding ``name``'s files (see the module docstring for the accepted names).

    announce: say on stderr that "tiny-random" answers are meaningless (and that it is being built, the first time).
    kind: what the caller loads ("model", "processor"), used in the error messages.
    required_file: a file a local directory must hold (``None``: no check).
    """
    text = str(name)
    if text == TINY_RANDOM:
        from .tiny_random import WARNING, default_cache_dir, ensure_tiny_random

        if announce:
            exists = (default_cache_dir() / "model.safetensors").is_file()
            building = "" if exists else f" (building it once in {default_cache_dir()})"
            print(f"{WARNING}{building}", file=sys.stderr)
        return ensure_tiny_random()
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{kind} {text!r} is a file; pass the checkpoint directory that holds its files")
        if required_file is not None and not (path / required_file).is_file():
            raise ModelNotFoundError(f"{kind} directory {text!r} has no {required_file}; is it a Gemma 3n checkpoint?")
        return path
    if looks_like_hub_id(text):
        return _from_hub(text)
    raise ModelNotFoundError(
        f"{kind} directory not found: {text!r} is neither a local checkpoint directory nor a hub id (owner/name); "
        f"pass a directory with config.json and model.safetensors, or {TINY_RANDOM!r} to try a random model"
    )


def looks_like_hub_id(text: str) -> bool:
    """``owner/name`` with both parts non-empty (and not a relative path such as ``./x`` or ``~/x``)."""
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
            f"access (gated models need `{HUB_LOGIN_COMMAND}`), or pass a local checkpoint directory"
        ) from None
