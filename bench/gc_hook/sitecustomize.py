"""Loaded by bench/runs_ws.py into the servers whose idle memory it measures (`PYTHONPATH=bench/gc_hook`), and
into no other process: on SIGUSR1 the server runs a full garbage collection and says on stderr how many
unreachable objects it found, so resident memory is read after collectable garbage is gone.

The server's code is unchanged; Python imports `sitecustomize` by itself at start-up.
"""

import gc
import signal
import sys
from types import FrameType

GC_LINE = "bench gc_hook: collected"


def _collect(signum: int, frame: FrameType | None) -> None:
    print(f"{GC_LINE} {gc.collect()}", file=sys.stderr, flush=True)


signal.signal(signal.SIGUSR1, _collect)
