"""Which KV blocks of a request the prefix cache may share with other requests.

A steered request's KV differs from the plain run's only from its first steered
position on (attention is causal: earlier rows never see the edit), so the blocks
before it are the plain run's and can be shared, by plain requests and by every
steering condition that starts later. vLLM's `cache_salt` salts block 0, and block
hashes chain, so a salted request shares nothing; instead the engine core gives
such a request a block hasher that salts the block holding a given position, and
chaining makes every later block differ too.

The same mechanism keeps scoring requests exact: a request that reads prompt
log-probabilities from position p on must compute row p - 1 itself (vLLM returns
uninitialised values for rows read from the cache), so the block holding p - 1 is
salted with the request's own id and never read from the cache.
"""

from collections import defaultdict
from collections.abc import Callable

from vllm.v1.core.kv_cache_utils import (
    generate_block_hash_extra_keys,
    hash_block_tokens,
    resolve_kv_cache_block_sizes,
)
from vllm.v1.request import Request
from vllm.utils.hashing import get_hash_fn_by_name

from intervene_engine.vllm_compat import REQUEST_ATTRIBUTES, require


class BlockSalter:
    """Builds per-request block hashers for one engine core (None when prefix caching is off)."""

    def __init__(self, hash_fn: Callable, block_size: int):
        self.hash_fn = hash_fn
        self.block_size = block_size

    @classmethod
    def of_engine_core(cls, core) -> "BlockSalter | None":
        if core.request_block_hasher is None:  # prefix caching off: no block is shared anyway
            return None
        _, hash_block_size = resolve_kv_cache_block_sizes(core.scheduler.kv_cache_config, core.vllm_config)
        return cls(get_hash_fn_by_name(core.vllm_config.cache_config.prefix_caching_hash_algo), hash_block_size)

    def salt(self, request: Request, salts: list[tuple[int, str]]) -> None:
        """Rehash `request` so the block holding each (position, salt)'s position, and every block
        after it, hash differently from an unsalted request with the same tokens."""
        require(request, REQUEST_ATTRIBUTES, "Request")
        by_block: dict[int, list[str]] = defaultdict(list)
        for position, salt in salts:
            by_block[max(position, 0) // self.block_size].append(salt)
        request._block_hasher = self._hasher(dict(by_block))
        request.block_hashes = []
        request.update_block_hashes()

    def _hasher(self, salts_by_block: dict[int, list[str]]) -> Callable[[Request], list]:
        # vLLM's `get_request_block_hasher` for text-only requests, plus the salts.
        size, hash_fn = self.block_size, self.hash_fn

        def hasher(request: Request) -> list:
            start = len(request.block_hashes) * size
            parent = request.block_hashes[-1] if request.block_hashes else None
            hashes = []
            while start + size <= request.num_tokens:
                extra, _ = generate_block_hash_extra_keys(request, start, start + size, 0)
                salts = salts_by_block.get(start // size)
                if salts:
                    extra = (*(extra or ()), ("lingosteer", *salts))
                parent = hash_block_tokens(hash_fn, parent, request.all_token_ids[start:start + size], extra)
                hashes.append(parent)
                start += size
            return hashes

        return hasher
