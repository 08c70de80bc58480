"""Lagged observations as inputs: how autoregressive models see their past."""
from __future__ import annotations

import jax.numpy as jnp


def lagged_inputs(emissions, num_lags: int, fill_value: float = 0.0):
    """Stack y_{t-1}, ..., y_{t-P} as the input row at time t.

    Args:
        emissions: (T, D) or (B, T, D).
        num_lags: P >= 1.
        fill_value: value used for lags before the start of the sequence
            (NaN marks them missing instead).

    Returns:
        (T, P * D) or (B, T, P * D); columns ``[p*D:(p+1)*D]`` hold y_{t-p-1}.
    """
    from probssm.core.checks import positive_int

    num_lags = positive_int(num_lags, "num_lags")
    y = jnp.asarray(emissions)
    if y.ndim not in (2, 3):
        raise ValueError(f"emissions: expected shape (T, D) or (B, T, D), got shape {tuple(y.shape)}")
    num_timesteps = y.shape[-2]
    pad = [(0, 0)] * (y.ndim - 2) + [(num_lags, 0), (0, 0)]
    padded = jnp.pad(y, pad, constant_values=fill_value)
    cols = [padded[..., num_lags - p - 1 : num_lags - p - 1 + num_timesteps, :] for p in range(num_lags)]
    return jnp.concatenate(cols, axis=-1)
