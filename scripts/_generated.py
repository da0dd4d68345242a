"""The write-or-check step every generator script in scripts/ ends with."""
from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(target: Path, text: str, command: str, check: bool) -> int:
    """With ``check``: 0 when ``target`` holds ``text``, else 1 and a message naming ``command``
    (tests run generators this way).  Without: write ``text`` to ``target``."""
    if check:
        current = target.read_text() if target.exists() else ""
        if current != text:
            print(f"{target} is out of date: run {command}", file=sys.stderr)
            return 1
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print(f"wrote {target}")
    return 0
