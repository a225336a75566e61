"""``compile=True`` in the pipelines: compile the encoder towers a batch uses, at one fixed batch size.

The decode steps compile in :func:`gemma3n.generation.compiled_decode_step` (and the prefill's per-layer work in
:func:`gemma3n.generation.enable_compiled_prefill`); this covers the vision tower and the audio
encoder (``enable_compile``: inductor with frozen weights). Each tower is compiled for one batch size (the pipeline's,
or the CLI's ``--batch-size``; on CPU the vision tower's is 1, as it runs image by image) the first time a compiled
batch needs it, so a smaller last batch is filled up rather than compiled again; a tower that is already compiled is
left as it is. Compilation is the tower's state: once on, it stays on for later calls of the model (``compile=False``
then only keeps the decode steps eager).
"""

from __future__ import annotations

from typing import Any

TOWER_INPUTS = {"vision_tower": "pixel_values", "audio_tower": "input_features"}  # tower -> the input it encodes


def compile_tower(model: Any, name: str, batch_size: int) -> bool:
    """Enable compilation of ``model.<name>`` for ``batch_size`` items at a time; False when the model has no such
    tower or it is compiled already."""
    tower = getattr(model, name, None)
    if tower is None or not hasattr(tower, "enable_compile") or tower.compile_enabled:
        return False
    if hasattr(tower, "images_per_call"):  # the vision tower on CPU runs a batch image by image
        batch_size = tower.images_per_call(batch_size)
    tower.enable_compile(batch_size=batch_size)
    return True


def compile_towers(model: Any, inputs: Any, batch_size: int) -> list[str]:
    """Enable compilation of the towers that ``inputs`` (processor outputs) need; returns the names newly enabled."""
    return [
        name
        for name, key in TOWER_INPUTS.items()
        if inputs.get(key) is not None and compile_tower(model, name, batch_size)
    ]
