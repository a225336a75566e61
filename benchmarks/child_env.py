"""Each benchmarked implementation's child process gets its own allocator default.

``import gemma3n`` sets ``THP_MEM_ALLOC_ENABLE=1`` (gemma3n/huge_pages.py), and a benchmark parent that imports
gemma3n would pass it on to every child. transformers' children get torch's default instead (the variable unset),
as its users run it, unless the user set the variable for the whole run. Import this module before gemma3n.
"""

from __future__ import annotations

import os

THP_ENV = "THP_MEM_ALLOC_ENABLE"
USER_THP = os.environ.get(THP_ENV)  # read before anything imports gemma3n


def child_env(impl: str) -> dict[str, str]:
    """The environment for ``impl``'s child: gemma3n's default allocator setting for gemma3n, torch's for others."""
    env = {k: v for k, v in os.environ.items() if k != THP_ENV}
    if USER_THP is not None:
        env[THP_ENV] = USER_THP
    elif impl.startswith("gemma3n"):
        env[THP_ENV] = "1"  # what `import gemma3n` before torch sets
    return env


def thp_setting() -> str:
    """This process's setting, for the results: '1', '0' or 'unset'."""
    return os.environ.get(THP_ENV, "unset")


def restore_thp(setting: str) -> None:
    """Give this process back the setting ``thp_setting()`` returned (``import gemma3n`` sets the variable when it is
    unset). Call it right after importing gemma3n, before torch's first allocation reads the variable."""
    if setting == "unset":
        os.environ.pop(THP_ENV, None)
    else:
        os.environ[THP_ENV] = setting
