"""The startup heap of a long-running process, frozen out of the garbage collector's walks.

CPython's full (generation 2) collection walks every object the collector tracks, holding
the GIL. A router, a sender or an inbox holds over 100,000 of them from startup alone
(modules, functions, parsed Avro schemas, the policy, the organisation registry), none of
which ever becomes garbage, and walking them takes 50-90 ms on a 2-core VM: a pause in the
middle of a batch, every thousand referrals or so on the router and every hundred on a sender
that keeps 500 messages in flight. Measured (2,000 referrals, same session): each of the
router's full collections took 70-97 ms, and 14-15 ms frozen (22 us a referral against
70-97); the benchmarks' ``IntakeSender`` spent 37% of its CPU in the collector (24 full
collections of 85 ms), and 1.9-2.5 ms a referral frozen against 3.3-3.5 ms. The ``send``
command's own loop runs only 2 full collections on 1,400 referrals, so its CPU did not move
(0.43-0.62 against 0.48-0.54 ms a referral): what the freeze buys there is the shorter pause.

:func:`freeze_startup_heap` collects once, then moves every object alive into the permanent
generation (``gc.freeze``), which no collection walks. Reference counting still frees a frozen
object when its last reference goes; only a reference *cycle* among frozen objects would
outlive its use, and startup state lives as long as the process. So it is called by the
commands that run a long loop (``route``, ``send``, ``inbox serve`` and ``inbox ingest``, a
send's worker processes, and the benchmarks standing in for them), once their setup is done,
and it does nothing unless the process is the command's own: started as ``referral-broker``
(whose entry point calls :func:`own_process`) or as a send's worker. A command run inside
another program (click's test runner, a partner's script invoking the command group) leaves
that program's heap as it is.
"""

from __future__ import annotations

import gc

_owned = False


def own_process() -> None:
    """This process runs one command and nothing else (the program's entry points call this):
    its commands may freeze the startup heap."""
    global _owned
    _owned = True


def freeze_startup_heap() -> int:
    """In a process of our own: collect the startup garbage, then freeze what is left.
    Returns how many objects are frozen (0 where the process is not ours)."""
    if not _owned:
        return 0
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
