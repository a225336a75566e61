"""``import gemma3n`` asks torch for transparent huge pages on large CPU buffers (gemma3n/huge_pages.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Allocates and fills a 64 MB buffer 8 times and counts the minor page faults: 4 KB pages fault 16,384 times per
# buffer; 2 MB pages 32 times, plus the unaligned ends.
_PROBE = """
import json, os, resource, sys
import gemma3n
import torch
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(1 << 24).fill_(1.0)
before = faults()
for _ in range(8):
    torch.empty(1 << 24).fill_(1.0)
print(json.dumps({"env": os.environ.get("THP_MEM_ALLOC_ENABLE"), "faults": faults() - before}))
"""


def _probe(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _kernel_thp_mode() -> str | None:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not path.exists():
        return None
    text = path.read_text()
    return text[text.index("[") + 1 : text.index("]")]


@pytest.fixture(scope="module")
def probes() -> tuple[dict, dict]:
    """(gemma3n's default, THP_MEM_ALLOC_ENABLE=0 set by the user), each measured in a fresh process."""
    return _probe(None), _probe("0")


def test_import_sets_the_default_and_keeps_an_explicit_choice(probes):
    default, opted_out = probes
    assert default["env"] == "1"
    assert opted_out["env"] == "0"


# only under "madvise" does the setting decide ("always" gives huge pages either way, "never" neither)
@pytest.mark.skipif(_kernel_thp_mode() != "madvise", reason="kernel's transparent huge pages are not 'madvise'")
def test_large_buffers_fault_in_huge_pages(probes):
    default, opted_out = probes
    print(f"page faults for 8 x 64 MB: default {default['faults']}, opted out {opted_out['faults']}")
    assert opted_out["faults"] >= 8 * 16384 * 0.9  # the 4 KB baseline really is what the probe measures
    assert default["faults"] <= opted_out["faults"] / 4
