"""Model surgery for FedPT's small proxy models: cut a large causal LM down (fewer layers, pruned
MLPs, a factorised LM head) so that it keeps the large model's tokenizer and vocabulary rows.
models/small.py says which cuts `smollm2-small` makes; models/healing.py distils it back.

Why width and not depth (docs/benchmarks/history.md, seventh session): at the same FLOPs, the earlier default
kept the first 11 layers whole. After 60 healing steps from the same start its KL to the large
model on held-out response positions was 2.35 (first 10 + last layer: 2.07; 15 layers with
1024-neuron MLPs: 2.04; 20 with 640: 1.91), against 1.70 for all 30 layers with 256 neurons. The
suite's tasks (copying, reformatting) live in attention that truncation throws away: trained
centrally, the 11-layer expert reaches exact match 0.29 alone and proxy-tunes the large model to
59% of FedIT-on-large's exact-match gain; the pruned one reaches 0.50 alone and 96%.

Why a factorised head: SmolLM2's 49k x 576 (tied) LM head costs 28.3M multiply-adds per token, 21%
of the whole model, and the small model must share the vocabulary, so the full head alone would
take most of a third of the large model's compute. The final hidden states live near a
low-dimensional subspace: projecting them on their top-96 principal directions before the tied
head changes SmolLM2-135M's next-token distribution by KL 0.088 (top-64: 0.244, top-128: 0.035).
So the head is `up(down(h))` with `down` = those 96 directions (96 x 576) and `up` = the embedding
matrix times them (49152 x 96): 4.8M multiply-adds. (Rank 96 does limit what LoRA learns on
copying families through the large model's body, `benchmarks/head_rank.py`; but trading MLP width
for rank, 96 neurons and rank 256, made FedIT on the small model worse: docs/benchmarks/history.md, eighth
session.) The cached directory is a plain Hugging Face
model (the pruned layers with the tied head) plus `lowrank_head.safetensors`; `load_small`
installs the factorised head from it.

Compute: per token, a decoder layer of SmolLM2-135M costs ~2 x 3.54M FLOPs (attention 0.89M
multiply-adds, MLP 2.65M) and the tied LM head 2 x 28.3M (`forward_flops_per_token` gives the
estimate for any model, factorised head included).
"""

from __future__ import annotations

import copy

import torch


class FactorisedHead(torch.nn.Module):
    """An LM head of rank r: logits = up(down(h)); `out_features` like the nn.Linear it replaces."""

    def __init__(self, hidden: int, rank: int, vocab: int) -> None:
        super().__init__()
        self.down = torch.nn.Linear(hidden, rank, bias=False)
        self.up = torch.nn.Linear(rank, vocab, bias=False)
        self.out_features = vocab

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(hidden_states))


def factorised_head(model, hidden_states: torch.Tensor, rank: int) -> FactorisedHead:
    """The rank-`rank` head closest to `model`'s on these final hidden states: the tied head
    applied after projecting on their top principal directions (uncentred: logits are linear in h)."""
    weight = model.get_output_embeddings().weight.detach().float()
    h = hidden_states.reshape(-1, hidden_states.shape[-1]).double()
    _, vectors = torch.linalg.eigh(h.T @ h)
    top = vectors[:, -rank:].flip(-1).float()  # hidden x rank, strongest direction first
    head = FactorisedHead(weight.shape[1], rank, weight.shape[0])
    with torch.no_grad():
        head.down.weight.copy_(top.T)
        head.up.weight.copy_(weight @ top)
    return head


def install_head(model, head: FactorisedHead) -> None:
    """Replace the (tied) LM head; the model no longer ties input and output embeddings."""
    model.lm_head = head
    model.config.tie_word_embeddings = False


def truncate(model, layers: int, keep_last: int = 0):
    """A copy of a decoder-only HF model keeping `layers` decoder layers (weights copied): the first
    `layers - keep_last` and the last `keep_last`, renumbered so KV caches index them 0..layers-1."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise ValueError(f"cannot truncate {type(model).__name__}: no model.layers")
    total = len(inner.layers)
    if not 1 <= layers <= total:
        raise ValueError(f"cannot keep {layers} of {total} layers")
    if not 0 <= keep_last < layers:
        raise ValueError(f"cannot keep the last {keep_last} of {layers} layers: keep at least the first one")
    chosen = list(range(layers - keep_last)) + list(range(total - keep_last, total))
    kept = inner.layers
    inner.layers = torch.nn.ModuleList()  # do not deep-copy the layers we drop
    try:
        small = copy.deepcopy(model)
    finally:
        inner.layers = kept
    small.model.layers = torch.nn.ModuleList(copy.deepcopy(kept[i]) for i in chosen)
    for position, layer in enumerate(small.model.layers):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = position
    small.config.num_hidden_layers = layers
    if isinstance(getattr(small.config, "layer_types", None), list):
        small.config.layer_types = [small.config.layer_types[i] for i in chosen]
    if getattr(small.config, "tie_word_embeddings", False):
        small.tie_weights()
    return small


def mlp_importance(model, batches: list[dict]) -> list[torch.Tensor]:
    """Per decoder layer, each MLP neuron's share of the layer's output on these batches: the mean
    magnitude of its activation (the input of `down_proj`) over real tokens, times the norm of its
    `down_proj` column (what that activation is multiplied by on the way out)."""
    layers = model.model.layers
    totals = [torch.zeros(layer.mlp.down_proj.in_features) for layer in layers]
    current: dict[str, torch.Tensor] = {}

    def recorder(index: int):
        def hook(module, inputs):
            mask = current["mask"].unsqueeze(-1).to(inputs[0].dtype)
            totals[index] += (inputs[0].abs() * mask).sum((0, 1))
        return hook

    hooks = [layer.mlp.down_proj.register_forward_pre_hook(recorder(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for b in batches:
                current["mask"] = b["attention_mask"]
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for hook in hooks:
            hook.remove()
    return [t * layer.mlp.down_proj.weight.detach().norm(dim=0) for t, layer in zip(totals, layers)]


def prune_mlp(model, width: int, importance: list[torch.Tensor]) -> None:
    """Keep each decoder layer's `width` most important MLP neurons (in place; a uniform
    `intermediate_size`, so the result is a plain HF model of that config)."""
    for layer, scores in zip(model.model.layers, importance):
        neurons = layer.mlp.down_proj.in_features
        if scores.numel() != neurons:
            raise ValueError(f"{scores.numel()} importance scores for {neurons} MLP neurons")
        if not 1 <= width <= neurons:
            raise ValueError(f"cannot keep {width} of {neurons} MLP neurons")
        keep = torch.topk(scores, width).indices.sort().values
        mlp = layer.mlp
        for name, rows in (("gate_proj", True), ("up_proj", True), ("down_proj", False)):
            old = getattr(mlp, name)
            weight = old.weight.detach()[keep] if rows else old.weight.detach()[:, keep]
            new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
            new.weight = torch.nn.Parameter(weight.clone())
            setattr(mlp, name, new)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width
    model.config.intermediate_size = width


def forward_flops_per_token(model) -> int:
    """Estimated forward FLOPs per token: 2 x (weights used per token); embedding lookups are free,
    a tied LM head counts once as a matmul. Ignores attention's context-length term."""
    embed = model.get_input_embeddings().weight
    head = getattr(model.get_output_embeddings(), "weight", None)
    total = 0
    for name, p in model.named_parameters():
        if p is embed and p is not head:
            continue
        total += p.numel()  # a tied embedding appears once and counts as the LM head
    return 2 * total
