"""Proxy-tuning (Liu et al. 2024) over three logits providers, and saving/loading a FedPT result.

For every context, the proxy-tuned large model scores the next token with

    z = z_large + α · (z_expert − z_anti)

on the large model's vocabulary (extra expert rows are cut). `ProxyModel` is an `nn.Module` that
`thinwire.evaluate` can use like a HF causal LM: `forward(input_ids, attention_mask, labels)`
returns `.logits` (and `.loss` with labels), `generate(...)` decodes greedily or by sampling
with the three models each keeping its own state (KV cache for local models), left padding,
`eos_token_id`/`pad_token_id` handled like HF generate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from thinwire.models import vocab_rows
from thinwire.models.logits import LocalLogitsProvider, LogitsProvider

PROXY_FILE = "fedpt.json"
ADAPTER_FILE = "adapter.safetensors"
ANTI_FILE = "anti_adapter.safetensors"


def proxy_logits(z_large: torch.Tensor, z_expert: torch.Tensor, z_anti: torch.Tensor, alpha: float) -> torch.Tensor:
    """z_large + α (z_expert − z_anti), in float32, on the first V_large columns of every input."""
    v = z_large.shape[-1]
    z = z_large.float()
    if alpha == 0:
        return z
    return z + alpha * (z_expert[..., :v].float() - z_anti[..., :v].float())


@dataclass
class ProxyOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class ProxyModel(torch.nn.Module):
    """The proxy-tuned large model: a large black box steered by a tuned/untuned small pair."""

    def __init__(self, large: LogitsProvider, expert: LogitsProvider, anti: LogitsProvider, alpha: float = 1.0,
                 modules: list[torch.nn.Module] | tuple = ()):
        super().__init__()
        self.large, self.expert, self.anti, self.alpha = large, expert, anti, float(alpha)
        # registered so `.parameters()` gives a device (evaluate asks), never trained here
        self.parts = torch.nn.ModuleList([m for m in modules if isinstance(m, torch.nn.Module)])
        if not len(self.parts):
            self._anchor = torch.nn.Parameter(torch.zeros(0, device=large.device), requires_grad=False)
        self.queries = 0  # next-token logits rows asked of the large model

    def _providers(self):
        return (self.large, self.expert) if self.alpha == 0 else (self.large, self.expert, self.anti)

    @torch.no_grad()
    def sequence_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        z_large = self.large.sequence_logits(input_ids, attention_mask)
        self.queries += int(attention_mask.sum())
        if self.alpha == 0:
            return z_large.float()
        z_expert = self.expert.sequence_logits(input_ids, attention_mask)
        z_anti = self.anti.sequence_logits(input_ids, attention_mask)
        return proxy_logits(z_large, z_expert.to(z_large.device), z_anti.to(z_large.device), self.alpha)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **_: Any) -> ProxyOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = self.sequence_logits(input_ids, attention_mask)
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
        return ProxyOutput(logits=logits, loss=loss)

    @torch.no_grad()
    def next_logits(self, input_ids, attention_mask, states):
        """One step for all three models; `states` is a list of per-provider states (None at first)."""
        device = self.large.device
        z_large, s_large = self.large.next_token_logits(input_ids, attention_mask, states[0])
        self.queries += input_ids.shape[0]
        if self.alpha == 0:
            return z_large.float(), [s_large, None, None]
        z_expert, s_expert = self.expert.next_token_logits(input_ids, attention_mask, states[1])
        z_anti, s_anti = self.anti.next_token_logits(input_ids, attention_mask, states[2])
        return proxy_logits(z_large, z_expert.to(device), z_anti.to(device), self.alpha), [s_large, s_expert, s_anti]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, pad_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None, **_: Any) -> torch.Tensor:
        """[B, T + n] prompt + new tokens (n ≤ max_new_tokens; stops when every row has ended).

        Rows that emitted eos continue with `pad_token_id`, like HF generate. `use_cache=False`
        recomputes every step from the whole context (a check on the cached path).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
        device = self.large.device
        sequences, mask = input_ids.to(device), attention_mask.to(device)
        done = torch.zeros(sequences.shape[0], dtype=torch.bool, device=device)
        states: list = [None, None, None]
        step_ids = sequences
        eos_t = torch.tensor(eos, device=device, dtype=torch.long)
        for _ in range(max_new_tokens):
            if use_cache:
                logits, states = self.next_logits(step_ids, mask, states)
            else:
                logits, _ = self.next_logits(sequences, mask, [None, None, None])
            if do_sample:
                scores = logits / max(temperature, 1e-6)
                if top_k:
                    kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
                    scores = scores.masked_fill(scores < kth, float("-inf"))
                probs = torch.softmax(scores, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                token = logits.argmax(dim=-1)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            sequences = torch.cat([sequences, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(token[:, None])], dim=1)
            step_ids = token[:, None]
            if len(eos):
                done = done | torch.isin(token, eos_t)
                if bool(done.all()):
                    break
        return sequences


# ------------------------------------------------------------------------------------------------
# The three providers over one LoRA-wrapped small model
# ------------------------------------------------------------------------------------------------


class AdapterSwap:
    """Context factory: load `tensors` into `params` (a LoRA adapter) before each forward pass."""

    def __init__(self, params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]):
        self.params, self.tensors = params, tensors

    def __call__(self):
        from contextlib import nullcontext

        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.tensors[name])
        return nullcontext()


def small_providers(lora_model: torch.nn.Module, params: dict[str, torch.nn.Parameter],
                    expert: dict[str, torch.Tensor], anti: dict[str, torch.Tensor] | None,
                    vocab_size: int) -> tuple[LogitsProvider, LogitsProvider]:
    """(expert, anti) providers over one peft model: the expert loads its adapter; the anti-expert
    disables the adapter (pretrained small model) or, given `anti`, loads that adapter."""
    expert_p = LocalLogitsProvider(lora_model, vocab_size, context=AdapterSwap(params, expert))
    if anti is None:
        anti_p = LocalLogitsProvider(lora_model, vocab_size, context=lora_model.disable_adapter)
    else:
        anti_p = LocalLogitsProvider(lora_model, vocab_size, context=AdapterSwap(params, anti))
    return expert_p, anti_p


# ------------------------------------------------------------------------------------------------
# Save, load, generate
# ------------------------------------------------------------------------------------------------


def save_proxy(directory: Path, adapter: dict[str, torch.Tensor], small: str, large: str, alpha: float,
               lora: dict[str, Any], seed: int = 0, anti_adapter: dict[str, torch.Tensor] | None = None,
               extra: dict[str, Any] | None = None) -> Path:
    """Write the tuned small adapter (safetensors) and a JSON naming both base models and α."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()}, str(directory / ADAPTER_FILE))
    if anti_adapter is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in anti_adapter.items()}, str(directory / ANTI_FILE))
    info = {"format": 1, "method": "fedpt", "small": small, "large": large, "alpha": float(alpha),
            "anti": "adapter" if anti_adapter is not None else "pretrained", "seed": int(seed),
            "lora": lora, "adapter": ADAPTER_FILE, **(extra or {})}
    (directory / PROXY_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return directory


def load_proxy(directory: Path, device: str = "auto") -> tuple[ProxyModel, Any]:
    """(ProxyModel, tokenizer) from a `save_proxy` directory; both base models load by name."""
    from safetensors.torch import load_file

    from thinwire.config import ModelConfig
    from thinwire.errors import UsageError
    from thinwire.models import load_model, trainable_named_parameters
    from thinwire.models.lora import add_lora
    from thinwire.seeding import derive_seed

    directory = Path(directory)
    try:
        info = json.loads((directory / PROXY_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{directory} is not a saved FedPT proxy ({PROXY_FILE} unreadable: {exc})") from exc
    lora = info.get("lora", {})
    small_cfg = ModelConfig(name=info["small"], device=device, dtype="float32", **lora)
    small, tokenizer = load_model(small_cfg, info["seed"])
    large, large_tok = load_model(ModelConfig(name=info["large"], device=device, dtype="float32"), info["seed"])
    check_vocab(tokenizer, large_tok)
    lora_model = add_lora(small, small_cfg, derive_seed(info["seed"], "lora"))
    params = trainable_named_parameters(lora_model)
    adapter = load_file(str(directory / info.get("adapter", ADAPTER_FILE)))
    anti = load_file(str(directory / ANTI_FILE)) if info.get("anti") == "adapter" else None
    if set(adapter) != set(params):
        raise UsageError(f"adapter in {directory} does not match the LoRA layout of {info['small']}")
    device_ = next(lora_model.parameters()).device
    adapter = {k: v.to(device_) for k, v in adapter.items()}
    anti = {k: v.to(device_) for k, v in anti.items()} if anti else None
    vocab = vocab_rows(large)
    expert_p, anti_p = small_providers(lora_model, params, adapter, anti, vocab)
    proxy = ProxyModel(LocalLogitsProvider(large, vocab), expert_p, anti_p, info["alpha"], modules=[large, lora_model])
    proxy.eval()
    return proxy, tokenizer


def check_vocab(small_tokenizer, large_tokenizer) -> None:
    from thinwire.errors import UsageError

    if small_tokenizer.get_vocab() != large_tokenizer.get_vocab():
        raise UsageError("the small and large models must share one tokenizer and vocabulary for proxy-tuning")


@torch.no_grad()
def generate_text(proxy: ProxyModel, tokenizer, prompts: list[str], max_new_tokens: int = 64,
                  batch_size: int = 8, input_text: str = "") -> list[str]:
    """Greedy answers to instructions (each with `input_text` as its input), rendered in the
    tokenizer's template (Alpaca by default). `proxy` may be any model with Hugging Face's
    `generate` signature (a plain or PEFT model too)."""
    from thinwire.data.template import encode_prompts

    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = encode_prompts(tokenizer, [{"instruction": p, "input": input_text}
                                           for p in prompts[start : start + batch_size]])
        tokens = proxy.generate(batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id)
        outputs.extend(tokenizer.batch_decode(tokens[:, batch["input_ids"].shape[1]:], skip_special_tokens=True))
    return [o.strip() for o in outputs]


def generate_from_saved(directory: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Load a saved FedPT proxy and generate greedy answers to `prompts` (Alpaca template)."""
    proxy, tokenizer = load_proxy(directory)
    return generate_text(proxy, tokenizer, prompts, max_new_tokens)
