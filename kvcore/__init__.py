"""kvcore: a streaming KV cache for long-context LLM inference, in torch (CPU and CUDA).

    from kvcore import StreamingKVCache

Modules: `slots` (ring-slot index math on ints), `storage` (dtypes and 8-bit quantization),
`cache` (StreamingKVCache), `attention` (torch decode attention and a float64 reference).
Imports only torch and the standard library; Triton is imported lazily on CUDA paths only.

Run the tests: `python -m pytest tests/kvcore -q`.
"""

from kvcore.cache import StreamingKVCache

__all__ = ["StreamingKVCache"]
