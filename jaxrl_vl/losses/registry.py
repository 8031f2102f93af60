"""Name -> function registries for losses, advantage estimators and KL estimators.

Each loss module registers its functions here with a decorator, so a config string such as
`"ppo"` or `"rloo"` selects the function and an unknown name fails with the list of valid ones.
`jaxrl_vl.losses` imports every loss module, so the tables are full once the package is imported.
"""
from __future__ import annotations

from typing import Callable


class Registry:
    """A flat table name -> function for one kind of function (e.g. "policy loss")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._functions: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def decorator(fn: Callable) -> Callable:
            if name in self._functions:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._functions[name] = fn
            return fn
        return decorator

    def get(self, name: str) -> Callable:
        if name not in self._functions:
            raise ValueError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}")
        return self._functions[name]

    def names(self) -> list[str]:
        return sorted(self._functions)


POLICY_LOSSES = Registry("policy loss")
ADVANTAGES = Registry("advantage estimator")
KL_ESTIMATORS = Registry("KL estimator")
TINKER_LOSSES = Registry("Tinker loss_fn")
AGGREGATIONS = Registry("loss aggregation")


def get_policy_loss(name: str) -> Callable:
    """Per-token policy loss (see losses/policy.py for the signature)."""
    return POLICY_LOSSES.get(name)


def get_advantage(name: str) -> Callable:
    """Advantage estimator: rewards [G, n] -> advantages [G, n] (see losses/advantages.py)."""
    return ADVANTAGES.get(name)


def get_kl_estimator(name: str) -> Callable:
    """KL estimator: (logprobs, ref_logprobs) -> per-token KL (see losses/kl.py)."""
    return KL_ESTIMATORS.get(name)


def get_tinker_loss(name: str) -> Callable:
    """Tinker `loss_fn` by its wire name (see losses/tinker_losses.py)."""
    return TINKER_LOSSES.get(name)


def get_aggregation(name: str) -> Callable:
    """Loss aggregation mode (see losses/aggregate.py)."""
    return AGGREGATIONS.get(name)
