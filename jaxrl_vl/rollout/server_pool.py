"""Several vLLM servers used together (data-parallel rollouts: one per GPU or host).

Each episode sticks to one server across its turns, so that server's prefix cache (and encoder
cache) holds the conversation so far; a new episode goes to the server with the fewest active
episodes (ties: fewest requests in flight, then list order). Weight pushes go to every server.

    pool = ServerPool([handle_a.url, handle_b.url])
    url = pool.assign("episode-17")          # same url for every turn of episode-17
    async with pool.request("episode-17"):    # counts in-flight load
        ...
    pool.release("episode-17")               # episode finished
    await pool.broadcast(push_fn)            # push_fn(url) on every server, all must succeed
"""
import asyncio
import contextlib
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
        self._in_flight = {u: 0 for u in self.urls}

    def assign(self, episode_id: str) -> str:
        """The episode's server: its earlier one, else the least-loaded one."""
        url = self._episode_to_url.get(episode_id)
        if url is None:
            url = min(self.urls, key=lambda u: (self._active_episodes[u], self._in_flight[u], self.urls.index(u)))
            self._episode_to_url[episode_id] = url
            self._active_episodes[url] += 1
        return url

    def release(self, episode_id: str) -> None:
        """The episode is over; its server takes new episodes again. Unknown ids are ignored."""
        url = self._episode_to_url.pop(episode_id, None)
        if url is not None:
            self._active_episodes[url] -= 1

    @contextlib.asynccontextmanager
    async def request(self, episode_id: str):
        """Assigns the episode and counts one request in flight on its server while inside."""
        url = self.assign(episode_id)
        self._in_flight[url] += 1
        try:
            yield url
        finally:
            self._in_flight[url] -= 1

    def load(self) -> dict[str, dict[str, int]]:
        return {u: {"active_episodes": self._active_episodes[u], "in_flight": self._in_flight[u]} for u in self.urls}

    async def broadcast(self, fn: Callable[[str], Awaitable[Any]]) -> list[Any]:
        """Runs `fn(url)` on every server concurrently. Returns results in URL order; if any fail,
        raises RuntimeError naming each failed server (the others have completed by then)."""
        results = await asyncio.gather(*(fn(u) for u in self.urls), return_exceptions=True)
        failures = [(u, r) for u, r in zip(self.urls, results) if isinstance(r, BaseException)]
        if failures:
            detail = "; ".join(f"{u}: {type(e).__name__}: {e}" for u, e in failures)
            raise RuntimeError(f"broadcast failed on {len(failures)} of {len(self.urls)} servers: {detail}")
        return list(results)
