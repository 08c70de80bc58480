"""Progress bars for fits that run as one compiled `lax.scan`.

The scan body calls `report(i, value)`; a host callback (`jax.debug.callback`) advances
whichever bar `progress_bar(...)` opened around the call. The callbacks run while the
compiled loop runs, so the bar moves during the fit (checked by a timing test), not at
its end. No closure is captured, so showing progress never changes what gets compiled
beyond one static on/off flag.
"""
from __future__ import annotations

import contextlib

import jax
import numpy as np
from jax import lax

_ACTIVE = []


def _tick(i, value):
    """Host side of `report`: runs while the compiled loop runs (XLA calls it from the loop on
    CPU and GPU alike; nothing is buffered until the end, see tests/test_mcmc_ergonomics.py).
    Tolerates batched values (a report under vmap: the largest iteration, the best value) and
    callbacks arriving out of order (the bar never moves back)."""
    if _ACTIVE:
        bar = _ACTIVE[-1]
        i = int(np.max(np.asarray(i)))
        v = np.asarray(value, dtype=float).ravel()
        best = float(np.nanmax(v)) if np.any(~np.isnan(v)) else float("nan")
        bar.set_postfix_str(f"objective={best:.6g}", refresh=False)
        step = i + 1 - bar.n
        if step > 0:
            bar.update(step)  # tqdm throttles the redraws (mininterval)


def report(i, value, every: int = 1):
    """Inside a jitted loop: send iteration `i` and a scalar to the open bar every `every` steps."""
    def send(_):
        jax.debug.callback(_tick, i, value)
        return None

    lax.cond((i + 1) % every == 0, send, lambda _: None, None)


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, leave=False, mininterval=0.5)
    _ACTIVE.append(bar)
    try:
        yield bar
        jax.effects_barrier()
    finally:
        _ACTIVE.remove(bar)
        bar.close()


def default_enabled(progress, num_iters: int) -> bool:
    """Show a bar on long fits unless the caller says otherwise."""
    return bool(num_iters >= 100) if progress is None else bool(progress)


def report_every(num_iters: int) -> int:
    return max(1, num_iters // 100)
