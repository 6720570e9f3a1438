"""How much does a rank-r LM head limit what LoRA can learn? SmolLM2-135M with its tied head
replaced by the rank-r factorised head `smollm2-small` uses (models/small.py, unhealed), LoRA-tuned
on the device config's adapter for the same steps on the same examples; held-out response loss.

Why: the small model's clients on copying families (uppercase, last-item) and on capital-of kept a
training loss near 5 in every round through a rank-96 head, where the large model's fell below 1.
The body is the large model's throughout, so the rows differ only in the head. (On SmolLM2-135M's
body the rank-96 head does cost most of what LoRA learns there; but a small model that spent the
FLOPs on a rank-256 head instead of MLP width, 96 neurons, learnt those families no better and
scored lower overall: docs/benchmarks/history.md, eighth session. The pruned body is the limit there.)

    python benchmarks/head_rank.py
    python benchmarks/head_rank.py --tasks uppercase,last-item,capital-of --ranks 0,96,192,288,384
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch
from rich.console import Console
from rich.table import Table

from thinwire.config import load_config
from thinwire.data.tasks import generate_suite
from thinwire.data.template import collate, encode_example
from thinwire.models import load_model
from thinwire.models.lora import add_lora
from thinwire.models.healing import final_hidden_states
from thinwire.models.surgery import factorised_head, install_head

CONFIG = "benchmarks/compare_smollm2.toml"


def response_loss(model: torch.nn.Module, tokenizer, examples: list[dict]) -> torch.Tensor:
    batch = collate([encode_example(tokenizer, e, 128) for e in examples], tokenizer.pad_token_id)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def lora_learnability(model: torch.nn.Module, tokenizer, model_config, tasks: list[str], steps: int,
                      batch_size: int = 4, lr: float = 2e-3) -> tuple[float, float]:
    """Held-out response loss on `tasks` before and after `steps` LoRA steps (`model_config`'s
    adapter): how much a device's few local steps can teach `model`. Adds the adapter to `model`
    in place: pass a model you no longer need."""
    model = add_lora(model, model_config, 0)
    train, test = generate_suite(40, 5, tasks), generate_suite(8, 77, tasks)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(0)
    with torch.no_grad():
        before = response_loss(model, tokenizer, test).item()
    for _ in range(steps):
        picks = torch.randint(len(train), (batch_size,), generator=order)
        response_loss(model, tokenizer, [train[i] for i in picks]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = response_loss(model, tokenizer, test).item()
    return before, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="uppercase,last-item,capital-of")
    parser.add_argument("--ranks", default="0,96,192,288,384", help="head ranks; 0 is the full tied head")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(CONFIG)
    large, tokenizer = load_model(dataclasses.replace(config.model, name="smollm2-135m"), 0)
    hidden = final_hidden_states(large, tokenizer)
    tasks = args.tasks.split(",")

    table = Table(title=f"SmolLM2-135M through a rank-r head: LoRA ({config.model.lora_rank}, "
                        f"{'/'.join(config.model.lora_targets)}) for {args.steps} steps on {', '.join(tasks)}")
    for column in ("head", "head MACs / token", "held-out loss before", "after", "s"):
        table.add_column(column, justify="right")
    for rank in (int(r) for r in args.ranks.split(",")):
        started = time.perf_counter()
        model = copy.deepcopy(large)
        if rank:
            install_head(model, factorised_head(large, hidden, rank))
        head = model.get_output_embeddings()
        macs = sum(m.weight.numel() for m in head.modules() if isinstance(m, torch.nn.Linear))
        before, after = lora_learnability(model, tokenizer, config.model, tasks, args.steps, args.batch_size, args.lr)
        table.add_row(f"rank {rank}" if rank else "full (tied)", f"{macs / 1e6:.1f}M", f"{before:.3f}",
                      f"{after:.3f}", f"{time.perf_counter() - started:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
