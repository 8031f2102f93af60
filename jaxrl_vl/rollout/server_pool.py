"""Several vLLM servers used together (data-parallel rollouts: one per GPU or host).

Each episode sticks to one server across its turns, so that server's prefix cache (and encoder
cache) holds the conversation so far; a new episode goes to the server with the fewest active
episodes (ties: list order). Weight pushes go to every server. agent_loop.run_groups routes with it.

    pool = ServerPool([handle_a.url, handle_b.url])
    url = pool.assign("episode-17")          # same url for every turn of episode-17
    pool.release("episode-17")               # episode finished
    await pool.broadcast(push_fn)            # push_fn(url) on every server, all must succeed
"""
import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any


class ServerPool:
    """Routing state only (no I/O besides `broadcast`); safe within one asyncio event loop."""

    def __init__(self, urls: Sequence[str]):
        if not urls:
            raise ValueError("ServerPool needs at least one server URL")
        if len(set(urls)) != len(urls):
            raise ValueError(f"ServerPool: duplicate server URLs in {list(urls)}")
        self.urls = [u.rstrip("/") for u in urls]
        self._episode_to_url: dict[str, str] = {}
        self._active_episodes = {u: 0 for u in self.urls}

    def assign(self, episode_id: str) -> str:
        """The episode's server: its earlier one, else the least-loaded one."""
        url = self._episode_to_url.get(episode_id)
        if url is None:
            url = min(self.urls, key=lambda u: (self._active_episodes[u], self.urls.index(u)))
            self._episode_to_url[episode_id] = url
            self._active_episodes[url] += 1
        return url

    def release(self, episode_id: str) -> None:
        """The episode is over; its server takes new episodes again. Unknown ids are ignored."""
        url = self._episode_to_url.pop(episode_id, None)
        if url is not None:
            self._active_episodes[url] -= 1

    def load(self) -> dict[str, int]:
        """Active episodes per server."""
        return dict(self._active_episodes)

    async def broadcast(self, fn: Callable[[str], Awaitable[Any]]) -> list[Any]:
        """Runs `fn(url)` on every server concurrently. Returns results in URL order; if any fail,
        raises RuntimeError naming each failed server (the others have completed by then)."""
        results = await asyncio.gather(*(fn(u) for u in self.urls), return_exceptions=True)
        failures = [(u, r) for u, r in zip(self.urls, results) if isinstance(r, BaseException)]
        if failures:
            detail = "; ".join(f"{u}: {type(e).__name__}: {e}" for u, e in failures)
            raise RuntimeError(f"broadcast failed on {len(failures)} of {len(self.urls)} servers: {detail}")
        return list(results)
