"""Input arrays of the inference runtimes, checked once (shared by the onnxruntime and TensorRT runtimes)."""
from __future__ import annotations

import numpy as np

__all__ = ["pixel_batch", "token_batch"]


def pixel_batch(pixel_values: np.ndarray) -> np.ndarray:
    """``pixel_values`` as a C-contiguous float32 ``[B,3,H,W]`` array with B >= 1."""
    x = np.ascontiguousarray(pixel_values, dtype=np.float32)
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"pixel_values must be a non-empty [B,3,H,W] array, got shape {x.shape}")
    return x


def token_batch(input_ids: np.ndarray, context_length: int) -> np.ndarray:
    """``input_ids`` as a C-contiguous int64 ``[N, context_length]`` array with N >= 1."""
    ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] != context_length:
        raise ValueError(f"input_ids must be a non-empty [N,{context_length}] array, got {ids.shape}")
    return ids
