"""Paths and specs from configs may use ``~`` and ``$VAR`` / ``${VAR}``; an unset variable is an error that
names it, never a path with a literal ``$`` in it."""
from __future__ import annotations

import os
import re
from typing import Optional, Type

_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def expand_env(text: Optional[str], what: str = "path", error: Type[Exception] = ValueError) -> Optional[str]:
    if text is None:
        return None
    missing = sorted({name for name in _VAR.findall(text) if name not in os.environ})
    if missing:
        raise error(f"{what} {text!r} uses environment variable(s) {', '.join(missing)} that are not set; "
                    "export them or give the full path")
    return os.path.expanduser(os.path.expandvars(text))
