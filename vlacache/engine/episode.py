"""The per-episode memory of the cache engine (`EpisodeState`): what one control step leaves for the next, per
batch row (each row is its own episode), and the view of it a row's plan is made from (`plan_context`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..strategy import PlanContext
from ..types import AttentionStats, TokenLayout
from .staleness import Staleness


@dataclass
class EpisodeState:
    """Everything the engine remembers between control steps. Each batch row is its own episode: `key` is what
    the rows share (batch size, image sizes, prompt length; a change resets all), `row_keys` each row's own
    (its instruction; a change starts a new episode in that row alone), `steps` each row's steps so far and
    `fresh` the rows without a previous step (they compute everything at their next step)."""

    key: tuple | None = None
    row_keys: list | None = None
    steps: list[int] = field(default_factory=list)
    fresh: set[int] = field(default_factory=set)
    previous_images: dict[str, torch.Tensor] | None = None
    prompt_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    final_hidden: torch.Tensor | None = None
    stats: AttentionStats | None = None
    staleness: Staleness | None = None
    signals: dict[str, torch.Tensor] = field(default_factory=dict)  # batch-first, what the last step gave (PlanContext)
    untouched: bool = False  # the last step ran without the engine (cost guard): nothing of it kept to reuse

    def starts_over(self, batch: int) -> bool:
        """Whether some row plans this step without a previous one (new episode, or after an untouched step)."""
        return self.untouched or self.previous_images is None or bool(self.fresh) or len(self.steps) != batch

    @property
    def step(self) -> int:
        """Steps since the batch began (the furthest row)."""
        return max(self.steps, default=0)

    def rows(self, rows: list[int]) -> "EpisodeState":
        """The state of these batch rows only, in this order (tensors gathered, the rest shared)."""
        index = torch.tensor(rows)

        def pick(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.index_select(0, index.to(tensor.device))

        stats = self.stats
        return EpisodeState(
            key=self.key,
            row_keys=None if self.row_keys is None else [self.row_keys[r] for r in rows],
            steps=[self.steps[r] for r in rows] if self.steps else [],
            fresh={new for new, old in enumerate(rows) if old in self.fresh},
            previous_images=None if self.previous_images is None else {n: pick(i) for n, i in self.previous_images.items()},
            prompt_kv={layer: (pick(k), pick(v)) for layer, (k, v) in self.prompt_kv.items()},
            final_hidden=None if self.final_hidden is None else pick(self.final_hidden),
            stats=None if stats is None else dataclasses.replace(
                stats, to_keys={layer: pick(t) for layer, t in stats.to_keys.items()},
                entropy={layer: pick(e) for layer, e in stats.entropy.items()}),
            staleness=None if self.staleness is None else self.staleness.rows(index),
            signals={name: pick(t) for name, t in self.signals.items()},
            untouched=self.untouched,
        )

    @classmethod
    def stack(cls, states: list["EpisodeState | None"]) -> "EpisodeState":
        """One batch of episodes from single-row states that share `key` (image sizes, prompt length) and hold
        a finished step each; None (no step yet) joins as a fresh row, which computes everything at its next step."""
        done = [s for s in states if s is not None]
        if not done:
            return cls()
        template = done[0]
        if any(s.key != template.key or len(s.steps) != 1 or s.final_hidden is None or set(s.prompt_kv) != set(template.prompt_kv)
               or (s.stats is None) != (template.stats is None) or (s.staleness is None) != (template.staleness is None)
               or (s.previous_images is None) != (template.previous_images is None)
               or set(s.signals) != set(template.signals) for s in done):
            raise ValueError("EpisodeState.stack needs single-row states of one kind (same key, layers, statistics)")

        def cat(get) -> torch.Tensor:
            parts = [get(s if s is not None else template) for s in states]
            return torch.cat([p if s is not None else torch.zeros_like(p) for p, s in zip(parts, states)])

        stats = template.stats
        staleness = template.staleness
        return cls(
            key=template.key,
            row_keys=[s.row_keys[0] if s is not None else None for s in states],
            steps=[s.steps[0] if s is not None else 0 for s in states],
            fresh={i for i, s in enumerate(states) if s is None or 0 in s.fresh},
            previous_images=None if template.previous_images is None else
            {n: cat(lambda s, n=n: s.previous_images[n]) for n in template.previous_images},
            prompt_kv={layer: (cat(lambda s, i=layer: s.prompt_kv[i][0]), cat(lambda s, i=layer: s.prompt_kv[i][1]))
                       for layer in template.prompt_kv},
            final_hidden=cat(lambda s: s.final_hidden),
            stats=None if stats is None else dataclasses.replace(
                stats, to_keys={layer: cat(lambda s, i=layer: s.stats.to_keys[i]) for layer in stats.to_keys},
                entropy={layer: cat(lambda s, i=layer: s.stats.entropy[i]) for layer in stats.entropy}),
            staleness=None if staleness is None else Staleness(
                {c: cat(lambda s, c=c: s.staleness.anchors[c]) for c in staleness.anchors},
                {c: cat(lambda s, c=c: s.staleness.ages[c]) for c in staleness.ages}),
            signals={name: cat(lambda s, n=name: s.signals[n]) for name in template.signals},
            untouched=any(s.untouched for s in done),
        )

    def plan_context(self, row: int, current: dict[str, torch.Tensor], layout: TokenLayout, num_layers: int,
                     env_steps_per_query: int = 1) -> PlanContext:
        """What the policy sees when it plans `row`'s step as if that episode ran alone: its step count and this
        step's query images, and, unless the row starts an episode now, its previous query images, last step's
        attention statistics, the staleness of its cached K/V and what its last step gave (`signals`)."""
        previous = self.previous_images
        alone = row in self.fresh or previous is None or self.untouched

        def own(images: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            # one row alone: the tensors themselves, so what was computed from them this step is not computed again
            return {name: image if image.shape[0] == 1 else image[row : row + 1] for name, image in images.items()}

        ctx = PlanContext(
            step=self.steps[row],
            batch_size=1,
            num_layers=num_layers,
            layout=layout,
            current=own(current),
            previous=None if alone else own(previous),
            stats=None if alone or self.stats is None else self.stats.row(row),
            env_steps_per_query=env_steps_per_query,
        )
        if not alone and self.staleness is not None:
            ctx.anchors, ctx.ages = own(self.staleness.anchors), own(self.staleness.ages)
        if not alone and self.signals:
            ctx.signals = {name: t[row : row + 1] for name, t in self.signals.items()}
            ctx.void = ctx.signals.get("void")
        return ctx
