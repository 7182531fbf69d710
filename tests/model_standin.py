"""A stand-in with kvcore.model.CausalLM's API for tests of the code around the model (the
model benchmark, the orchestrator's bench.decode=model trials): it computes with transformers
itself on the given state dict's very tensors, so its logits equal the peer's, and `noise`
(added to every logit it returns) makes one that differs.

    def test_x(stand_in): ...   # the fixture puts it in sys.modules as kvcore.model
"""

from __future__ import annotations

import sys
import types

import pytest
import torch


class HFBackedLM:
    """CausalLM's API over transformers' own forward pass (a DynamicCache), on the given
    state dict's very tensors; `noise` is added to every logit it returns."""

    noise = 0.0

    def __init__(self, config, state_dict, *, dtype, device, cache_dtype, max_positions, sink_positions=0,
                 fuse_projections=None):
        from transformers import LlamaForCausalLM

        self.model = LlamaForCausalLM(config)
        self.model.load_state_dict(state_dict, assign=True)  # the peer's tensors, not copies
        self.model.eval()
        self.config = config
        d = config.head_dim
        per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * d * 4
        self.cache = types.SimpleNamespace(memory_bytes=lambda: per_position * max_positions)
        self.linear = torch.nn.functional.linear
        self.past = None
        self.projections_fused = False  # transformers' own separate projections

    @classmethod
    def from_state_dict(cls, config, state_dict, **kwargs):
        return cls(config, state_dict, **kwargs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def weight_bytes(self) -> int:
        return sum({p.untyped_storage().data_ptr(): p.nbytes for p in self.model.parameters()}.values())

    def reset(self) -> None:
        from transformers import DynamicCache

        self.past = DynamicCache(config=self.config)

    def _forward(self, ids):
        out = self.model(input_ids=ids, past_key_values=self.past, use_cache=True)
        return out.logits[:, -1] + self.noise

    def prefill(self, input_ids, chunk_size=2048):
        return self._forward(input_ids)

    def decode(self, token):
        return self._forward(token)


@pytest.fixture
def stand_in(monkeypatch):
    """kvcore.model replaced by HFBackedLM for this test (in this process only)."""
    module = types.ModuleType("kvcore.model")
    module.CausalLM = HFBackedLM
    monkeypatch.setitem(sys.modules, "kvcore.model", module)
    monkeypatch.setattr(HFBackedLM, "noise", 0.0)
    return HFBackedLM
