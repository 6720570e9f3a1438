"""Healing a cut-down model: distil the large model into it (forward KL on task-suite text), and
the measurements of how close the two are. models/small.py runs it when it builds `smollm2-small`.

Healing data (`[model] small_heal_data`, recorded as `heal_data`): `disjoint` (the default) uses
only the built-in families that the headline work (benchmarks/compare_smollm2.toml) neither trains
nor evaluates on: its eight `data.tasks` and its four held-out families (`HEADLINE_FAMILIES`) are
left out of the healing text, and of the calibration batches that choose the head's directions
and the MLP neurons, so the small model has not seen those families' answers before FedPT tunes
it. (The KL probe reported in the marker is a measurement only and still spans all families.)
`all` is the earlier build, healed on all 42 families with their reference outputs, the
evaluation families included; a cached model healed that way is rebuilt on first use. Only the
teacher's distribution over these texts is used, never a label: the large model is the teacher.
"""

from __future__ import annotations

import math

import torch

from thinwire.config import ModelConfig

HEAL_BATCH = 4
HEAL_LR = 5e-4
HEAL_MAX_LENGTH = 96
HEAL_PER_FAMILY = ModelConfig.small_heal_per_family
HEAL_FOCUS = ModelConfig.small_heal_focus
HEAL_FOCI = ("all", "response")
HEAL_DATA = ModelConfig.small_heal_data
HEAL_DATAS = ("disjoint", "all")
# the headline work's evaluation families (benchmarks/compare_smollm2.toml: data.tasks, then the
# held-out ones): `disjoint` healing leaves them out
HEADLINE_FAMILIES = ("add", "uppercase", "last-item", "date-reformat", "capital-of", "km-to-m", "max-number",
                     "extract-year", "subtract", "min-number", "swap-case", "kg-to-g")
HEAL_PROMPT_WEIGHT = 0.25
HEAL_SEED = 1234


def heal_families(data: str = HEAL_DATA) -> list[str]:
    """The built-in families a `data` recipe heals on: all of them, or those outside the headline's
    evaluation (`disjoint`)."""
    from thinwire.data.tasks import FAMILIES

    if data not in HEAL_DATAS:
        raise ValueError(f"unknown healing data {data!r}; choose one of {', '.join(HEAL_DATAS)}")
    return [f for f in FAMILIES if data == "all" or f not in HEADLINE_FAMILIES]


def heal_batches(tokenizer, batch: int, max_length: int, seed: int, per_family: int = 8,
                 families: list[str] | None = None):
    """Endless right-padded batches of suite examples (prompt + output) of `families` (default:
    all), in a seeded order."""
    import numpy as np

    from thinwire.data.tasks import generate_suite
    from thinwire.data.template import collate, encode_example

    examples = generate_suite(per_family, seed, families)
    encoded = [encode_example(tokenizer, e, max_length) for e in examples]
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(encoded))
        for start in range(0, len(order) - batch + 1, batch):
            yield collate([encoded[i] for i in order[start : start + batch]], tokenizer.pad_token_id)


def kl_per_position(teacher_logits, student_logits, temperature: float = 1.0, direction: str = "forward"):
    """KL(teacher || student) ("forward") or KL(student || teacher) ("reverse") between
    softmax(logits / T) at every position, times T^2 (Hinton's scaling)."""
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1) if direction == "forward" else (s.exp() * (s - t)).sum(-1)
    return kl * temperature**2


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def heal_loss(teacher_logits, student_logits, batch, focus: str = HEAL_FOCUS,
              prompt_weight: float = HEAL_PROMPT_WEIGHT):
    """KL(p_large || p_small): the mean over all real positions (`focus = "all"`), or on the
    response positions plus `prompt_weight` times it on the prompt's (`"response"`).

    Why "response" exists: proxy-tuning and evaluation score only response positions, and there the
    all-positions model is far worse (KL 1.66, against 0.10 on the prompt's template tokens, which
    outnumber them and dominate that loss)."""
    from thinwire.data.template import response_targets

    kl = kl_per_position(teacher_logits, student_logits)
    if focus == "all":
        return _masked_mean(kl, batch["attention_mask"])
    response = response_targets(batch["labels"])
    prompt = batch["attention_mask"].bool() & ~response
    return _masked_mean(kl, response) + prompt_weight * _masked_mean(kl, prompt)


def probe_batches(tokenizer, seed: int, max_length: int = HEAL_MAX_LENGTH, batches: int = 4) -> list[dict]:
    """A fixed set of held-out suite batches (8 examples per family to draw from, batches of 8)."""
    return [b for _, b in zip(range(batches), heal_batches(tokenizer, 8, max_length, seed, per_family=8))]


def closeness(small, large, batches: list[dict]) -> dict[str, float]:
    """How near `small` is to `large` on these batches, averaged over them: KL(p_large || p_small)
    on all, response and prompt positions, and both models' cross-entropy on the response tokens."""
    from thinwire.data.template import response_targets

    keys = ("kl_all", "kl_response", "kl_prompt", "ce_small", "ce_large")
    totals = dict.fromkeys(keys, 0.0)
    with torch.no_grad():
        for b in batches:
            kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            z_large, z_small = large(**kw).logits, small(**kw).logits
            kl = kl_per_position(z_large, z_small)
            response = response_targets(b["labels"])
            totals["kl_all"] += _masked_mean(kl, b["attention_mask"]).item()
            totals["kl_response"] += _masked_mean(kl, response).item()
            totals["kl_prompt"] += _masked_mean(kl, b["attention_mask"].bool() & ~response).item()
            labels = b["input_ids"][:, 1:][response[:, :-1]]
            for name, z in (("ce_small", z_small), ("ce_large", z_large)):
                totals[name] += torch.nn.functional.cross_entropy(z[:, :-1][response[:, :-1]].float(), labels).item()
    return {k: v / max(1, len(batches)) for k, v in totals.items()}


def heal(small, large, tokenizer, steps: int, batch: int = HEAL_BATCH, lr: float = HEAL_LR,
         max_length: int = HEAL_MAX_LENGTH, seed: int = HEAL_SEED, per_family: int = HEAL_PER_FAMILY,
         focus: str = HEAL_FOCUS, on_step=None, data: str = HEAL_DATA) -> dict[str, float]:
    """Distil `large` into `small` (in place) on suite examples of `heal_families(data)`; returns the
    KL before and after, on all positions and on the response positions, of held-out suite examples
    (all families)."""
    embed = small.get_input_embeddings().weight
    params = [p for p in small.parameters() if p is not embed]
    for p in small.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / 5) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(steps, 1))))
    batches = heal_batches(tokenizer, batch, max_length, seed, per_family, heal_families(data))
    probe = probe_batches(tokenizer, seed + 1, max_length)

    def probe_kl() -> tuple[float, float]:
        c = closeness(small, large, probe)
        return c["kl_all"], c["kl_response"]

    large.eval()
    before = probe_kl()
    small.train()
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            b = next(batches)
            kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            with torch.no_grad():
                teacher = large(**kw).logits
            loss = heal_loss(teacher, small(**kw).logits, b, focus)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if on_step is not None:
                on_step(loss.item())
    small.eval()
    for p in small.parameters():
        p.requires_grad_(True)
    after = probe_kl()
    return {"kl_before": before[0], "kl_after": after[0], "kl_response_before": before[1],
            "kl_response_after": after[1], "train_loss_last": losses[-1] if losses else float("nan")}


def calibration_batches(tokenizer, batches: int = 8, seed: int = HEAL_SEED + 2, data: str = HEAL_DATA) -> list[dict]:
    """A few suite batches of 8 (of `heal_families(data)`) that the head's directions and the MLP
    neurons' importance are read on."""
    stream = heal_batches(tokenizer, 8, HEAL_MAX_LENGTH, seed, families=heal_families(data))
    return [b for _, b in zip(range(batches), stream)]


def final_hidden_states(model, tokenizer, data: str = HEAL_DATA) -> torch.Tensor:
    """The model's final (normed) hidden states at every real token of the calibration batches."""
    states = []
    with torch.no_grad():
        for b in calibration_batches(tokenizer, data=data):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
            states.append(out.hidden_states[-1][b["attention_mask"].bool()])
    return torch.cat(states)
