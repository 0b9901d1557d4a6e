"""Multi-scale residual vector quantisation: the quantiser of VAR's tokenizer ("Visual
Autoregressive Modeling: Scalable Image Generation via Next-Scale Prediction", Tian et al. 2024).

A feature map f [B, h, w, C] becomes K token maps, one per scale s_1 < ... < s_K = h (square
maps; VAR's 1, 2, 3, 4, 5, 6, 8, 10, 13, 16 for 16x16 features of 256 px images), all from one
shared codebook E [V, C]. With f̂_0 = 0 and, for k = 1..K:

  r_k   = area(f - f̂_{k-1}, s_k)                   the residual, averaged down to s_k x s_k
  ids_k = argmin_v |r_k - E_v|^2                    [B, s_k, s_k]
  h_k   = phi_k(cubic(E[ids_k], h))                 up to h x h, then phi_k
  f̂_k   = f̂_{k-1} + h_k

phi_k(x) = (1 - a) x + a conv3x3_k(x) (VAR's ``quant_resi`` a = 0.5; one conv per scale here,
where VAR shares four among the scales). Decoding ids is the same sum, so ``decode_ids`` of the
ids gives f̂_K exactly. Training uses VAR's loss, averaged over the scales:
beta |sg(f̂_k) - f|^2 (commitment: moves the encoder) + |f̂_k - sg(f)|^2 (moves the codebook and
phi), and passes f̂_K to the decoder with the straight-through estimator f + sg(f̂_K - f), so the
decoder's gradient reaches the encoder unchanged.

``area`` is adaptive average pooling (torch's ``F.interpolate(mode="area")``) and ``cubic`` is
``jax.image.resize(method="cubic")`` (Keys' a = -0.5; torch's bicubic, which VAR uses, has
a = -0.75): both are fixed [s, h] matrices applied to rows and columns, so a scale is two small
einsums that XLA fuses and shards over the batch.

Codebook usage: per-code counts of a batch's ids over all scales, their perplexity
exp(-sum p log p) and the codes no id chose; ``restart_dead_codes`` moves codes whose running
usage fell below a threshold onto residual vectors drawn from the batch (Jukebox, Dhariwal et al.
2020), so the codebook does not collapse onto a few entries.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
  """The quantiser's hyperparameters (a part of the tokenizer family's Config)."""
  codebook_size: int = 4096  # V
  embed_dim: int = 32  # C, the feature channels quantised
  scales: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # side of each token map; last = h
  beta: float = 0.25  # commitment weight
  quant_resi: float = 0.5  # phi's conv share a
  dtype: str = "float32"
  param_dtype: str = "float32"

  def validate(self):
    for name in ("codebook_size", "embed_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"model.{name}={getattr(self, name)} must be a positive integer.")
    s = tuple(self.scales)
    if not s or any(b <= a for a, b in zip(s, s[1:])) or s[0] < 1:
      raise ValueError(f"model.scales={s} must be positive token-map sides in increasing order "
                       "(e.g. (1, 2, 3, 4, 6, 8)).")
    if not (math.isfinite(self.beta) and self.beta >= 0):
      raise ValueError(f"model.beta={self.beta} must be a finite number >= 0.")
    if not 0.0 <= self.quant_resi <= 1.0:
      raise ValueError(f"model.quant_resi={self.quant_resi} must be in [0, 1].")

  @property
  def tokens(self) -> int:
    """Tokens of one image over all scales: sum of s_k^2."""
    return sum(s * s for s in self.scales)


def area_matrix(n_out: int, n_in: int) -> np.ndarray:
  """[n_out, n_in] float32: adaptive average pooling along one axis (row i averages the inputs
  floor(i n_in / n_out) .. ceil((i + 1) n_in / n_out) - 1); the identity when n_out == n_in."""
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    lo, hi = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def cubic_matrix(n_out: int, n_in: int) -> np.ndarray:
  """[n_out, n_in] float32: jax.image.resize's cubic interpolation along one axis (rows of the
  resized identity): Keys' cubic kernel (a = -0.5) at half-pixel centres, widened by the
  factor when shrinking (antialiasing) and renormalised over the inputs that exist; the identity
  when n_out == n_in, constant rows from one input. Computed in numpy, so it is a constant under
  jit too (tests/nets/test_msvq.py holds it to jax.image.resize)."""
  scale = n_out / n_in
  width = max(1.0, 1.0 / scale)
  x = np.abs(((np.arange(n_out) + 0.5) / scale - 0.5)[:, None] - np.arange(n_in)[None, :]) / width
  a = -0.5
  w = np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
               np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))
  return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def resize(x_BxHxWxC, m_IxH, m_JxW):
  """x resized by a row matrix and a column matrix: [B, I, J, C]."""
  return jnp.einsum("ih,bhwc,jw->bijc", m_IxH, x_BxHxWxC, m_JxW)


def nearest_codes(r_BxSxSxC, codebook_VxC):
  """ids [B, S, S] int32 of the codes nearest each residual vector (squared L2; ties to the lower
  id), computed as |r|^2 - 2 r.E + |E|^2 in float32."""
  r = r_BxSxSxC.astype(jnp.float32)
  e = codebook_VxC.astype(jnp.float32)
  d = (jnp.sum(r * r, -1, keepdims=True) - 2.0 * jnp.einsum("bijc,vc->bijv", r, e)
       + jnp.sum(e * e, -1))
  return jnp.argmin(d, axis=-1).astype(jnp.int32)


class Phi(nn.Module):
  """phi(x) = (1 - a) x + a conv3x3(x), C -> C (VAR's quant_resi)."""
  cfg: Any

  @nn.compact
  def __call__(self, x_BxHxWxC):
    a = self.cfg.quant_resi
    C = x_BxHxWxC.shape[-1]
    conv = nn.Conv(C, (3, 3), padding="SAME", dtype=jnp.dtype(self.cfg.dtype),
                   param_dtype=jnp.dtype(self.cfg.param_dtype), name="conv",
                   kernel_init=nn.with_logical_partitioning(
                       nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                       (None, None, None, "norm")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))
    return (1.0 - a) * x_BxHxWxC + a * conv(x_BxHxWxC)


class Quantizer(nn.Module):
  """f [B, h, w, C] -> (f̂ with the straight-through gradient [B, h, w, C] float32, the ids of
  every scale (a tuple of [B, s_k, s_k] int32), the VQ loss (scalar), usage counts [V])."""
  cfg: QuantizerConfig

  def setup(self):
    cfg = self.cfg
    V = cfg.codebook_size
    self.codebook = self.param(
        "codebook", nn.with_logical_partitioning(
            lambda k, s, d: jax.random.uniform(k, s, d, -1.0 / V, 1.0 / V), (None, "norm")),
        (V, cfg.embed_dim), jnp.dtype(cfg.param_dtype))
    self.phis = [Phi(cfg, name=f"phi_{k}") for k in range(len(cfg.scales))]

  def _check(self, f_BxHxWxC):
    cfg = self.cfg
    _, H, W, C = f_BxHxWxC.shape
    if H != W or H != cfg.scales[-1] or C != cfg.embed_dim:
      raise ValueError(f"features are {H}x{W}x{C} but the quantiser expects "
                       f"{cfg.scales[-1]}x{cfg.scales[-1]}x{cfg.embed_dim} (the last of "
                       f"model.scales={cfg.scales}, model.embed_dim).")
    return H

  def scale_features(self, k: int, ids_BxSxS, h: int):
    """h_k [B, h, h, C]: scale k's codes up to h x h through phi_k."""
    s = self.cfg.scales[k]
    z = jnp.take(self.codebook, ids_BxSxS, axis=0).astype(jnp.float32)
    up = jnp.asarray(cubic_matrix(h, s))
    return self.phis[k](resize(z, up, up)).astype(jnp.float32)

  def __call__(self, f_BxHxWxC):
    cfg = self.cfg
    h = self._check(f_BxHxWxC)
    f = f_BxHxWxC.astype(jnp.float32)
    f_sg = jax.lax.stop_gradient(f)
    f_hat = jnp.zeros_like(f)
    ids, loss = [], 0.0
    counts = jnp.zeros((cfg.codebook_size,), jnp.float32)
    for k, s in enumerate(cfg.scales):
      down = jnp.asarray(area_matrix(s, h))
      r = resize(f_sg - jax.lax.stop_gradient(f_hat), down, down)
      ids_k = nearest_codes(r, jax.lax.stop_gradient(self.codebook))
      f_hat = f_hat + self.scale_features(k, ids_k, h)
      loss = loss + (cfg.beta * jnp.mean(jnp.square(jax.lax.stop_gradient(f_hat) - f))
                     + jnp.mean(jnp.square(f_hat - f_sg)))
      counts = counts.at[ids_k.reshape(-1)].add(1.0)
      ids.append(ids_k)
    f_st = f + jax.lax.stop_gradient(f_hat - f)
    return f_st, tuple(ids), loss / len(cfg.scales), counts

  def encode(self, f_BxHxWxC):
    """(ids of every scale, residuals [B, tokens, C] float32): the token maps of f and the
    residual vectors they quantised, scale by scale (no loss, no gradient)."""
    cfg = self.cfg
    h = self._check(f_BxHxWxC)
    f = jax.lax.stop_gradient(f_BxHxWxC.astype(jnp.float32))
    codebook = jax.lax.stop_gradient(self.codebook)
    f_hat = jnp.zeros_like(f)
    ids, residuals = [], []
    for k, s in enumerate(cfg.scales):
      down = jnp.asarray(area_matrix(s, h))
      r = resize(f - f_hat, down, down)
      ids_k = nearest_codes(r, codebook)
      f_hat = f_hat + jax.lax.stop_gradient(self.scale_features(k, ids_k, h))
      ids.append(ids_k)
      residuals.append(r.reshape(r.shape[0], s * s, -1))
    return tuple(ids), jnp.concatenate(residuals, axis=1)

  def decode_ids(self, ids, partial: bool = False):
    """f̂ [B, h, h, C] from the ids of every scale (a sequence of [B, s_k, s_k]); with
    ``partial`` the ids of the first k scales give f̂_k, the coarser map after k of them."""
    cfg = self.cfg
    if len(ids) != len(cfg.scales) and not (partial and 0 < len(ids) < len(cfg.scales)):
      raise ValueError(f"got token maps of {len(ids)} scales; the quantiser has "
                       f"{len(cfg.scales)} (model.scales={cfg.scales}).")
    h = cfg.scales[-1]
    return sum(self.scale_features(k, ids_k, h) for k, ids_k in enumerate(ids))


def perplexity(counts_V) -> jax.Array:
  """exp of the entropy of the code distribution: V when every code is used equally, 1 when
  one code takes every id."""
  p = counts_V / jnp.maximum(jnp.sum(counts_V), 1.0)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def restart_dead_codes(codebook_VxC, usage_V, candidates_NxC, rng, threshold: float):
  """(codebook, restarted bool [V]): codes whose running usage is below ``threshold`` become
  candidate vectors (e.g. the batch's encoder residuals) drawn uniformly with replacement; the
  others are kept bit for bit."""
  dead_V = usage_V < threshold
  pick = jax.random.randint(rng, (codebook_VxC.shape[0],), 0, candidates_NxC.shape[0])
  fresh = jnp.take(candidates_NxC, pick, axis=0).astype(codebook_VxC.dtype)
  return jnp.where(dead_V[:, None], fresh, codebook_VxC), dead_V
