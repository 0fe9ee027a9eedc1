"""Batched generation with KV caches: one compiled prefill and one compiled decode step.

Example::

  gen = Generator(model, batch=2, capacity=512)
  out = gen.generate([[1, 2, 3], [4, 5]], max_new_tokens=64, temperature=0.8, top_p=0.95)
  out.tokens            # [2, 64] int32 numpy, the new tokens of each prompt
  out.prefill_tokens_per_s, out.decode_tokens_per_s

Prompts of different lengths share the batch without left padding: each row decodes at its own
position (see :mod:`sparse_attention_jax.nn.decode`). The decode step (sampling included) is
compiled once per ``(batch, capacity, greedy)``; ``temperature``/``top_p``/the PRNG key are traced
arguments. ``Generator.traces`` counts how often each function was traced.

``Generator(model, ..., offload=True)`` keeps every NOSA layer's K/V/c in host memory and the
selected blocks in device slots (:mod:`sparse_attention_jax.offload`: one jitted call per step,
prompts of one length); ``result.offload`` then holds the blocks
transferred, hit rate and bytes moved per step and in total.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_attention_jax.nn import decode as dec


def sample_logits(logits, key, *, temperature, top_p, greedy: bool):
  """Next tokens ``[B]`` int32 from ``logits [B, V]``: argmax when ``greedy``, else a draw from
  ``softmax(logits / temperature)`` restricted to the smallest set of tokens whose probability
  reaches ``top_p`` (nucleus; ``top_p >= 1`` keeps all)."""
  logits = logits.astype(jnp.float32)
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
  order = jnp.argsort(-scaled, axis=-1)
  sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the better tokens
  keep = before < top_p
  keep = keep.at[:, 0].set(True)
  choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
  return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@dataclasses.dataclass
class GenerateResult:
  """``tokens [B, N]`` int32 new tokens; timings exclude compilation (reported apart)."""

  tokens: np.ndarray
  prompt_lengths: np.ndarray
  prefill_s: float
  decode_s: float
  compile_s: float
  offload: object | None = None  # offload.OffloadStats with offload

  @property
  def prefill_tokens_per_s(self) -> float:
    return float(self.prompt_lengths.sum()) / max(self.prefill_s, 1e-9)

  @property
  def decode_tokens_per_s(self) -> float:
    b, n = self.tokens.shape
    return b * max(n - 1, 0) / max(self.decode_s, 1e-9)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


class Generator:
  """Cached generation for a ``DecoderLM`` whose layer kinds implement the decode protocol.

  Args:
    model: the model (its current parameters are captured; build a new Generator after
      changing them).
    batch: prompts per call (exactly ``batch``).
    capacity: most tokens per sequence (prompt + new tokens).
    dtype: cache dtype (default: each layer's compute dtype).
    prefill_bucket: the padded prompt length is rounded up to a multiple of this (fewer
      prefill compilations), capped at ``capacity``.
    offload: keep the K/V/c of every NOSA layer in pinned host memory
      (:class:`~sparse_attention_jax.offload.decoder.OffloadedDecoder`, one jitted call per
      step; prompts must share one length): ``True`` (default options) or an
      :class:`~sparse_attention_jax.offload.OffloadConfig`.
    num_slots: device block slots per (sequence, KV head) with ``offload`` (default ``k - 1``).
  """

  def __init__(
    self,
    model,
    *,
    batch: int,
    capacity: int,
    dtype=None,
    prefill_bucket: int = 64,
    offload=False,
    num_slots: int | None = None,
  ):
    dec.check_decodable(model)
    self._offload = None
    if offload is not False:
      from sparse_attention_jax.offload import OffloadConfig, OffloadedDecoder

      if offload is not True and not isinstance(offload, OffloadConfig):
        raise ValueError(f"offload: expected True, False or an OffloadConfig, got {offload!r}")
      self._offload = OffloadedDecoder(
        model,
        batch=batch,
        capacity=capacity,
        dtype=dtype,
        num_slots=num_slots,
        config=None if offload is True else offload,
      )
      self._warm: set[int] = set()
    for name, val in (("batch", batch), ("capacity", capacity), ("prefill_bucket", prefill_bucket)):
      if not isinstance(val, int) or isinstance(val, bool) or val < 1:
        raise ValueError(f"{name}: expected a positive int, got {val!r}")
    self.batch, self.capacity, self.dtype = batch, capacity, dtype
    self.vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    self.prefill_bucket = prefill_bucket
    self.traces = {"prefill": 0, "decode": 0}
    graphdef, self._params = nnx.split(model)
    donate = jax.default_backend() != "cpu"

    def prefill_fn(params, tokens, lengths):
      self.traces["prefill"] += 1
      m = nnx.merge(graphdef, params)
      state = dec.init_decode_state(m, batch, capacity, dtype)
      return dec.prefill(m, tokens, lengths, state)

    def decode_fn(params, tokens, state, key, temperature, top_p, greedy):
      self.traces["decode"] += 1
      logits, state = dec.decode_step(nnx.merge(graphdef, params), tokens, state)
      nxt = sample_logits(logits, key, temperature=temperature, top_p=top_p, greedy=greedy)
      return nxt, state

    def first_fn(logits, key, temperature, top_p, greedy):
      return sample_logits(logits, key, temperature=temperature, top_p=top_p, greedy=greedy)

    self._prefill = jax.jit(prefill_fn)
    self._decode = jax.jit(
      decode_fn, static_argnames="greedy", donate_argnums=(2,) if donate else ()
    )
    self._first = jax.jit(first_fn, static_argnames="greedy")

  def _pad(self, prompts: Sequence[Sequence[int]]):
    if len(prompts) != self.batch:
      raise ValueError(
        f"prompts: expected {self.batch} prompts (the generator's batch), got {len(prompts)}"
      )
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    if lengths.min() < 1:
      raise ValueError(
        f"prompts: expected at least one token per prompt, got lengths {lengths.tolist()}"
      )
    t = min(_round_up(int(lengths.max()), self.prefill_bucket), self.capacity)
    tokens = np.zeros((self.batch, t), np.int32)
    for i, p in enumerate(prompts):
      ids = np.asarray(p)
      if ids.dtype.kind not in "iu":
        raise ValueError(f"prompts[{i}]: expected integer token ids, got dtype {ids.dtype}")
      lo, hi = int(ids.min()), int(ids.max())
      if lo < 0 or (self.vocab_size is not None and hi >= self.vocab_size):
        raise ValueError(
          f"prompts[{i}]: expected token ids in [0, vocab_size={self.vocab_size}), got ids in "
          f"[{lo}, {hi}]"
        )
      tokens[i, : len(p)] = ids.astype(np.int32)
    return tokens, lengths

  def generate(
    self,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    seed: int = 0,
  ) -> GenerateResult:
    """Prefills ``prompts`` (``batch`` token lists) and samples ``max_new_tokens`` per row.

    Raises ``ValueError`` (naming the values) when a prompt plus ``max_new_tokens`` would exceed
    the capacity: nothing is truncated silently.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    if not greedy and not temperature > 0:
      raise ValueError(f"temperature: expected > 0 (or greedy=True), got {temperature!r}")
    if not 0 < top_p <= 1:
      raise ValueError(f"top_p: expected 0 < top_p <= 1, got {top_p!r}")
    tokens, lengths = self._pad(prompts)
    longest = int(lengths.max())
    if longest + max_new_tokens > self.capacity:
      raise ValueError(
        f"max_new_tokens: expected at most capacity - longest prompt = "
        f"{self.capacity} - {longest} = {self.capacity - longest}, got "
        f"{max_new_tokens} (raise capacity)"
      )
    temp, tp = jnp.float32(temperature), jnp.float32(top_p)
    keys = jax.random.split(jax.random.key(seed), max_new_tokens)
    if self._offload is not None:
      return self._generate_offloaded(
        prompts,
        lengths,
        max_new_tokens,
        keys,
        lambda lg, k: self._first(lg, k, temp, tp, greedy=greedy),
      )
    t0 = time.perf_counter()
    pre = self._prefill.lower(self._params, tokens, lengths).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits, state = pre(self._params, tokens, lengths)
    logits.block_until_ready()
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok = self._first(logits, keys[0], temp, tp, greedy=greedy)
    step = self._decode.lower(self._params, tok, state, keys[0], temp, tp, greedy=greedy).compile()
    compile_s += time.perf_counter() - t0
    out = [tok]
    t0 = time.perf_counter()
    for i in range(1, max_new_tokens):
      tok, state = step(self._params, tok, state, keys[i], temp, tp)
      out.append(tok)
    jax.block_until_ready(out)
    decode_s = time.perf_counter() - t0
    return GenerateResult(
      np.stack([np.asarray(t) for t in out], axis=1), lengths, prefill_s, decode_s, compile_s
    )

  def _generate_offloaded(self, prompts, lengths, max_new_tokens, keys, sample):
    from sparse_attention_jax.offload import generate_offloaded

    if len(set(lengths.tolist())) != 1:
      raise ValueError(
        f"prompts: expected prompts of one length with offload=True (the "
        f"offloaded block cache keeps one length per batch), got lengths "
        f"{lengths.tolist()}"
      )
    tokens = np.asarray(prompts, np.int32)
    compile_s = 0.0
    if tokens.shape[1] not in self._warm and max_new_tokens > 1:  # compile outside the timing
      t0 = time.perf_counter()
      logits, caches = self._offload.prefill(tokens)
      for i in range(2):  # the 2nd step recompiles for committed (device-made) inputs
        logits = self._offload.step(sample(logits, keys[0]), caches, tokens.shape[1] + i)[0]
      jax.block_until_ready(logits)
      compile_s = time.perf_counter() - t0
      self._warm.add(tokens.shape[1])
    new, prefill_s, decode_s, stats = generate_offloaded(
      self._offload, tokens, max_new_tokens, sample=sample, keys=keys
    )
    return GenerateResult(new, lengths, prefill_s, decode_s, compile_s, stats)


def greedy_by_reforward(model, prompt: Sequence[int], max_new_tokens: int) -> np.ndarray:
  """Greedy tokens by re-running the full model on the whole sequence for every new token (no
  cache): the reference the cached path is tested against. The sequence sits in a fixed buffer
  of ``len(prompt) + max_new_tokens`` tokens (one compilation; causal attention never sees the
  padding after it). Returns ``[max_new_tokens]`` int32."""
  graphdef, params = nnx.split(model)
  size = len(prompt) + max_new_tokens

  @jax.jit
  def next_token(params, buf, last):
    logits = nnx.merge(graphdef, params)(buf)[0]  # [size, V]
    return jnp.argmax(jnp.take(logits, last, axis=0)).astype(jnp.int32)

  buf = np.zeros((1, size), np.int32)
  buf[0, : len(prompt)] = np.asarray(prompt, np.int32)
  for n in range(len(prompt), size):
    buf[0, n] = int(next_token(params, jnp.asarray(buf), n - 1))
  return buf[0, len(prompt) :].copy()


__all__ = ["GenerateResult", "Generator", "greedy_by_reforward", "sample_logits"]
