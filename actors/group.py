"""Starting actors: one helper for what every actor of a pool needs (its bundle of the pool's
placement group, its name ROLE-i@RUN, resources, thread environment and restart policy), and
a group object that fans a method out to every actor of the pool (as OpenRLHF's actor
group does), so that no role needs a start function of its own."""
from __future__ import annotations

from typing import Callable

import ray

from rlaif_ray.config import RoleResources

from .ray_session import actor_options, place


def actor_name(label: str, i: int, tag: str) -> str:
    """generator-0@RUN: unique per run (the dashboard lists actors by it)."""
    return f"{label}-{i}@{tag}" if tag else f"{label}-{i}"


class ActorGroup:
    """The actors of one pool, in order. `call(method, ...)` runs it on every actor and returns
    the futures; the group also iterates and indexes like the list of its actors."""

    def __init__(self, actors: list):
        self.actors = list(actors)

    @classmethod
    def start(cls, actor_cls, pool: str, label: str, role: RoleResources, tag: str, args: Callable[[int], tuple],
              timeout: float, restarts: bool = True, env: dict | None = None, placed: bool = True) -> "ActorGroup":
        """`role.num_actors` actors of `actor_cls` (a Ray actor class), actor i constructed with
        `args(i)` in bundle i of the pool's placement group (`placed=False`: none, Ray's own
        scheduling); `pool` names the config section (pipeline.generators, ...)."""
        where = place(pool, role, tag, timeout) if placed else [{}] * role.num_actors
        return cls([actor_cls.options(**actor_options(role, actor_name(label, i, tag), restarts, env, where[i]))
                    .remote(*args(i)) for i in range(role.num_actors)])

    def call(self, method: str, *args, **kwargs) -> list:
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def kill(self) -> None:
        for a in self.actors:
            ray.kill(a)

    def __iter__(self):
        return iter(self.actors)

    def __len__(self) -> int:
        return len(self.actors)

    def __getitem__(self, i):
        return self.actors[i]

    def __add__(self, other) -> list:  # actors of several pools as one list (to kill them all)
        return self.actors + list(other)

    def __radd__(self, other) -> list:
        return list(other) + self.actors
