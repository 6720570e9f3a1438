"""FFA-LoRA (ALGORITHMS.md §7.1): FedIT with A shared and frozen, so only B trains and travels.

Every party draws A0 itself from the run seed (models/lora.py `freeze_shared_a`: U(±1/√din) per
module, PEFT's default distribution, from the stream (seed, module name)), so A is bit-identical
everywhere and is never uploaded or downloaded; B starts at 0. Clients upload ΔB = B_start − B_end,
the server applies the weighted mean (`method.weighting`), so B ← Σ p_k·B_k and the aggregate is
exact: Σ p_k·s·B_k·A0 = s·(Σ p_k·B_k)·A0. Per client-round: r·dout values each way per module
(FedIT: r·(din + dout)).

Unverified detail (the paper's text was not available): A0's distribution. PEFT's default is the
reading that makes the method work (non-zero, scaled to the input width). α stays
`model.lora_alpha`: the paper's Theorem 1 makes tuning α equivalent to tuning the learning rate.
Its update space, for DP and robust rules, is ΔB itself, averaged by the weighted mean.
"""

from __future__ import annotations

from thinwire.config import Config
from thinwire.methods.base import ClientState, Upload
from thinwire.methods.fedavg import FedITClient, FedITServer
from thinwire.methods.space import UpdateSpace
from thinwire.models.lora import freeze_shared_a
from thinwire.seeding import derive_seed
from thinwire.wire import Payload


class _SharedA:
    def shared_a(self) -> dict:
        """Freeze A at its seeded draw in this process's adapter (idempotent); A by parameter name."""
        return freeze_shared_a(self.ctx.workbench.lora_model(), derive_seed(self.config.federation.seed, "ffa-lora"))


class FFALoRAServer(_SharedA, FedITServer):
    needs_shared_draws = True  # clients draw A0 from the seed: every party must draw the same bits

    @classmethod
    def update_space(cls, config: Config) -> UpdateSpace | None:
        return UpdateSpace("LoRA B delta (A frozen and shared)")

    def setup(self) -> None:
        self.shared_a()
        super().setup()  # the trainable set is now B alone

    def final_state(self) -> Payload:
        """A and B: a complete adapter (export writes it as a PEFT adapter)."""
        return Payload(tensors={**self.shared_a(), **self.weights})


class FFALoRAClient(_SharedA, FedITClient):
    def fit(self, rnd: int, client_id: int, download: Payload, examples: list[dict],
            state: ClientState) -> Upload:
        self.shared_a()
        return super().fit(rnd, client_id, download, examples, state)
