"""Progress bars for fits that run as one compiled `lax.scan`.

The scan body calls `report(i, value)`; a host callback advances whichever bar
`progress_bar(...)` opened around the call. No closure is captured, so showing
progress never changes what gets compiled beyond one static on/off flag.
"""
from __future__ import annotations

import contextlib

import jax
from jax import lax

_ACTIVE = []


def _tick(i, value):
    if _ACTIVE:
        bar = _ACTIVE[-1]
        bar.set_postfix_str(f"objective={float(value):.6g}", refresh=False)
        bar.update(int(i) + 1 - bar.n)  # tqdm throttles the redraws (mininterval)


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
