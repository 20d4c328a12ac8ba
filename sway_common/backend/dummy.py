"""An analytic differential backend in pure numpy, for fast tests of the math and runner.

It is a real (tiny) language model, not a table of canned answers: characters are
tokens, the hidden state is a smoothed average of recent token embeddings, and the
LM head is ``W + ΔW`` where ``ΔW = scale · B·A`` is a rank-r "adapter". Every view
goes through :class:`~sway_common.backend.model_views.ModelViews`, so the dummy
exercises the same view, cache, batching and windowing code as the real backends.

The "trained" adapter has a *direction*: it pushes every context towards a few target
tokens along the mean hidden state, which a random adapter of the same norm does not
do. ``adapter_strength=0`` gives an untrained (B = 0) adapter; ``nan_adapter=True`` puts
a NaN in B; ``random_adapter_seed`` makes the "trained" adapter itself a random draw
(the false-positive check: such an adapter must not pass).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from sway_common.adapters.weights import AdapterWeights, LoraModule
from sway_common.backend.generation import Draws, inverse_cdf_np
from sway_common.backend.model_views import ModelViews
from sway_common.backend.nulls import PlacedNull
from sway_common.backend.runtime import Runtime
from sway_common.backend.scoring import text_hash, token_dist_from_logprobs
from sway_common.backend.views import Encoding, Restore
from sway_common.types import TokenDist

_FIRST_CHAR = 32  # printable ASCII: ids 0..94 are ' '..'~'
_UNKNOWN = ord("?") - _FIRST_CHAR
# The module path of the dummy's one adapted layer, as the null recipe keys it.
HEAD_PATH = "lm_head"

Factors = tuple[NDArray[np.float32], NDArray[np.float32]]


class DummyRuntime(Runtime):
    """The dummy character model and its one adapted layer (the LM head)."""

    def __init__(
        self,
        *,
        adapter_strength: float = 1.0,
        rank: int = 4,
        hidden: int = 16,
        nan_adapter: bool = False,
        random_adapter_seed: int | None = None,
        max_context: int = 64,
        batch_size: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.vocab_size = 95
        self.max_context = max_context
        self.batch_size = batch_size
        rng = np.random.default_rng(seed)
        self._embed = rng.normal(0.0, 1.0, (self.vocab_size, hidden)).astype(np.float32)
        self._head = rng.normal(0.0, 0.5, (hidden, self.vocab_size)).astype(np.float32)
        # A shared offset makes hidden states anisotropic, as a real LM's are: they share a
        # direction a trained adapter can use and a random one mostly misses, so the
        # trained adapter beats norm-matched nulls for any null seeds, not by luck.
        self._embed += np.full(hidden, 1.0 / np.sqrt(hidden), np.float32)
        self._rank = rank
        self._scale = 2.0
        # A direction a training run might learn: along the typical hidden state,
        # towards a handful of target tokens.
        mean_h = np.tanh(self._embed).mean(axis=0)
        a = np.zeros((rank, hidden), np.float32)
        a[0] = mean_h / np.linalg.norm(mean_h)
        b = np.zeros((self.vocab_size, rank), np.float32)
        b[[ord(c) - _FIRST_CHAR for c in "etaoin"], 0] = adapter_strength
        if random_adapter_seed is not None:
            noise = np.random.default_rng([random_adapter_seed, 0xADA])
            a = noise.normal(0.0, 1.0, a.shape).astype(np.float32)
            b = noise.normal(0.0, adapter_strength / 4, b.shape).astype(np.float32)
        if nan_adapter:
            b[0, 0] = np.nan
        self._real = (a, b)
        self._factors: Factors | None = self._real
        # The canonical form the shared null recipe reads: one module, the LM head.
        self.adapter_weights = AdapterWeights(
            fmt="peft", dora=False, modules={HEAD_PATH: LoraModule(a=a, b=b, scale=self._scale)}
        )
        self._lam = 1.0
        self.adapter_hash = text_hash(
            repr((adapter_strength, rank, hidden, nan_adapter, random_adapter_seed, seed))
        )
        self.info = {"backend": "dummy", "model": "dummy-char-lm", "adapter": "dummy", "rank": rank}

    # -------------------------------------------------------------- model
    @property
    def prompt_limit(self) -> int | None:
        # Its hidden state is a running average with no positions, so a prompt of any
        # length is fine; max_context only sets its rolling windows.
        return None

    def encode(self, text: str) -> Encoding:
        ids = [
            ord(c) - _FIRST_CHAR if _FIRST_CHAR <= ord(c) < _FIRST_CHAR + 95 else _UNKNOWN
            for c in text
        ]
        return ids, [(i, i + 1) for i in range(len(text))]

    def _hidden(self, ids: list[int]) -> NDArray[np.float32]:
        """Hidden state after each position: tanh of an exponential moving average."""
        e = self._embed[np.asarray(ids)]
        h = np.empty_like(e)
        acc = np.zeros(e.shape[1], np.float32)
        for t in range(len(ids)):
            acc = 0.6 * acc + 0.4 * e[t]
            h[t] = acc
        return np.tanh(h)

    def _logprobs(self, h: NDArray[np.float32]) -> NDArray[np.float32]:
        logits = h @ self._head
        if self._factors is not None and self._lam != 0.0:
            a, b = self._factors
            logits = logits + self._lam * self._scale * (h @ a.T) @ b.T
        logits = logits - logits.max(axis=-1, keepdims=True)
        return (logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))).astype(np.float32)

    def last_logprobs(self, batch: list[list[int]]) -> NDArray[np.float32]:
        return np.stack([self._logprobs(self._hidden(ids)[-1:])[0] for ids in batch])

    def token_logprobs(self, batch: list[list[int]]) -> list[NDArray[np.float32]]:
        out = []
        for ids in batch:
            lp = self._logprobs(self._hidden(ids)[:-1])
            out.append(lp[np.arange(len(ids) - 1), np.asarray(ids[1:])].astype(np.float32))
        return out

    def position_dists(self, batch: list[list[int]], top_k: int) -> list[list[TokenDist]]:
        return [
            [token_dist_from_logprobs(row, top_k) for row in self._logprobs(self._hidden(ids)[:-1])]
            for ids in batch
        ]

    def decode_new(self, ids: list[int]) -> str:
        # No tokenizer (so no chat template either: chat=True generates from the plain text).
        return "".join(chr(i + _FIRST_CHAR) for i in ids)

    def generate_tokens(
        self, batch: list[list[int]], max_new_tokens: int, temperature: float, draws: Draws | None
    ) -> list[list[int]]:
        """Row by row; the dummy has no EOS, so every row runs to ``max_new_tokens``."""
        out = []
        for r, ids in enumerate(batch):
            new: list[int] = []
            for step in range(max_new_tokens):
                row = self.last_logprobs([ids + new])[0]
                if draws is None:
                    new.append(int(np.argmax(row)))
                else:
                    new.append(inverse_cdf_np(row, temperature, float(draws[r][step])))
            out.append(new)
        return out

    # -------------------------------------------------------------- views
    def _swap(self, factors: Factors | None, lam: float) -> Restore:
        saved = (self._factors, self._lam)
        self._factors, self._lam = factors, lam

        def restore() -> None:
            self._factors, self._lam = saved

        return restore

    def install_base(self) -> Restore:
        return self._swap(None, 1.0)

    def install_scaled(self, lam: float, modules: frozenset[str] | None = None) -> Restore:
        if modules is not None and modules - {HEAD_PATH}:
            raise ValueError(f"the dummy adapts {HEAD_PATH!r} only, not {sorted(modules)}")
        return self._swap(self._real, lam if modules is None or modules else 1.0)

    def install_null(self, placed: PlacedNull) -> Restore:
        head = placed[HEAD_PATH]
        return self._swap((head.a, head.b), 1.0)

    def install_weights(self, weights: Mapping[str, NDArray[np.float32]]) -> Restore:
        """The one adapted module is the LM head: ``weights["lm_head"]``, ``(vocab, hidden)``."""
        unknown = set(weights) - {HEAD_PATH}
        if unknown:
            raise ValueError(f"the dummy has no module {sorted(unknown)[0]!r}")
        saved = self._head
        if HEAD_PATH in weights:
            w = np.asarray(weights[HEAD_PATH], np.float32)
            if w.shape != saved.T.shape:
                raise ValueError(f"a weight of shape {w.shape} for a {saved.T.shape} head")
            self._head = np.ascontiguousarray(w.T)

        def restore() -> None:
            self._head = saved

        return restore

    def delta_weight(self) -> NDArray[np.float32]:
        """ΔW of whatever adapter the open view runs with (zeros in the base view)."""
        if self._factors is None:
            return np.zeros((self.vocab_size, self._embed.shape[1]), np.float32)
        a, b = self._factors
        return (self._lam * self._scale * b @ a).astype(np.float32)

    def nonfinite_adapter_tensors(self) -> list[str]:
        a, b = self._real
        return [name for name, t in (("lora_a", a), ("lora_b", b)) if not np.all(np.isfinite(t))]

    def mean_hidden(self, batch: list[list[int]]) -> NDArray[np.float32]:
        return np.stack([self._hidden(ids).mean(axis=0) for ids in batch]).astype(np.float32)


class DummyDifferentialBackend(ModelViews):
    """Views of the dummy model; options as :class:`DummyRuntime`'s."""

    def __init__(self, **options: Any) -> None:
        super().__init__(DummyRuntime(**options))
