"""The environment protocol for chat agents, and the registry of environments by name.

An environment speaks chat: `reset(seed)` returns the opening messages (system/user), and
`step(assistant_text)` consumes the model's reply and returns the NEW messages to append to the
conversation (usually one user or tool message), the reward for that step, whether the episode is
over, and an info dict. Messages are OpenAI-style dicts; images live in content parts as
`{"type": "image", "image": <PIL.Image>}` (the renderer turns them into `image_url` data URIs).

Environments are plain synchronous Python (Maze2D and classification take well under a
millisecond per step). Async code calls them through `reset_async` / `step_async`, which run the
call in a worker thread unless the env defines its own `areset` / `astep` coroutines, so slow
envs (sympy grading, tools with timeouts) never block the event loop.

Registry: `register_env(name, factory)` (or as a decorator) and `make_env(name, **kwargs)`.
Built-in env modules register themselves on import; `make_env` imports them lazily, so
`make_env("maze2d", size=9)` works without importing `jaxrl_vl.envs.maze2d` first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
from typing import Any, Awaitable, Callable, Protocol, runtime_checkable

Message = dict[str, Any]
# A policy maps the visible conversation to the assistant's reply text.
Policy = Callable[[list[Message]], Awaitable[str]]


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What `step` returns. `messages` are only the new messages (to append), never the history."""

    messages: list[Message]
    reward: float
    done: bool
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@runtime_checkable
class ChatEnv(Protocol):
    """Protocol every environment follows.

    Attributes:
      max_turns: the most assistant turns an episode may take (the env itself sets done=True on
        the last one, so callers never need to enforce it).
      keep_last_images: None to show every image of the history to the policy, or k to show
        only the last k (older ones are replaced by a short text marker, see `visible_messages`).
    """

    max_turns: int
    keep_last_images: int | None

    def reset(self, seed: int) -> list[Message]: ...

    def step(self, assistant_text: str) -> StepResult: ...

    # Optional: `state_key() -> Hashable` names the situation the next action is taken in (equal keys =
    # identical situations, e.g. Maze2D's cell); the RL loop uses it for turn-level credit
    # (losses/step_advantages.py, rl.step_advantage_weight). Envs without it get episode-level credit only.


# ---------------------------------------------------------------------------------------------
# Message helpers shared by envs.


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def image_part(image: Any) -> dict[str, Any]:
    """`image` is a PIL.Image in memory, or a path relative to the jsonl file on disk."""
    return {"type": "image", "image": image}


def user_message(*parts: dict[str, Any]) -> Message:
    return {"role": "user", "content": list(parts)}


def system_message(text: str) -> Message:
    return {"role": "system", "content": text}


def assistant_message(text: str) -> Message:
    return {"role": "assistant", "content": text}


OMITTED_IMAGE_TEXT = "[earlier image omitted]"


def count_images(messages: list[Message]) -> int:
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for p in m["content"]
        if p.get("type") == "image"
    )


def visible_messages(messages: list[Message], keep_last_images: int | None) -> list[Message]:
    """The conversation as the policy sees it: only the last `keep_last_images` images kept.

    Older images become a text part OMITTED_IMAGE_TEXT so turn structure stays readable.
    None keeps everything (VisGym's default, `num_interaction_history=-1`). Returns new message
    dicts; the input list is not modified.
    """
    if keep_last_images is None:
        return list(messages)
    if keep_last_images < 0:
        raise ValueError(f"keep_last_images must be None or >= 0, got {keep_last_images}")
    to_drop = count_images(messages) - keep_last_images
    out: list[Message] = []
    for m in messages:
        content = m.get("content")
        if to_drop <= 0 or not isinstance(content, list):
            out.append(m)
            continue
        new_content = []
        for p in content:
            if p.get("type") == "image" and to_drop > 0:
                new_content.append(text_part(OMITTED_IMAGE_TEXT))
                to_drop -= 1
            else:
                new_content.append(p)
        out.append({**m, "content": new_content})
    return out


# ---------------------------------------------------------------------------------------------
# Async access.


async def reset_async(env: ChatEnv, seed: int) -> list[Message]:
    areset = getattr(env, "areset", None)
    if areset is not None:
        return await areset(seed)
    return await asyncio.to_thread(env.reset, seed)


async def step_async(env: ChatEnv, assistant_text: str) -> StepResult:
    astep = getattr(env, "astep", None)
    if astep is not None:
        return await astep(assistant_text)
    return await asyncio.to_thread(env.step, assistant_text)


@dataclasses.dataclass
class Episode:
    """A finished episode: the full conversation (every image kept), rewards per turn, last info."""

    seed: int
    messages: list[Message]
    rewards: list[float]
    info: dict[str, Any]

    @property
    def total_reward(self) -> float:
        return float(sum(self.rewards))


async def run_episode(env: ChatEnv, policy: Policy, seed: int) -> Episode:
    """Play one episode: policy sees `visible_messages(history, env.keep_last_images)` each turn.

    The env enforces its own turn cap (done=True on the last allowed turn); the extra bound here
    only guards against an env that never finishes.
    """
    messages = await reset_async(env, seed)
    rewards: list[float] = []
    info: dict[str, Any] = {}
    for _ in range(env.max_turns + 1):
        reply = await policy(visible_messages(messages, env.keep_last_images))
        result = await step_async(env, reply)
        messages = [*messages, assistant_message(reply), *result.messages]
        rewards.append(float(result.reward))
        info = result.info
        if result.done:
            return Episode(seed=seed, messages=messages, rewards=rewards, info=info)
    raise RuntimeError(f"{type(env).__name__} did not finish within max_turns={env.max_turns}")


# ---------------------------------------------------------------------------------------------
# Registry.

EnvFactory = Callable[..., ChatEnv]
_REGISTRY: dict[str, EnvFactory] = {}

# Modules that register built-in envs on import. Imported lazily by make_env / list_envs;
# a module that does not exist yet (another helper's work in progress) is skipped.
BUILTIN_ENV_MODULES = (
    "jaxrl_vl.envs.maze2d",
    "jaxrl_vl.envs.classification",
    "jaxrl_vl.envs.geometry",
)


def register_env(name: str, factory: EnvFactory | None = None):
    """Register `factory(**kwargs) -> env` under `name`. Usable as `@register_env("name")`."""

    def _register(f: EnvFactory) -> EnvFactory:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not f:
            raise ValueError(f"env name {name!r} is already registered to {existing!r}")
        _REGISTRY[name] = f
        return f

    return _register if factory is None else _register(factory)


def _import_builtin_envs(stop_when_registered: str | None = None) -> dict[str, Exception]:
    """Import the built-in env modules (stopping early once `stop_when_registered` exists).

    Returns the import errors by module, so one broken env module does not hide the others;
    callers report them when the env they asked for is missing.
    """
    errors: dict[str, Exception] = {}
    for module_name in BUILTIN_ENV_MODULES:
        if stop_when_registered is not None and stop_when_registered in _REGISTRY:
            break
        try:
            importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:  # a module that does not exist yet is fine; a broken one is not
                errors[module_name] = e
        except Exception as e:  # noqa: BLE001 - reported to the caller with the module name
            errors[module_name] = e
    return errors


def list_envs() -> list[str]:
    _import_builtin_envs()
    return sorted(_REGISTRY)


def make_env(name: str, **kwargs: Any) -> ChatEnv:
    """Build a registered env. Unknown names raise ValueError listing the valid ones."""
    errors = {} if name in _REGISTRY else _import_builtin_envs(stop_when_registered=name)
    factory = _REGISTRY.get(name)
    if factory is None:
        broken = "".join(f"; import of {m} failed: {e!r}" for m, e in errors.items())
        raise ValueError(f"unknown env {name!r}; registered envs: {', '.join(sorted(_REGISTRY))}{broken}")
    return factory(**kwargs)
