"""Kernels beside their references, one module per method: `triton_utils` (shared), `hqmq` (encode, fused decode), `dla` (Tensor Cache scan, sliding window)."""
