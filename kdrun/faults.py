"""Fault injection for the crash-safety tests (tests/test_faults.py).

``KDRUN_FAULT="<point>#<n>#<KILL|TERM|INT>"`` makes the process send itself that signal the n-th
time it passes ``fault_point("<point>")``. Points: ``step`` (after each optimizer step),
``write <file name>`` (inside an atomic write: the temp file is complete, the rename not done),
``between last.pt and best.pt``. Without the variable a fault point is one comparison.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("KDRUN_FAULT")
_seen: dict[str, int] = {}


def fault_point(name: str) -> None:
    if _SPEC is None:
        return
    point, count, sig = _SPEC.split("#")
    if name != point:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(count):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))
