"""Greedy generation with kvcore's model: prefill the prompt in chunks, then one decode per
token, the argmax staying on the device (no host sync per token).

    from kvcore.model import CausalLM
    out = lm.generate(input_ids, max_new_tokens=32)   # or kvcore.generate.greedy(lm, ...)

Run the tests: `python -m pytest tests/kvcore/test_model.py -q -k generate`.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy(lm, input_ids: torch.Tensor, max_new_tokens: int = 32,
           chunk_size: int = 2048) -> torch.Tensor:
    """[1, T] -> [1, T + max_new_tokens] on the model's device: the prompt, then greedy tokens.
    Resets the model's cache first."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    ids = lm.check_input_ids(input_ids, "input_ids")
    T = ids.shape[1]
    out = torch.empty((1, T + max_new_tokens), dtype=torch.long, device=lm.device)
    out[:, :T] = ids
    lm.reset()
    if max_new_tokens == 0:
        return out
    logits = lm.prefill(ids, chunk_size=chunk_size)
    for i in range(max_new_tokens):
        token = out[:, T + i : T + i + 1]  # [1, 1] view
        torch.argmax(logits, dim=-1, keepdim=True, out=token)
        if i + 1 < max_new_tokens:
            logits = lm.decode(token)
    return out
