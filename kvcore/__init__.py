"""kvcore: a streaming KV cache for long-context LLM inference, in torch (CPU and CUDA).

    from kvcore import DecodeStep, StreamingKVCache

Modules: `slots` (ring-slot index math on ints), `ring` (host counts and the device-side
position counter), `storage` (formats, 8-bit quantization, the K/V tensors and their writes
and reads), `cache` (StreamingKVCache, the public front), `capture` (CUDA graph capture),
`attention` (torch decode attention and a float64 reference),
`triton_decode` (the flash-decoding kernel), `triton_store` (fused writes and dequantizing
reads), `graphs` (decode steps as CUDA graphs over the device-side position counter),
`model` (CausalLM: a Llama-family decoder on the cache; `from kvcore.model import CausalLM`),
`generate` (the greedy loop), `triton_model` (the model's fused norm, rotary and activation
kernels), `model_check` (the model against transformers on a GPU, `python -m kvcore.model
--check-gpu`), `bench` (the milestone benchmark, `python -m kvcore.bench`), `profiling`
(per-call costs on a GPU, `python -m kvcore.profiling`).
Imports only torch and the standard library; Triton is imported lazily on CUDA paths only
(safetensors when a checkpoint is read, transformers only by the GPU check).

Run the tests: `python -m pytest tests/kvcore -q`.
"""

from kvcore.cache import StreamingKVCache
from kvcore.graphs import DecodeStep

__all__ = ["DecodeStep", "StreamingKVCache"]
