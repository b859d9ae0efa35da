"""Gating weights remembered per prompt, across batches and requests (README, "GRPO groups").

An encoder model's gating weights depend on the prompt alone: its own pass over the prompt's tokens, then the
gating network. A GRPO step scores each prompt with 8 or 16 responses, which the length-sorted planner spreads
over several batches, and a rollout worker sends them as separate requests. `GatingCache` keeps the weights of
recently seen prompts, keyed by the prompt's exact token ids (so a hit is the same input to the same graph: the
result is the one the pass would give). A batch whose prompts are all known then runs the backbone on one
one-token prompt row instead of its prompts, and its score is recomputed from the graph's own rewards:

    score = Σ_k g_k · (r @ T)_k        (g: the cached gating weights, r: the raw rewards, T: manifest.transform)

which is the graph's formula (`polyreward.models.torch.heads.RewardHeads.forward`). Mixture heads' router
probabilities and group weightings depend on the prompt alone too: they are remembered with the gating, and
`group_scores_m = Σ_k G_mk (r @ T)_k` is recomputed the same way. Bounded, least recently used first out,
thread-safe (the service collates and runs batches on different threads).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

DEFAULT_ITEMS = 8192  # prompts remembered; a 512-token key is 2 KiB, so at most ~20 MB
PROMPT_OUTPUTS = (
    "gating",
    "group_probs",
    "group_gating",
)  # the graph outputs that depend on the prompt alone
Remembered = dict[str, np.ndarray]


def prompt_key(prompt_ids: Sequence[int]) -> bytes:
    return np.asarray(prompt_ids, np.int32).tobytes()


class GatingCache:
    def __init__(self, max_items: int = DEFAULT_ITEMS):
        if max_items < 1:
            raise ValueError("max_items must be positive")
        self.max_items = max_items
        self._data: OrderedDict[bytes, Remembered] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: bytes) -> Remembered | None:
        with self._lock:
            gating = self._data.get(key)
            if gating is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return gating

    def contains(self, key: bytes) -> bool:
        """Whether `key` is cached (not counted as a hit or a miss)."""
        with self._lock:
            return key in self._data

    def put(self, key: bytes, outputs: Remembered) -> None:
        with self._lock:  # copies: the batch's output arrays are not kept
            self._data[key] = {name: np.array(v, np.float32) for name, v in outputs.items()}
            self._data.move_to_end(key)
            while len(self._data) > self.max_items:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.hits = self.misses = 0


class Feeds(dict):
    """A batch's graph inputs, plus what the gating cache decided for its items: `cached` maps a row to the
    prompt outputs it reuses (its prompt row was replaced by the one-token row), `fill` maps a row whose
    prompt was computed to the key its outputs are remembered under."""

    def __init__(self, arrays: dict, cached: dict[int, Remembered], fill: dict[int, bytes]):
        super().__init__(arrays)
        self.cached, self.fill = cached, fill


def apply(
    cache: GatingCache, feeds: Feeds, outputs: dict[str, np.ndarray], transform: np.ndarray
) -> dict[str, np.ndarray]:
    """The graph's outputs with the cached items' prompt outputs and scores put back, and the new prompts
    remembered."""
    names = [n for n in PROMPT_OUTPUTS if n in outputs]
    for row, key in feeds.fill.items():
        cache.put(key, {n: outputs[n][row] for n in names})
    if feeds.cached:
        rows = np.fromiter(feeds.cached, np.int64)
        for n in names:
            outputs[n][rows] = np.stack([c[n] for c in feeds.cached.values()])
        debiased = outputs["rewards"][rows] @ transform
        outputs["score"][rows] = (outputs["gating"][rows] * debiased).sum(-1)
        if "group_scores" in outputs:
            outputs["group_scores"][rows] = (outputs["group_gating"][rows] * debiased[:, None, :]).sum(-1)
    return outputs
