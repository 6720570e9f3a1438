"""The black-box interface FedPT's server uses to reach the large model: next-token logits only.

A `LogitsProvider` answers one question: given a batch of contexts, what are the next-token logits?
It never exposes weights, hidden states or gradients, so a remote inference service can implement
it. The contract, for a batch of B rows:

    logits, state = provider.next_token_logits(input_ids, attention_mask, state)

- first call (`state is None`): `input_ids` [B, T] are the whole contexts, left-padded;
  `attention_mask` [B, T] is 1 on real tokens, 0 on padding;
- later calls: `input_ids` [B, n] are only the n tokens appended since the previous call (n is
  usually 1), `attention_mask` [B, T + n] covers the whole context so far (past + new), and
  `state` is exactly what the previous call returned;
- `logits` [B, V] (float) are the scores for the token after the last position of each row;
  `state` is opaque to the caller: a local model keeps its KV cache there, a stateless remote
  client can keep the token ids so far and resend the whole context each call (see
  `StatelessProvider`), a stateful one a session id.

`sequence_logits(input_ids, attention_mask)` → [B, T, V] (scores after every position, as a
causal LM's forward returns) is derived from `next_token_logits` by feeding one position at a
time; `LocalLogitsProvider` overrides it with one forward pass. `vocab_size` is the number of
logit columns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from thinwire.models import vocab_rows


def position_ids(attention_mask: torch.Tensor, new: int) -> torch.Tensor:
    """Positions of the last `new` tokens, counting only real tokens (left padding gets 1, like HF)."""
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 1)
    return pos[:, -new:]


class LogitsProvider(ABC):
    """Next-token logits for batches of contexts; see the module docstring for the contract."""

    vocab_size: int

    @abstractmethod
    def next_token_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          state: Any = None) -> tuple[torch.Tensor, Any]:
        """[B, V] logits of the token after each row's last position, and the state for the next call."""

    def sequence_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, V] logits after every position (teacher forcing), one next-token query per position."""
        state, out = None, []
        for t in range(input_ids.shape[1]):
            logits, state = self.next_token_logits(input_ids[:, t : t + 1], attention_mask[:, : t + 1], state)
            out.append(logits)
        return torch.stack(out, dim=1)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


class LocalLogitsProvider(LogitsProvider):
    """A local Hugging Face causal LM behind the interface, with its KV cache as the state.

    `context` (optional) is a zero-argument callable returning a context manager entered around
    every forward pass: FedPT uses it to run one shared LoRA-wrapped small model as the tuned
    expert (load the expert adapter) or as the pretrained anti-expert (adapter disabled).
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int | None = None,
                 context: Callable[[], AbstractContextManager] | None = None):
        self.model = model
        self.vocab_size = int(vocab_size if vocab_size is not None else vocab_rows(model))
        self.context = context or nullcontext

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def next_token_logits(self, input_ids, attention_mask, state=None):
        device = self.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        with self.context():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids(attention_mask, input_ids.shape[1]),
                             past_key_values=state, use_cache=True)
        return out.logits[:, -1, : self.vocab_size].float(), out.past_key_values

    def sequence_logits(self, input_ids, attention_mask, grad: bool = False):
        device = self.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        with torch.set_grad_enabled(grad), self.context():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids(attention_mask, input_ids.shape[1]), use_cache=False)
        return out.logits[..., : self.vocab_size].float()


class StatelessProvider(LogitsProvider):
    """Adapter for a service that only scores whole contexts: `score(input_ids, attention_mask) -> [B, V]`.

    The state is the context so far, resent in full at every call (no server-side cache needed).
    """

    def __init__(self, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], vocab_size: int):
        self.score = score
        self.vocab_size = vocab_size

    def next_token_logits(self, input_ids, attention_mask, state=None):
        ids = input_ids if state is None else torch.cat([state, input_ids.to(state.device)], dim=1)
        return self.score(ids, attention_mask)[:, : self.vocab_size].float(), ids
