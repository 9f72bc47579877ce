"""Which sampling steps DiffEditor / DragonDiffusion guide, run the regional SDE, time-travel or read the bank.

The published schedules are given on 50 steps (the fields below); other step counts map onto them
proportionally.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GuidedSchedule:
    """The guided samplers' step plan as configuration (step indices of a 50-step run)."""

    method: str  # "diffeditor" | "dragondiffusion"
    n_steps: int
    guided_until: int = 30  # gradient guidance on steps k < 30 …
    every_step_until: int = 10  # … every step before 10, then every even step (DiffEditor; DragonDiffusion: all)
    sde_after: int = 10  # DiffEditor regional SDE on 10 < k < 20
    sde_before: int = 20
    travel_after: int = 20  # DiffEditor time travel on the even steps 20 < k < 30 …
    travel_before: int = 30
    travel_repeats: int = 3  # … each run three times
    image_prompt_from: int = 10  # DiffEditor image prompt on 10 <= k < 20
    image_prompt_before: int = 20
    bank_from: int = 5  # drag / move read the memory bank from step 5 on
    bank_until: int = 35  # appearance / paste read it up to step 35

    def _i50(self, i: int) -> int:
        return round(i * 50 / self.n_steps)

    def guided(self, i: int) -> bool:
        k = self._i50(i)
        return k < self.guided_until and (self.method == "dragondiffusion" or k < self.every_step_until or k % 2 == 0)

    def sde(self, i: int) -> bool:
        return self.method == "diffeditor" and self.sde_after < self._i50(i) < self.sde_before

    def repeats(self, i: int) -> int:
        k = self._i50(i)
        travel = self.method == "diffeditor" and self.travel_after < k < self.travel_before and k % 2 == 0
        return self.travel_repeats if travel else 1

    def image_prompt(self, i: int) -> bool:
        return self.method == "diffeditor" and self.image_prompt_from <= self._i50(i) < self.image_prompt_before

    def bank_active(self, task: str, i: int) -> bool:
        k = self._i50(i)
        return k <= self.bank_until if task in ("appearance", "paste") else k >= self.bank_from
