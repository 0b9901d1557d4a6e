"""Gated linear recurrences with a matrix state per head, in three forms computing one function:
what Gated DeltaNet, GLA and Mamba-2 (nets/linear_lm.py) run as their token mixer.

Per head the state S_t is a K x V matrix and, with a_t = exp(log_decay_t) (a scalar per head, or
one value per key row: GLA's diagonal gate):
  gated linear attention (beta None):  S_t = a_t ⊙ S_{t-1} + k_t v_tᵀ
  gated delta rule (beta given):       S_t = a_t S_{t-1} + β_t k_t (v_t − a_t S_{t-1}ᵀ k_t)ᵀ
  output:                              o_t = S_tᵀ q_t
``reset_BxS`` True at step t zeroes the state before that step (a new packed document).
Mamba-2's SSD is the first with a scalar decay: q = C, k = B, v = Δ·x, log_decay = Δ·A.

Forms:
  ``naive``    one token at a time (``lax.scan``): the reference the tests compare against.
  ``step``     one token from a given state: generation, O(K·V) per token and head.
  ``chunked``  the training form. The sequence is cut into chunks of C tokens; inside a chunk the
               outputs are masked C x C matmuls, across chunks only the states are carried (a short
               scan of one K x V update per chunk). Decays stay in log space and every exponent is
               of a difference G_t − G_s with t >= s (G the in-chunk cumulative log decay), so no
               factor exceeds 1. The delta rule's chunk uses the WY/UT representation: a unit lower
               triangular solve (I + M) [U | W] = [β V | βγ K] per chunk, M_ts = β_t k_t·k_s
               γ_t/γ_s for s < t, done as (I + M)⁻¹ by matmuls, then one product.
               With a scalar decay and no β (Mamba-2's SSD, or scalar-gated linear attention),
               q and k may have fewer heads than v (G groups of H/G consecutive value heads share
               one q, k: Mamba-2's B and C groups): q·kᵀ is computed once per group, and the state
               a chunk adds, kᵀ(decay ⊙ v), and the outputs read from the state, q S, are one
               product per group with all of its heads' value columns side by side.
All three run in float32 (float64 when given float64, for the tests' references).
Extra legend: K key width (state rows), V value width (state columns), C chunk length, n chunks,
G key heads (groups), r = H/G value heads per group.
"""

import jax
import jax.numpy as jnp


def _float(*xs):
  dtype = jnp.promote_types(jnp.result_type(*[x for x in xs if x is not None]), jnp.float32)
  return [None if x is None else x.astype(dtype) for x in xs]


def _check(q, k, v, log_decay, beta):
  B, S, G, K = q.shape
  H = v.shape[2]
  if k.shape != q.shape or v.shape[:2] != (B, S) or H % G:
    raise ValueError(f"q {q.shape}, k {k.shape} and v {v.shape} must be [B, S, G|H, K|V] alike, "
                     "with the key heads G dividing the value heads H.")
  if log_decay.shape not in ((B, S, H), (B, S, H, K)):
    raise ValueError(f"log_decay {log_decay.shape} must be [B, S, H] or [B, S, H, K].")
  if beta is not None and log_decay.ndim == 4:
    raise ValueError("the delta rule takes a scalar decay per head (log_decay [B, S, H]).")
  if beta is not None and beta.shape != (B, S, H):
    raise ValueError(f"beta {beta.shape} must be [B, S, H].")


@jax.custom_jvp
def _unit_lower_inverse(m):
  """(I + m)⁻¹ for strictly lower triangular m [..., n, n] (``_inverse``), differentiated in
  closed form: with X = (I + m)⁻¹, dX = −X dm X for dm on the strict lower triangle. The rule is
  linear in dm, so reverse mode transposes it: the backward is two matmuls and keeps only X,
  not the doubling's intermediates; forward mode (jacfwd, jvp) works as well."""
  return _inverse(m)


@_unit_lower_inverse.defjvp
def _inverse_jvp(primals, tangents):
  (m,), (dm,) = primals, tangents
  inv = _inverse(m)
  strict = jnp.tril(jnp.ones(m.shape[-2:], bool), -1)
  return inv, -(inv @ jnp.where(strict, dm, 0) @ inv)


def _inverse(m, base: int = 16):
  """(I + m)⁻¹ for strictly lower triangular m [..., n, n], by matmuls only (no LAPACK call, whose
  BLAS threads would compete with XLA's on CPU): the two diagonal blocks inverted (together when
  they are the same size), the lower-left block −D⁻¹ m₂₁ A⁻¹; from ``base`` down, the Neumann
  series I − m + m² − ... summed by doubling (it is finite: m is nilpotent). The leading axes
  are flattened into one, so every matmul is [G, n, n] whatever the depth of the recursion."""
  n = m.shape[-1]
  return _inverse_3d(m.reshape(-1, n, n), base).reshape(m.shape)


def _inverse_3d(m_GxNxN, base: int):
  G, n, _ = m_GxNxN.shape
  if n <= base:
    neg = -m_GxNxN
    inv, power, terms = jnp.eye(n, dtype=neg.dtype) + neg, neg, 2
    while terms < n:
      power = power @ power
      inv = inv + inv @ power
      terms *= 2
    return inv
  h = n // 2
  a, d = m_GxNxN[:, :h, :h], m_GxNxN[:, h:, h:]
  if 2 * h == n:  # both halves in one batch of 2G
    both = _inverse_3d(jnp.concatenate([a, d]), base)
    a_inv, d_inv = both[:G], both[G:]
  else:
    a_inv, d_inv = _inverse_3d(a, base), _inverse_3d(d, base)
  lower_left = -(d_inv @ (m_GxNxN[:, h:, :h] @ a_inv))
  return jnp.concatenate([
      jnp.concatenate([a_inv, jnp.zeros((G, h, n - h), a_inv.dtype)], -1),
      jnp.concatenate([lower_left, d_inv], -1)], -2)


def unit_lower_inverse_flops(n: int, base: int = 16) -> int:
  """The matmul FLOPs (2·M·N·K each) ``_unit_lower_inverse`` runs for one n x n matrix."""
  if n <= base:
    doublings = max(0, (n - 1).bit_length() - 1)  # the terms double from 2 until they reach n
    return doublings * 2 * (2 * n ** 3)
  h = n // 2
  d = n - h
  return (unit_lower_inverse_flops(h, base) + unit_lower_inverse_flops(d, base)
          + 2 * d * h * h + 2 * d * d * h)


def step(q_BxHxK, k_BxHxK, v_BxHxV, log_decay, beta_BxH, state_BxHxKxV):
  """One token: (o [B, H, V], new state). ``log_decay`` is [B, H] or [B, H, K]; q and k may have
  G heads dividing H (each shared by H/G consecutive heads)."""
  q_BxHxK, k_BxHxK = _per_head(v_BxHxV.shape[1], q_BxHxK, k_BxHxK)
  a = jnp.exp(log_decay)
  a = a[..., None, None] if a.ndim == 2 else a[..., None]
  state = a * state_BxHxKxV
  if beta_BxH is None:
    state = state + k_BxHxK[..., :, None] * v_BxHxV[..., None, :]
  else:
    err_BxHxV = v_BxHxV - jnp.einsum("bhkv,bhk->bhv", state, k_BxHxK)
    state = state + (beta_BxH[..., None, None] * k_BxHxK[..., :, None]) * err_BxHxV[..., None, :]
  return jnp.einsum("bhkv,bhk->bhv", state, q_BxHxK), state


def naive(q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, log_decay, beta_BxSxH=None, *,
          initial_state=None, reset_BxS=None):
  """The recurrence token by token. Returns (o [B, S, H, V], final state [B, H, K, V])."""
  _check(q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, log_decay, beta_BxSxH)
  q, k, v, g, beta, s0 = _float(q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, log_decay, beta_BxSxH,
                                initial_state)
  q, k = _per_head(v.shape[2], q, k)
  B, S, H, K = q.shape
  if s0 is None:
    s0 = jnp.zeros((B, H, K, v.shape[-1]), q.dtype)
  keep = (jnp.ones((B, S), bool) if reset_BxS is None else ~reset_BxS.astype(bool))
  t_first = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)

  def body(state, xs):
    q_t, k_t, v_t, g_t, b_t, keep_t = xs
    state = jnp.where(keep_t.reshape((B,) + (1,) * 3), state, 0)
    return step(q_t, k_t, v_t, g_t, b_t, state)[::-1]

  state, o = jax.lax.scan(body, s0, tuple(map(t_first, (q, k, v, g, beta, keep))))
  return jnp.moveaxis(o, 0, 1), state


def _per_head(H: int, *xs):
  """[..., G, K] -> [..., H, K]: head h reads group h // (H/G)."""
  return [x if x.shape[-2] == H else jnp.repeat(x, H // x.shape[-2], axis=-2) for x in xs]


def _reset_masks(reset_BxS, B: int, S: int, n: int, C: int):
  """(linked [B, n, C(t), C(s)], from_start [B, n, C]) of the chunks: s's contribution reaches t
  (s <= t) only when no reset lies in (s, t]; the incoming state reaches t only when none lies in
  [0, t] (resets counted by a cumulative sum over in-chunk positions)."""
  reset = (jnp.zeros((B, S), jnp.int32) if reset_BxS is None else reset_BxS.astype(jnp.int32))
  resets = jnp.cumsum(jnp.pad(reset, [(0, 0), (0, n * C - S)]).reshape(B, n, C), axis=-1)
  linked = jnp.tril(jnp.ones((C, C), bool)) & (resets[..., :, None] == resets[..., None, :])
  return linked, resets == 0


def _chunks(x, n: int, C: int):
  """[B, S, H, ...] padded with zeros to n·C -> [B, H, n, C, ...]."""
  B, S = x.shape[:2]
  x = jnp.pad(x, [(0, 0), (0, n * C - S)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape((B, n, C) + x.shape[2:])
  return jnp.moveaxis(x, 3, 1)


def chunked(q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, log_decay, beta_BxSxH=None, *,
            initial_state=None, reset_BxS=None, chunk: int = 64):
  """The chunkwise-parallel form (same values as ``naive``). Returns (o, final state).

  A sequence the chunk does not divide is padded with identity steps (k = v = 0, decay 1).
  """
  _check(q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, log_decay, beta_BxSxH)
  q, k, v, g, beta, s0 = _float(q_BxSxHxK, k_BxSxHxK, v_BxSxHxV, log_decay, beta_BxSxH,
                                initial_state)
  B, S, _, K = q.shape
  H, Vd = v.shape[2:]
  C = max(1, min(chunk, S))
  n = -(-S // C)
  if s0 is None:
    s0 = jnp.zeros((B, H, K, Vd), q.dtype)
  if beta is None and g.ndim == 3:
    return _scalar_decay_chunked(q, k, v, g, s0, reset_BxS, n, C)
  # From here: the delta rule (scalar decay) and the per-key decay (GLA, no β).
  q, k = _per_head(H, q, k)
  q, k, v, g = (_chunks(x, n, C) for x in (q, k, v, g))  # [B, H, n, C, ...]
  per_key = g.ndim == 5
  linked, from_start = _reset_masks(reset_BxS, B, S, n, C)
  linked, from_start = linked[:, None], from_start[:, None]  # [B, 1, n, C, C], [B, 1, n, C]
  G = jnp.cumsum(g, axis=3)  # [B, H, n, C(, K)]
  G_end = G[:, :, :, -1:]  # [B, H, n, 1(, K)]
  to_end = linked[..., -1, :]  # [B, 1, n, C]: s reaches the chunk's last step
  neg_inf = jnp.asarray(-jnp.inf, q.dtype)
  if per_key:
    gamma = jnp.exp(G) * from_start[..., None]  # decay from the chunk start to t
    decay_ts = jnp.exp(jnp.where(linked[..., None], G[:, :, :, :, None] - G[:, :, :, None],
                                 neg_inf))  # [B, H, n, C, C, K]
    scores_ts = jnp.einsum("bhntk,bhnsk,bhntsk->bhnts", q, k, decay_ts)
    k_end = k * jnp.exp(jnp.where(to_end[..., None], G_end - G, neg_inf))
    chunk_decay = jnp.exp(G_end[:, :, :, 0]) * from_start[..., -1:]  # [B, H, n, K]
  else:
    gamma = jnp.exp(G) * from_start  # [B, H, n, C]
    decay_ts = jnp.exp(jnp.where(linked, G[..., :, None] - G[..., None, :], neg_inf))
    scores_ts = jnp.einsum("bhntk,bhnsk->bhnts", q, k) * decay_ts
    k_end = k * jnp.exp(jnp.where(to_end, G_end - G, neg_inf))[..., None]
    chunk_decay = jnp.exp(G_end[..., 0]) * from_start[..., -1]  # [B, H, n]

  if beta is None:  # the per-key decay
    q_in = q * gamma  # reads the incoming state
    delta_KxV = jnp.einsum("bhnsk,bhnsv->bhnkv", k_end, v)

    def carry(state, xs):
      decay, delta = xs
      return decay[..., None] * state + delta, state

    xs = (jnp.moveaxis(chunk_decay, 2, 0), jnp.moveaxis(delta_KxV, 2, 0))
    final, states = jax.lax.scan(carry, s0, xs)
    states = jnp.moveaxis(states, 0, 2)  # [B, H, n, K, V]: the state entering each chunk
    o = (jnp.einsum("bhnts,bhnsv->bhntv", scores_ts, v)
         + jnp.einsum("bhntk,bhnkv->bhntv", q_in, states))
  else:
    beta = _chunks(beta, n, C)  # [B, H, n, C]
    strict = linked & ~jnp.eye(C, dtype=bool)
    m_ts = jnp.where(strict, beta[..., None] * jnp.einsum("bhntk,bhnsk->bhnts", k, k) * decay_ts,
                     0)
    rhs = jnp.concatenate([beta[..., None] * v, (beta * gamma)[..., None] * k], axis=-1)
    uw = _unit_lower_inverse(m_ts) @ rhs
    u, w = uw[..., :Vd], uw[..., Vd:]  # [B, H, n, C, V], [B, H, n, C, K]
    # Entering state S -> leaving state: chunk_decay·S + k_endᵀ (u − w S).
    trans_KxK = (chunk_decay[..., None, None] * jnp.eye(K, dtype=q.dtype)
                 - jnp.einsum("bhnsk,bhnsj->bhnkj", k_end, w))
    delta_KxV = jnp.einsum("bhnsk,bhnsv->bhnkv", k_end, u)

    def carry(state, xs):
      trans, delta = xs
      return jnp.einsum("bhkj,bhjv->bhkv", trans, state) + delta, state

    xs = (jnp.moveaxis(trans_KxK, 2, 0), jnp.moveaxis(delta_KxV, 2, 0))
    final, states = jax.lax.scan(carry, s0, xs)
    states = jnp.moveaxis(states, 0, 2)
    q_in = gamma[..., None] * q - jnp.einsum("bhnts,bhnsk->bhntk", scores_ts, w)
    o = (jnp.einsum("bhnts,bhnsv->bhntv", scores_ts, u)
         + jnp.einsum("bhntk,bhnkv->bhntv", q_in, states))
  o = jnp.moveaxis(o, 1, 3).reshape(B, n * C, H, Vd)[:, :S]
  return o, final


def _scalar_decay_chunked(q, k, v, g, s0, reset_BxS, n: int, C: int):
  """``chunked`` for a scalar decay per head and no β (SSD), in the sequence's own layout
  [B, n, C, heads, ...] with q, k per group: q·kᵀ once per group; the state a chunk adds and the
  outputs read from the entering state as one product per group over all its heads' value
  columns (K x C by C x rV, C x K by K x rV); only the in-chunk scores times the values are per
  head (C x C by C x V)."""
  B, S, G, K = q.shape
  H, Vd = v.shape[2:]
  r = H // G
  pad = lambda x: jnp.pad(x, [(0, 0), (0, n * C - S)] + [(0, 0)] * (x.ndim - 2)).reshape(
      (B, n, C) + x.shape[2:])
  q, k, v, g = pad(q), pad(k), pad(v), pad(g)  # [B, n, C, G|H, ...]
  linked, from_start = _reset_masks(reset_BxS, B, S, n, C)  # [B, n, C(t), C(s)], [B, n, C]
  G_cum = jnp.cumsum(g, axis=2)  # [B, n, C, H]
  G_end = G_cum[:, :, -1]  # [B, n, H]
  neg_inf = jnp.asarray(-jnp.inf, q.dtype)
  # In-chunk: scores_ts = (q_t·k_s) exp(G_t − G_s) on linked (t, s), per head.
  qk = jnp.einsum("bntgk,bnsgk->bngts", q, k)  # [B, n, G, C, C]
  G_ht = jnp.moveaxis(G_cum, 3, 2).reshape(B, n, G, r, C)
  decay = jnp.exp(jnp.where(linked[:, :, None, None], G_ht[..., :, None] - G_ht[..., None, :],
                            neg_inf))  # [B, n, G, r, C, C]
  v_g = v.reshape(B, n, C, G, r, Vd)
  o = jnp.einsum("bngrts,bnsgrv->bntgrv", qk[:, :, :, None] * decay, v_g)
  # Across chunks: the state entering chunk j, S_j = chunk_decay_{j-1} S_{j-1} + kᵀ(w ⊙ v) of
  # chunk j − 1, with w_s = exp(G_end − G_s) where s reaches the chunk's end.
  to_end = linked[:, :, -1, :]  # [B, n, C]
  w = jnp.exp(jnp.where(to_end[..., None], G_end[:, :, None] - G_cum, neg_inf))  # [B, n, C, H]
  delta = jnp.einsum("bnsgk,bnsgrv->bngkrv", k, v_g * w.reshape(B, n, C, G, r, 1))
  chunk_decay = (jnp.exp(G_end) * from_start[:, :, -1:]).reshape(B, n, G, 1, r, 1)

  def carry(state, xs):
    decay_j, delta_j = xs
    return decay_j * state + delta_j, state

  s0 = jnp.swapaxes(s0.reshape(B, G, r, K, Vd), 2, 3)  # [B, G, K, r, V]
  final, states = jax.lax.scan(carry, s0, (jnp.moveaxis(chunk_decay, 1, 0),
                                            jnp.moveaxis(delta, 1, 0)))
  states = jnp.moveaxis(states, 0, 1)  # [B, n, G, K, r, V]
  gamma = (jnp.exp(G_cum) * from_start[..., None]).reshape(B, n, C, G, r, 1)
  o = o + jnp.einsum("bntgk,bngkrv->bntgrv", q, states) * gamma
  o = o.reshape(B, n * C, H, Vd)[:, :S]
  return o, jnp.swapaxes(final, 2, 3).reshape(B, H, K, Vd)
