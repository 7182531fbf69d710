"""A Llama-family decoder in plain torch whose attention writes and reads a StreamingKVCache.

    from kvcore.model import CausalLM
    lm = CausalLM.from_pretrained("/models/llama-2-7b", dtype="float16", device="cuda:0",
                                  cache_dtype="float16", max_positions=16384 + 256)
    out = lm.generate(input_ids, max_new_tokens=32)      # [1, T] -> [1, T + 32], greedy
    logits = lm.prefill(input_ids)                       # [1, T] -> [1, vocab] float32 (last position)
    logits = lm.decode(token)                            # [1, 1] -> [1, vocab]: one position

Architecture (LlamaForCausalLM, and MistralForCausalLM without a sliding window smaller
than the cache): token embedding; per layer RMSNorm -> q/k/v projections -> rotary
embeddings (plain, or Llama 3's rope scaling, `rope_parameters` / `rope_scaling` with
rope_type "llama3") -> grouped-query attention over the cache -> o projection -> residual;
RMSNorm -> SwiGLU MLP (down(silu(gate(x)) * up(x))) -> residual; final RMSNorm; lm_head
(tied to the embedding or not). The arithmetic follows transformers' Llama op for op (RMSNorm
in float32 then cast, cos/sin in float32 then cast, projections in the weights' dtype), so
float32 logits agree to rounding and greedy tokens match (tests/kvcore/test_model.py).
transformers is never imported here: configs are read as plain dicts (a transformers config
object works too, through its `to_dict()`), weights with safetensors (imported lazily).

Key decisions:
- Positions after eviction (window = sinks + ring smaller than the sequence): ABSOLUTE
  positions. A token at position p is rotated at p, its key is stored rotated, and the query
  at p attends to the keys the cache holds: the sinks (positions < s) and the last
  R = max_positions - s positions (p - R, p]. Relative distances stay true, as the ring holds
  them; positions simply grow past the window (StreamingLLM's re-numbering within the cache
  is not used: it would need un-rotated keys and a rotation per read). Prefill applies the
  same rule inside a chunk with a mask, so chunking never changes what a position sees.
- Prefill runs in chunks (`chunk_size`, default PREFILL_CHUNK): each chunk goes through
  every layer; a layer writes its keys/values into the cache (`write_ahead`; the positions
  count once every layer has them) and attends to its window plus the chunk (causal, within
  the window rule). While nothing is evicted the window is the cache's own slots [0, c + T)
  in place (float storage: no copy of the past; 8/4-bit storage: the past dequantized);
  past the window's edge the layer's window is read (`get_valid`) before its slots are
  overwritten. On CUDA, while nothing is evicted, the mask is SDPA's lower-right causal
  bias (its fused kernels run it); elsewhere, or for a chunk that crosses the window's
  edge, an explicit window mask (the same keys).
  Within a chunk the chunk's keys are used before the cache's rounding (quantized caches:
  later tokens see them dequantized).
- Decode: one position through every layer. "cuda_graph" (default on CUDA with Triton): the
  whole step (embedding, projections, rotary at the position read from the cache's device
  counter, the write at that counter, the attention over the device count, the MLP of every
  layer, the logits into a static buffer) is captured once and replayed per token through
  the cache's public device-counter methods. "counter": the same launches run eagerly (any
  device; the CPU test of the graph's logic). "eager": `cache.append` + `cache.attend` per
  layer at the host count (default on CPU).
- On CUDA (with Triton) the norms (residual add fused in), the rotary embedding and the
  SwiGLU activation are one Triton launch each (kvcore/triton_model.py; `lm.fused_ops`,
  settable; False gives the torch ops): a 7B layer is then about 13 launches instead of 45
  (with the fused projections: 4 GEMVs, the cache write, 2 attention launches, 2 rotary,
  2 norms, 1 activation). In the decode step (float, int8 or float8 cache), the rotary of q
  and k and the write of k and v at the device counter are one launch (`rotary_store_`): 11 a
  layer. `lm.swiglu_in_gemv = True` (with the Triton GEMV as `lm.linear`) runs the SwiGLU
  activation inside the down projection's GEMV (`triton_gemv.swiglu_linear`), one launch fewer,
  off by default: on an H200 that GEMV read slower than the launch it saves.
- Weights are plain tensors with transformers' names (`state_dict()`), never copied when
  given on the right device and dtype, so a transformers model can share them (the peer
  measurement). Fused projections (`fuse_projections`, default True on CUDA, False
  elsewhere): q/k/v are concatenated into one [(H + 2 Hkv) D, hidden] matrix and gate/up
  into one [2 I, hidden], so a layer runs 4 projections instead of 7, at decode (one GEMV
  of 12,288 and one of 22,016 rows at the 7B shape: fewer launches in the graph, each in
  the GEMV's better regime of many rows) and at prefill (larger GEMMs). That is a copy of
  those five matrices: the given tensors of q/k/v/gate/up are no longer held by the model
  (a peer that shares the rest keeps its own originals); `held_weight_bytes()` counts what
  the model holds, each storage once, and `bytes_not_held(tensors)` what of a peer's
  tensors is the peer's alone. `lm.linear` (default torch.nn.functional.linear) computes
  every projection and the lm_head: a faster GEMV can be plugged in.
- Caller mistakes (bad folders, unsupported architectures, bad shapes or tensors) raise a
  ValueError that says what and why.

Run the tests: `python -m pytest tests/kvcore/test_model.py -q` (GPU: add `-m gpu`).
GPU check at the 7B shape against transformers: `python -m kvcore.model --check-gpu --out
model_check.json` (kvcore/model_check.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from kvcore.cache import StreamingKVCache
from kvcore.capture import capture
from kvcore.storage import FLOAT_DTYPES, INT4, parse_dtype

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
MODEL_TYPES = ("llama", "mistral")
DECODE_METHODS = ("cuda_graph", "counter", "eager")
# Positions per prefill chunk: GEMMs of 4,096 rows run at full speed, and at the 7B shape a
# chunk's activations stay under ~0.5 GB with a float32 cache (no copy of the past is made).
PREFILL_CHUNK = 4096


# ---------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ModelConfig:
    """The shape and constants of a Llama-family model (names follow transformers' config).

    rope_scaling: None (plain rotary) or the Llama 3 parameters {"factor",
    "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default=None, hash=False, compare=True)
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral's; None for Llama

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"model config: {name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model config: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim must be even for rotary embeddings, got "
                             f"{self.head_dim}")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError(f"model config: rms_norm_eps and rope_theta must be > 0, got "
                             f"{self.rms_norm_eps} and {self.rope_theta}")

    @classmethod
    def from_hf(cls, config: object) -> ModelConfig:
        """From a transformers config object (LlamaConfig, ...), a dict of its keys (a
        config.json), or a ModelConfig. ValueError for an unsupported architecture."""
        if isinstance(config, ModelConfig):
            return config
        if hasattr(config, "to_dict") and not isinstance(config, Mapping):
            config = config.to_dict()
        if not isinstance(config, Mapping):
            raise ValueError(f"config must be a transformers config, a dict of its keys or a "
                             f"ModelConfig, got {type(config).__name__}")
        c = dict(config)
        archs = c.get("architectures") or []
        model_type = c.get("model_type")
        if archs and not set(archs) & set(ARCHITECTURES):
            raise ValueError(f"unsupported architecture {archs}: kvcore.model runs "
                             f"{list(ARCHITECTURES)} (Llama-family decoders)")
        if model_type is not None and model_type not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}: kvcore.model runs "
                             f"{list(MODEL_TYPES)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in c:
                raise ValueError(f"config is missing {key!r}, which a Llama-family config has")
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {c['hidden_act']!r}: the SwiGLU MLP uses silu")
        if c.get("attention_bias") or c.get("mlp_bias"):
            raise ValueError("unsupported: attention_bias / mlp_bias (Llama-family projections "
                             "have no bias)")
        num_heads = c["num_attention_heads"]
        num_kv_heads = c.get("num_key_value_heads") or num_heads
        head_dim = c.get("head_dim") or (c["hidden_size"] // num_heads)
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        if rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("unsupported: partial_rotary_factor != 1 (rotary over part of a head)")
        if rope_type == "default":
            scaling = None
        elif rope_type == "llama3":
            try:
                scaling = {
                    "factor": float(rope["factor"]),
                    "low_freq_factor": float(rope["low_freq_factor"]),
                    "high_freq_factor": float(rope["high_freq_factor"]),
                    "original_max_position_embeddings": int(
                        rope.get("original_max_position_embeddings")
                        or c["max_position_embeddings"]),
                }
            except KeyError as missing:
                raise ValueError(f"llama3 rope scaling needs {missing}, got {rope}") from None
        else:
            raise ValueError(f"unsupported rope_type {rope_type!r}: kvcore.model supports "
                             f"'default' and 'llama3'")
        tie = c.get("tie_word_embeddings", False)
        return cls(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
            num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            rope_scaling=scaling, tie_word_embeddings=bool(tie),
            sliding_window=c.get("sliding_window"),
        )

    def to_hf(self) -> dict:
        """The transformers LlamaConfig keys of this shape (for a reference model)."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, **self.rope_scaling}
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope, "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        }


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """transformers' parameter names of the model -> shapes (lm_head absent when tied)."""
    E, I, H, Hkv, D = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, E)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (E,),
            p + "self_attn.q_proj.weight": (H * D, E),
            p + "self_attn.k_proj.weight": (Hkv * D, E),
            p + "self_attn.v_proj.weight": (Hkv * D, E),
            p + "self_attn.o_proj.weight": (E, H * D),
            p + "post_attention_layernorm.weight": (E,),
            p + "mlp.gate_proj.weight": (I, E),
            p + "mlp.up_proj.weight": (I, E),
            p + "mlp.down_proj.weight": (E, I),
        })
    shapes["model.norm.weight"] = (E,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, E)
    return shapes


# ---------------------------------------------------------------------------- math


def inverse_frequencies(cfg: ModelConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rotary inverse frequencies [head_dim / 2] float32, Llama 3 scaling applied if set
    (transformers' `_compute_llama3_parameters`, op for op)."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).to(torch.float) / D))
    s = cfg.rope_scaling
    if s is not None:
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq.to(device)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim] of `dtype` at integer positions [T] (a device tensor: no host
    read, so a graph can take the position from the cache's counter)."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, D/2] float32
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated: x * cos + rotate_half(x) * sin (cos/sin [T, D])."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in float32, cast back, scale."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, max_positions: int,
                sink_positions: int) -> torch.Tensor:
    """Which keys each query sees under the cache's window rule: [Tq, Tk] bool.

    Query at absolute position p sees key position j iff j <= p and (j < s or j > p - R),
    R = max_positions - s: the sinks and the last R positions, itself included.
    """
    ring = max_positions - sink_positions
    q, k = query_pos[:, None], key_pos[None, :]
    return (k <= q) & ((k < sink_positions) | (k > q - ring))


# ---------------------------------------------------------------------------- the model


@dataclass
class LayerWeights:
    """One decoder layer's tensors: projections [out, in] (y = x @ w.T), norms [hidden]."""

    input_norm: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    post_norm: torch.Tensor
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    wqkv: torch.Tensor | None = None  # [wq; wk; wv] after fuse_projections (wq.. are views of it)
    w_gate_up: torch.Tensor | None = None  # [w_gate; w_up] likewise


_LAYER_NAMES = {
    "input_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight", "post_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight",
}


class CausalLM:
    """A Llama-family causal LM decoding through a StreamingKVCache (see the module docstring).

    Build it with `from_pretrained`, `from_config` or `from_state_dict`. Attributes: `config`
    (ModelConfig), `cache` (StreamingKVCache), `dtype`, `device`, `linear` (settable hook:
    (x, weight) -> x @ weight.T for every projection and the lm_head), `decode_method`
    (settable: "cuda_graph", "counter" or "eager"), `fused_ops` (settable bool: the Triton
    norm/rotary/activation kernels; default where the cache's Triton writes run),
    `projections_fused` (the constructor's `fuse_projections`: default True on CUDA).
    A captured graph is kept per (attention backend, linear, fused_ops).
    """

    def __init__(self, config: ModelConfig, weights: Mapping[str, torch.Tensor], *,
                 dtype: str = "float32", device: str = "cpu", cache_dtype: str | None = None,
                 max_positions: int = 4096, sink_positions: int = 0,
                 decode_method: str | None = None, fuse_projections: bool | None = None) -> None:
        self.config = cfg = ModelConfig.from_hf(config)
        self.dtype = parse_dtype(dtype, FLOAT_DTYPES, "dtype")
        cache_dtype = dtype if cache_dtype is None else cache_dtype
        self.cache = StreamingKVCache(
            num_layers=cfg.num_layers, max_positions=max_positions, num_heads=cfg.num_heads,
            head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads, dtype=cache_dtype,
            device=device, sink_positions=sink_positions, out_dtype=dtype)
        if cfg.sliding_window is not None and cfg.sliding_window < max_positions:
            raise ValueError(
                f"unsupported: sliding_window={cfg.sliding_window} is smaller than max_positions="
                f"{max_positions}; the cache's window is its own (sinks + ring): pass "
                f"max_positions <= {cfg.sliding_window} with sink_positions=0 to model it")
        self.device = self.cache.device
        self._kv_dtype = self.cache.out_dtype  # what the cache takes and attention returns
        self._set_weights(weights)
        if fuse_projections is None:
            fuse_projections = self.device.type == "cuda"  # module docstring: where it helps
        if not isinstance(fuse_projections, bool):
            raise ValueError(f"fuse_projections must be True, False or None (True on CUDA), got "
                             f"{fuse_projections!r}")
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        if fuse_projections:
            self.fuse_projections()
        self.linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear
        self._inv_freq = inverse_frequencies(cfg, self.device)
        self._token = torch.zeros((1, 1), dtype=torch.long, device=self.device)  # static input
        self._logits = torch.zeros((1, cfg.vocab_size), dtype=torch.float32, device=self.device)
        self._n_valid = torch.zeros((), dtype=torch.long, device=self.device)
        self._decode_method = "eager"
        # Triton ops for the norms, rotary and activation: CUDA with Triton (or the interpreter)
        self.fused_ops = self.cache.fused_writes
        # SwiGLU inside the down projection's GEMV (where `linear` carries `swiglu`): off by
        # default, as it measured slower on an H200 than the GEMV plus the activation kernel
        # (7B shape, 16K: 3.66 against 3.47 ms of linear per token; docs/results/h200-2026-12-02.md)
        self.swiglu_in_gemv = False
        if decode_method is None:
            graph_ok = self.device.type == "cuda" and self.cache.fused_writes
            decode_method = "cuda_graph" if graph_ok else "eager"
        self.decode_method = decode_method

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_state_dict(cls, config: object, state_dict: Mapping[str, torch.Tensor], **kwargs) -> CausalLM:
        """From tensors with transformers' names; those already on the device and in dtype are
        used without a copy (but for q/k/v/gate/up when the projections are fused: the
        default on CUDA). kwargs: dtype, device, cache_dtype, max_positions, sink_positions,
        decode_method, fuse_projections."""
        return cls(config, state_dict, **kwargs)

    @classmethod
    def from_config(cls, config: object, *, seed: int = 0, **kwargs) -> CausalLM:
        """Random weights at the config's shape (any shape), made on the device: projections
        and embeddings normal with std 0.02 (transformers' initializer_range), norms 1."""
        cfg = ModelConfig.from_hf(config)
        dtype = parse_dtype(kwargs.get("dtype", "float32"), FLOAT_DTYPES, "dtype")
        device = kwargs.get("device", "cpu")
        StreamingKVCache(1, 1, 1, 2, device=device)  # a clear ValueError for a bad device first
        gen = torch.Generator(device=device).manual_seed(seed)
        weights = {}
        for name, shape in parameter_shapes(cfg).items():
            if name.endswith("norm.weight"):
                weights[name] = torch.ones(shape, dtype=dtype, device=device)
            else:
                w = torch.empty(shape, dtype=dtype, device=device)
                weights[name] = w.normal_(0.0, 0.02, generator=gen)
        return cls(cfg, weights, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> CausalLM:
        """From a local transformers folder: config.json and *.safetensors (one file, or
        shards with model.safetensors.index.json). No network. kwargs as from_state_dict."""
        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"checkpoint folder {str(folder)!r} does not exist or is not a "
                             f"directory; pass a local folder written by save_pretrained")
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{str(folder)!r} has no config.json; a transformers checkpoint "
                             f"folder holds config.json and *.safetensors")
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_file} is not valid JSON: {error}") from None
        cfg = ModelConfig.from_hf(config)
        files = sorted(folder.glob("*.safetensors"))
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({folder / name for name in weight_map.values()})
            absent = [str(f.name) for f in files if not f.is_file()]
            if absent:
                raise ValueError(f"{index.name} names shards that are missing: {absent}")
        if not files:
            raise ValueError(f"{str(folder)!r} has no *.safetensors files (only safetensors "
                             f"checkpoints are read; convert .bin weights with save_pretrained)")
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise ImportError("from_pretrained reads safetensors: pip install safetensors") from error
        device = str(kwargs.get("device", "cpu"))
        StreamingKVCache(1, 1, 1, 2, device=device)  # a clear ValueError for a bad device first
        dtype = parse_dtype(kwargs.get("dtype", "float32"), FLOAT_DTYPES, "dtype")
        wanted = set(parameter_shapes(cfg))
        weights = {}
        for file in files:
            for name, tensor in load_file(str(file), device=device).items():
                if name in wanted:
                    weights[name] = tensor.to(dtype)
        return cls(cfg, weights, **kwargs)

    def _set_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        cfg = self.config
        shapes = parameter_shapes(cfg)
        missing = [n for n in shapes if n not in weights]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(f"weights are missing {len(missing)} tensors: {missing[:5]}{more} "
                             f"(transformers' names; tie_word_embeddings={cfg.tie_word_embeddings})")
        params = {}
        for name, shape in shapes.items():
            w = weights[name]
            if not isinstance(w, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
            if tuple(w.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)} for this config, got "
                                 f"{list(w.shape)}; check the config against the checkpoint")
            if not w.is_floating_point():
                raise ValueError(f"{name} must be floating point, got {w.dtype}")
            params[name] = w.detach().to(device=self.device, dtype=self.dtype)  # no copy if already so
        self.embed = params["model.embed_tokens.weight"]  # [vocab, hidden]
        self.layers = [
            LayerWeights(**{f: params[f"model.layers.{i}.{n}"] for f, n in _LAYER_NAMES.items()})
            for i in range(cfg.num_layers)
        ]
        self.norm = params["model.norm.weight"]
        self.lm_head = self.embed if cfg.tie_word_embeddings else params["lm_head.weight"]

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Concatenate each layer's q/k/v weights into one [(H + 2 Hkv) D, hidden] matrix and
        gate/up into one [2 I, hidden]: 4 projections per layer instead of 7 (fewer, larger
        GEMVs per token). The separate weights become views of the fused ones (state_dict
        still gives them under transformers' names). A copy, made one layer at a time: the
        given tensors are no longer shared (their memory is freed unless the caller holds
        them). Idempotent; captured graphs are dropped."""
        for layer in self.layers:
            if layer.wqkv is None:
                sizes = [layer.wq.shape[0], layer.wk.shape[0], layer.wv.shape[0]]
                layer.wqkv = torch.cat([layer.wq, layer.wk, layer.wv])
                layer.wq, layer.wk, layer.wv = layer.wqkv.split(sizes)
            if layer.w_gate_up is None:
                layer.w_gate_up = torch.cat([layer.w_gate, layer.w_up])
                layer.w_gate, layer.w_up = layer.w_gate_up.split(layer.w_gate.shape[0])
        self._graphs.clear()

    @property
    def projections_fused(self) -> bool:
        """Whether every layer runs fused q/k/v and gate/up projections."""
        return all(layer.wqkv is not None and layer.w_gate_up is not None for layer in self.layers)

    def projection_matrices(self) -> list[torch.Tensor]:
        """The matrices a decoded token multiplies, in order: per layer q/k/v (one fused
        matrix, or three), o, gate/up (one, or two), down; then the lm_head. What `linear`
        is given (e.g. to prepare or time the GEMV at the shapes the model really runs)."""
        mats = []
        for layer in self.layers:
            mats += [layer.wqkv] if layer.wqkv is not None else [layer.wq, layer.wk, layer.wv]
            mats.append(layer.wo)
            mats += [layer.w_gate_up] if layer.w_gate_up is not None else [layer.w_gate, layer.w_up]
            mats.append(layer.w_down)
        return mats + [self.lm_head]

    def _storages(self) -> dict[int, int]:
        """data pointer -> bytes of every storage the model's weights live in (each once)."""
        tensors = list(self.state_dict().values())
        tensors += [t for layer in self.layers for t in (layer.wqkv, layer.w_gate_up) if t is not None]
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}

    def held_weight_bytes(self) -> int:
        """Bytes of the weights the model holds: every storage its tensors live in, once (a tied
        table once; fused projections as their fused copies, the given originals not at all)."""
        return sum(self._storages().values())

    def bytes_not_held(self, tensors) -> int:
        """Bytes of the storages of `tensors` (e.g. a peer's parameters) that the model does not
        hold: with weights shared with a peer, the peer's own share (its q/k/v/gate/up
        originals once the model fused its copies; 0 if it shares everything)."""
        held = self._storages()
        seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(n for ptr, n in seen.items() if ptr not in held)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under transformers' names (the tensors themselves, no copy)."""
        out = {"model.embed_tokens.weight": self.embed}
        for i, layer in enumerate(self.layers):
            for f, n in _LAYER_NAMES.items():
                out[f"model.layers.{i}.{n}"] = getattr(layer, f)
        out["model.norm.weight"] = self.norm
        if not self.config.tie_word_embeddings:
            out["lm_head.weight"] = self.lm_head
        return out

    def weight_bytes(self) -> int:
        """Bytes of weights read per decoded token: every layer, the final norm and the
        lm_head, plus one embedding row (the embedding table is otherwise not read; a tied
        lm_head counts once, as the lm_head)."""
        per_layer = sum(getattr(layer, f).nbytes for layer in self.layers for f in _LAYER_NAMES)
        row = self.embed[0].nbytes
        return per_layer + self.norm.nbytes + self.lm_head.nbytes + row

    def __repr__(self) -> str:
        c = self.config
        return (f"CausalLM(layers={c.num_layers}, hidden={c.hidden_size}, heads={c.num_heads}/"
                f"{c.num_kv_heads}, head_dim={c.head_dim}, vocab={c.vocab_size}, "
                f"dtype={str(self.dtype)[6:]}, device={self.device}, cache={self.cache!r})")

    # ------------------------------------------------------------------ public steps

    @property
    def decode_method(self) -> str:
        """How `decode` runs: "cuda_graph", "counter" or "eager" (module docstring)."""
        return self._decode_method

    @decode_method.setter
    def decode_method(self, method: str) -> None:
        if method not in DECODE_METHODS:
            raise ValueError(f"decode_method must be one of {list(DECODE_METHODS)}, got {method!r}")
        if method == "cuda_graph" and self.device.type != "cuda":
            raise ValueError(f"decode_method='cuda_graph' needs a CUDA device, got {self.device}; "
                             f"use 'eager' or 'counter'")
        if method != "eager" and self.device.type != "cuda":
            # The counter path attends over every slot with a mask: slots past the count must
            # hold finite values, as on CUDA (zero-initialised).
            self.cache.storage.zero_()
        self._decode_method = method

    def reset(self) -> None:
        """Empty the cache (positions back to 0); the memory and captured graphs stay."""
        self.cache.clear()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, chunk_size: int = PREFILL_CHUNK) -> torch.Tensor:
        """Append T positions: input_ids [1, T] -> logits of the last one [1, vocab] float32.
        Continues after what the cache holds (call `reset()` for a new sequence)."""
        ids = self.check_input_ids(input_ids, "input_ids")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        hidden = None
        for start in range(0, ids.shape[1], chunk_size):
            hidden = self._prefill_chunk(ids[0, start:start + chunk_size])
        return self.linear(hidden[-1:], self.lm_head).to(torch.float32)

    @torch.no_grad()
    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """Append one position: token [1, 1] LongTensor on the model's device -> logits
        [1, vocab] float32. With "cuda_graph" one replay; the result is then a static buffer
        that the next decode overwrites (clone it to keep it)."""
        if not (isinstance(token, torch.Tensor) and token.shape == (1, 1)
                and token.dtype == torch.long and token.device == self.device):
            got = (type(token).__name__ if not isinstance(token, torch.Tensor)
                   else f"{token.dtype} {list(token.shape)} on {token.device}")
            raise ValueError(f"token must be a torch.long tensor of shape [1, 1] on {self.device}, "
                             f"got {got}")
        self.cache.check_complete("decode")
        if self._decode_method == "eager":
            return self._decode_eager(token)
        self._token.copy_(token)
        if self._decode_method == "counter":
            self._decode_body(advance=True)
        else:
            graph = self._graph()
            self.cache.position_counter()  # refilled where prefill (or any host path) moved it
            graph.replay()
        self.cache.commit_counted(1)
        return self._logits

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32,
                 chunk_size: int = PREFILL_CHUNK) -> torch.Tensor:
        """Greedy: [1, T] -> [1, T + max_new_tokens]; resets the cache first (kvcore/generate.py)."""
        from kvcore.generate import greedy

        return greedy(self, input_ids, max_new_tokens, chunk_size=chunk_size)

    # ------------------------------------------------------------------ prefill

    def _prefill_chunk(self, ids: torch.Tensor) -> torch.Tensor:
        """Run positions [c, c + T) (c = positions the cache holds) through every layer,
        writing each layer's keys/values into the cache as it goes (`write_ahead`, counted
        at the end). Returns the final normed hidden states [T, hidden].

        While nothing is evicted (c + T <= max_positions) slot p holds position p: a layer
        writes the chunk first, then attends over its slots [0, c + T) in place (float
        storage: views, no copy of the past; 8/4-bit storage: the past dequantized, then the
        chunk's own keys as computed). Past the window's edge the layer's window is read
        first (`get_valid`, a copy where the ring wrapped), the chunk's keys appended, and
        only then the chunk written over the evicted slots."""
        cache, kv_dtype = self.cache, self._kv_dtype
        T = ids.shape[0]
        first = cache.total_appended
        positions = torch.arange(first, first + T, device=self.device)
        in_place = first + T <= cache.max_positions
        if in_place and first == 0:
            mask = None  # causal
        elif in_place and self.device.type == "cuda":
            # causal aligned at the end, which SDPA's fused kernels run
            # (imported here: torch.nn.attention.bias loads triton)
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(T, first + T)
        else:
            past_pos = cache.positions().to(self.device)  # [n_past], oldest first (get_valid's order)
            key_pos = torch.cat([past_pos, positions])
            mask = window_mask(positions, key_pos, cache.max_positions, cache.sink_positions)
        in_store = not cache.quantized  # the store holds exactly the keys given

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k, v, q = k.to(kv_dtype), v.to(kv_dtype), q.to(kv_dtype)
            if in_place:
                cache.write_ahead(i, k, v)
                if in_store:
                    keys, values = cache.read_slots(i, first + T)  # views
                elif first:
                    past_k, past_v = cache.read_slots(i, first)  # dequantized
                    keys, values = torch.cat([past_k, k]), torch.cat([past_v, v])
                else:
                    keys, values = k, v
                return self._prefill_attention(q, keys, values, mask)
            if first:
                past_k, past_v = cache.get_valid(i)  # [n_past, Hkv, D]
                keys, values = torch.cat([past_k, k]), torch.cat([past_v, v])
            else:
                keys, values = k, v
            out = self._prefill_attention(q, keys, values, mask)
            cache.write_ahead(i, k, v)  # over slots this layer no longer reads
            return out

        x = self._layers(F.embedding(ids, self.embed), positions, attend)
        cache.commit_ahead()
        return x

    def _prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: object) -> torch.Tensor:
        """q [T, H, D] over k/v [n, Hkv, D] -> [T, H, D]. mask: None (causal, n == T), a
        lower-right causal bias (the chunk after n - T past positions: SDPA's fused kernels
        take it), or a [T, n] bool window mask (positions evicted within the chunk)."""
        group = q.shape[1] // k.shape[1]
        if group > 1:  # expanded, so every SDPA backend (masked ones included) takes it
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=mask, is_causal=mask is None, scale=self.cache.sm_scale)  # [1, H, T, D]
        return out[0].transpose(0, 1)

    # ------------------------------------------------------------------ decode

    def _decode_eager(self, token: torch.Tensor) -> torch.Tensor:
        """One position through append + attend per layer, at the host count."""
        cache, kv_dtype = self.cache, self._kv_dtype
        position = torch.full((1,), cache.total_appended, dtype=torch.long, device=self.device)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.append(i, k[0].to(kv_dtype), v[0].to(kv_dtype))
            return cache.attend(i, q[0].to(kv_dtype))[None]  # [1, H, D]

        x = self._layers(F.embedding(token[0], self.embed), position, attend)
        return self.linear(x, self.lm_head).to(torch.float32)

    def _decode_body(self, advance: bool) -> None:
        """One position at the cache's device counter, every launch capturable: what the CUDA
        graph replays. Reads the static token, writes the static logits; `advance` moves the
        device counter (the caller commits the position on the host)."""
        cache, kv_dtype = self.cache, self._kv_dtype
        count = cache.position_counter()  # the position being written
        torch.add(count, 1, out=self._n_valid)  # valid slots once it is written

        # with the Triton ops (float, int8 or float8 storage): rotary of q and k and the write
        # of k and v, one launch per layer (q, k unrotated here: _layers leaves the rotation)
        fused = self.fused_ops and cache.dtype != INT4

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
            if fused:
                from kvcore.triton_model import rotary_store_

                k_store, v_store, k_scale, v_scale = cache.storage.layer(i)
                rotary_store_(q[0], k[0], v[0], cos, sin, k_store, v_store, count,
                              cache.sink_positions, k_scale, v_scale)
            else:
                cache.write_at_counter(k[0].to(kv_dtype), v[0].to(kv_dtype), layer=i)
            return cache.attend_slots(i, q[0].to(kv_dtype), self._n_valid)[None]  # [1, H, D]

        x = self._layers(F.embedding(self._token[0], self.embed), count.view(1), attend,
                         rotate_in_attend=fused)
        if advance:
            cache.advance_counter()
        self._logits.copy_(self.linear(x, self.lm_head))

    def _graph(self) -> torch.cuda.CUDAGraph:
        """The captured decode step for the current attention backend and linear hook: warm
        up once on a side stream (compiles every kernel; writes the same slot the first
        replay rewrites, and does not move the counter), then capture."""
        key = (self.cache.attention_fn, self.linear, self.fused_ops, self.swiglu_in_gemv)
        graph = self._graphs.get(key)
        if graph is None:
            self.cache.position_counter()  # in step with the host before capture
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._decode_body(advance=False)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            torch.cuda.synchronize(self.device)
            graph = self._graphs[key] = capture(lambda: self._decode_body(advance=True))
        return graph

    # ------------------------------------------------------------------ shared pieces

    def _layers(self, h: torch.Tensor, positions: torch.Tensor,
                attend: Callable[..., torch.Tensor], rotate_in_attend: bool = False) -> torch.Tensor:
        """Every decoder layer over hidden states h [T, hidden] at positions [T] (a device
        tensor), then the final norm -> [T, hidden]. attend(layer, q [T, H, D], k, v
        [T, Hkv, D]) hands K/V to the cache and returns the attention [T, H, D]; with
        `rotate_in_attend` q and k come unrotated, with cos=, sin= [T, D] to rotate them.
        Each residual add is fused into the next norm (one launch with the Triton ops)."""
        cfg, linear = self.config, self.linear
        T, H, Hkv, D = h.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if rotate_in_attend:
            cos, sin = rotary_cos_sin(positions, self._inv_freq, self.dtype)  # once for every layer
        else:
            rotate = self._rotation(positions)
        # a linear hook may carry `swiglu(gate, up, w)`: linear(silu(gate) * up, w) in one
        # launch, or None where it does not apply (kvcore.triton_gemv's GEMV at one row)
        swiglu = getattr(linear, "swiglu", None) if self.fused_ops and self.swiglu_in_gemv else None
        y = None  # the MLP output not yet added to h
        I = cfg.intermediate_size
        for i, layer in enumerate(self.layers):
            h, x = self._add_norm(h, y, layer.input_norm)
            if layer.wqkv is None:
                q, k, v = linear(x, layer.wq), linear(x, layer.wk), linear(x, layer.wv)
            else:  # one projection, then views: q [T, H*D], k and v [T, Hkv*D]
                q, k, v = linear(x, layer.wqkv).split([H * D, Hkv * D, Hkv * D], dim=-1)
            if rotate_in_attend:
                attn = attend(i, q.view(T, H, D), k.view(T, Hkv, D), v.view(T, Hkv, D),
                              cos=cos, sin=sin).to(self.dtype)
            else:
                q = rotate(q.view(T, H, D))
                k = rotate(k.view(T, Hkv, D))
                attn = attend(i, q, k, v.view(T, Hkv, D)).to(self.dtype)
            h, x = self._add_norm(h, linear(attn.reshape(T, H * D), layer.wo), layer.post_norm)
            if layer.w_gate_up is None:
                gate, up = linear(x, layer.w_gate), linear(x, layer.w_up)
            else:
                gate, up = linear(x, layer.w_gate_up).split([I, I], dim=-1)
            y = None if swiglu is None else swiglu(gate, up, layer.w_down)
            if y is None:
                y = linear(self._act(gate, up), layer.w_down)
        return self._add_norm(h, y, self.norm)[1]

    def _add_norm(self, h: torch.Tensor, y: torch.Tensor | None,
                  weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + y, RMSNorm(h + y)); with the Triton ops h is updated in place."""
        eps = self.config.rms_norm_eps
        if self.fused_ops:
            from kvcore.triton_model import add_rms_norm

            return h, add_rms_norm(h, None if y is None else y.contiguous(), weight, eps)
        if y is not None:
            h = h + y
        return h, rms_norm(h, weight, eps)

    def _rotation(self, positions: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The rotary embedding at positions [T], for q or k [T, heads, D]."""
        cos, sin = rotary_cos_sin(positions, self._inv_freq, self.dtype)  # once for every layer
        if self.fused_ops:
            from kvcore.triton_model import rotary_

            return lambda x: rotary_(x, cos, sin)
        return lambda x: apply_rotary(x, cos, sin)

    def _act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.fused_ops:
            from kvcore.triton_model import silu_mul

            return silu_mul(gate, up)  # row-strided halves of the fused gate/up: no copy
        return F.silu(gate) * up

    def check_input_ids(self, ids: object, name: str) -> torch.Tensor:
        if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[0] == 1
                and ids.shape[1] >= 1 and ids.dtype == torch.long):
            got = (type(ids).__name__ if not isinstance(ids, torch.Tensor)
                   else f"{ids.dtype} {list(ids.shape)}")
            raise ValueError(f"{name} must be a torch.long tensor of shape [1, T] (T >= 1, batch "
                             f"1), got {got}")
        ids = ids.to(self.device)
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"{name} must be token ids in [0, {self.config.vocab_size}), got "
                             f"values in [{low}, {high}]")
        return ids


def config_dict(cfg: ModelConfig) -> dict:
    """A ModelConfig as plain values (for records)."""
    return asdict(cfg)


if __name__ == "__main__":
    import sys

    from kvcore.model_check import main

    sys.exit(main())
