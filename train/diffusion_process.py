"""Diffusion math as pure JAX functions: noise schedules, DDPM / flow-matching losses, samplers.

Follows improved-DDPM / DiT (openai/guided-diffusion gaussian_diffusion.py as reused by
facebookresearch/DiT): epsilon prediction, optional learned interpolated variance trained with the
"hybrid" loss (mse + vb), DDPM ancestral and DDIM sampling on respaced timesteps; plus rectified
flow / flow matching with an Euler sampler.

Layout: images and latents are channels-last, ``[B, ..., C]`` (e.g. ``[B, H, W, C]``); a model
output has ``C`` channels, or ``2C`` when it learns the variance (epsilon first, then the variance
interpolation values ``v`` in [-1, 1]).

Time convention seen by the model (one scale for every objective, DiT's timestep embedder was
built for it):
  * DDPM / DDIM: integer timesteps ``t`` (int32, shape [B]) in ``[0, T)``, ``T`` = the training
    schedule's length (1000 for DiT). A respaced sampler still passes the original training
    timestep of each step, as DiT's ``_WrappedModel`` does.
  * Flow matching: continuous ``t`` in [0, 1] with ``x_t = (1 - t) x0 + t eps`` (t=0 data, t=1
    noise); the model receives ``t * FLOW_TIME_SCALE`` (float32 in [0, 1000]) so the same
    sinusoidal embedder works unchanged. Both ``flow_loss`` and ``flow_sample`` apply the scale.

Training losses take ``model_fn(x_t, t, y, rng) -> output`` (rng for dropout / label drop);
samplers take ``model_fn(x_t, t, y) -> output`` (deterministic eval mode). Samplers run one
``lax.fori_loop``, so jitting one traces the model once whatever the number of steps.
"""

import dataclasses
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nets import layers

# Flow time t in [0, 1] is multiplied by this before reaching the model (DiT's embedder scale).
FLOW_TIME_SCALE = 1000.0

# --------------------------------------------------------------------------------------------
# Schedules


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hash by identity, usable as a static arg
class Schedule:
  """Per-step quantities of a discrete Gaussian diffusion, float64 numpy arrays of length T."""
  betas: np.ndarray
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  sqrt_alphas_cumprod: np.ndarray
  sqrt_one_minus_alphas_cumprod: np.ndarray
  sqrt_recip_alphas_cumprod: np.ndarray
  sqrt_recipm1_alphas_cumprod: np.ndarray
  log_betas: np.ndarray
  posterior_variance: np.ndarray
  posterior_log_variance_clipped: np.ndarray
  posterior_mean_coef1: np.ndarray
  posterior_mean_coef2: np.ndarray
  # The model-facing timestep of each step: arange(T), or the kept steps of a respaced schedule.
  timesteps: np.ndarray

  @property
  def num_steps(self) -> int:
    return int(self.betas.shape[0])


def _linear_betas(num_steps: int) -> np.ndarray:
  # Ho et al.'s 1e-4..0.02 for T=1000, rescaled so other T keep the same overall noise level.
  scale = 1000.0 / num_steps
  return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def _cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  # Nichol & Dhariwal: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2); beta clipped at
  # 0.999 to avoid the singularity at t = T. Step index i ends at time (i+1)/T, so before clipping
  # alphas_cumprod[i] = f((i+1)/T)/f(0).
  f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
  u = np.arange(num_steps + 1) / num_steps
  return np.minimum(1 - f(u[1:]) / f(u[:-1]), max_beta).astype(np.float64)


def schedule_from_betas(betas, timesteps=None) -> Schedule:
  """Builds every derived quantity from ``betas`` (computed once in float64)."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or not ((betas > 0).all() and (betas < 1).all()):
    raise ValueError("betas must be a 1-D array with every value in (0, 1) (a beta of 1 destroys "
                     "the signal: alphas_cumprod reaches 0).")
  T = betas.shape[0]
  ac = np.cumprod(1.0 - betas)
  ac_prev = np.append(1.0, ac[:-1])
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  # The posterior variance is 0 at t=0; its log is clipped to the t=1 value (as the reference).
  post_log_var = np.log(np.append(post_var[1], post_var[1:])) if T > 1 else np.log(betas)
  arrays = dict(
      betas=betas, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev,
      sqrt_alphas_cumprod=np.sqrt(ac), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
      log_betas=np.log(betas), posterior_variance=post_var,
      posterior_log_variance_clipped=post_log_var,
      posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
      posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
      timesteps=np.arange(T, dtype=np.int32) if timesteps is None else
      np.asarray(timesteps, dtype=np.int32))
  for a in arrays.values():
    a.flags.writeable = False
  return Schedule(**arrays)


_BETAS = {"linear": _linear_betas, "cosine": _cosine_betas}


def make_schedule(kind: str, num_steps: int) -> Schedule:
  """The ``kind`` ("linear" or "cosine") noise schedule with ``num_steps`` steps."""
  if kind not in _BETAS:
    raise ValueError(f"Unknown noise schedule {kind!r}; use one of {sorted(_BETAS)}.")
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps} must be at least 1.")
  if kind == "linear" and num_steps <= 20:
    raise ValueError(f"The linear schedule needs num_steps > 20, got {num_steps}: its betas are "
                     "scaled by 1000/num_steps and would reach 1; use 'cosine' or respace().")
  return schedule_from_betas(_BETAS[kind](num_steps))


def respace(schedule: Schedule, steps: int) -> Schedule:
  """A ``steps``-step schedule on evenly spaced timesteps of ``schedule`` (DiT's SpacedDiffusion).

  Keeps alphas_cumprod at the kept steps and recomputes betas from them; ``timesteps`` maps each
  new step back to the original timestep that the model was trained on.
  """
  T = schedule.num_steps
  if not 1 <= steps <= T:
    raise ValueError(f"steps={steps} must be between 1 and the schedule's {T} steps.")
  if steps == 1:
    kept = np.array([T - 1])
  else:  # Same as the reference's space_timesteps(T, str(steps)) for a single section.
    kept = np.round(np.linspace(0, T - 1, steps)).astype(np.int64)
  ac = schedule.alphas_cumprod[kept]
  betas = 1.0 - ac / np.append(1.0, ac[:-1])
  return schedule_from_betas(betas, timesteps=kept)


def _at(arr: np.ndarray, t, ndim: int) -> jax.Array:
  """arr[t] as float32, shaped [B, 1, ..., 1] to broadcast against an ndim-rank batch."""
  vals = jnp.asarray(arr, jnp.float32)[t]
  return vals.reshape(vals.shape + (1,) * (ndim - vals.ndim))


def q_sample(schedule: Schedule, x0, t, noise) -> jax.Array:
  """Sample of q(x_t | x0) = N(sqrt(ᾱ_t) x0, (1 - ᾱ_t) I) with the given standard-normal noise."""
  return (_at(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
          + _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


# --------------------------------------------------------------------------------------------
# Gaussian reverse process helpers


def _split_output(out, x, learn_sigma: bool):
  """(eps, var_values or None) from a model output, with a clear error on a channel mismatch."""
  C = x.shape[-1]
  want = 2 * C if learn_sigma else C
  if out.shape != x.shape[:-1] + (want,):
    raise ValueError(
        f"model output has shape {out.shape}, expected {x.shape[:-1] + (want,)} for input "
        f"{x.shape} with learn_sigma={learn_sigma} (epsilon{' + variance' * learn_sigma} "
        "channels last).")
  out = out.astype(jnp.float32)
  return (out[..., :C], out[..., C:]) if learn_sigma else (out, None)


def _p_mean_variance(schedule: Schedule, eps, var_values, x, t, *, clip: bool):
  """Mean, log-variance and x0 prediction of p(x_{t-1} | x_t) from predicted eps (and v)."""
  nd = x.ndim
  pred_x0 = _at(schedule.sqrt_recip_alphas_cumprod, t, nd) * x - \
      _at(schedule.sqrt_recipm1_alphas_cumprod, t, nd) * eps
  if clip:
    pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
  mean = _at(schedule.posterior_mean_coef1, t, nd) * pred_x0 + \
      _at(schedule.posterior_mean_coef2, t, nd) * x
  min_log = _at(schedule.posterior_log_variance_clipped, t, nd)
  if var_values is None:  # Fixed small variance (the true posterior's).
    log_var = jnp.broadcast_to(min_log, x.shape)
  else:  # Learned range: v in [-1, 1] interpolates log variance between posterior and beta_t.
    frac = (var_values + 1.0) / 2.0
    log_var = frac * _at(schedule.log_betas, t, nd) + (1.0 - frac) * min_log
  return mean, log_var, pred_x0


def _normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _approx_standard_normal_cdf(x):
  # The reference's tanh approximation, kept so vb values match it.
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _discretized_gaussian_log_likelihood(x, mean, log_scale):
  """log p(x) for data in [-1, 1] quantised to 256 bins, under N(mean, e^{2 log_scale})."""
  centered = x - mean
  inv_std = jnp.exp(-log_scale)
  cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _mean_flat(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _vb_bits_per_dim(schedule: Schedule, eps, var_values, x0, x_t, t):
  """Per-example VLB term in bits/dim: KL(q(x_{t-1}|x_t,x0) || p) for t>0, decoder NLL at t=0."""
  nd = x0.ndim
  true_mean = _at(schedule.posterior_mean_coef1, t, nd) * x0 + \
      _at(schedule.posterior_mean_coef2, t, nd) * x_t
  true_log_var = _at(schedule.posterior_log_variance_clipped, t, nd)
  mean, log_var, _ = _p_mean_variance(schedule, eps, var_values, x_t, t, clip=False)
  kl = _mean_flat(_normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
  nll = -_mean_flat(_discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
  return jnp.where(t == 0, nll, kl)


# --------------------------------------------------------------------------------------------
# Losses


def ddpm_loss(model_fn: Callable, schedule: Schedule, x0, y, rng, *, learn_sigma: bool,
              t=None, noise=None):
  """Epsilon-prediction loss (mse, + vb when learn_sigma: DiT's hybrid loss); (loss, metrics).

  t ~ U{0..T-1} and noise ~ N(0, I) are drawn from ``rng`` unless given (tests, fixed-t eval).
  The vb term sees the predicted mean through a stop-gradient, so it trains only the variance.
  x0 is assumed in [-1, 1] for the discretised decoder likelihood at t=0 (as the reference).
  """
  t_rng, noise_rng, model_rng = jax.random.split(rng, 3)
  x0 = x0.astype(jnp.float32)
  B = x0.shape[0]
  if t is None:
    t = jax.random.randint(t_rng, (B,), 0, schedule.num_steps, dtype=jnp.int32)
  if noise is None:
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  x_t = q_sample(schedule, x0, t, noise)
  eps, var_values = _split_output(model_fn(x_t, t, y, model_rng), x_t, learn_sigma)
  mse = _mean_flat((noise - eps) ** 2)
  metrics = {"mse": jnp.mean(mse)}
  per_example = mse
  if learn_sigma:
    vb = _vb_bits_per_dim(schedule, jax.lax.stop_gradient(eps), var_values, x0, x_t, t)
    metrics["vb"] = jnp.mean(vb)
    per_example = mse + vb
  loss = jnp.mean(per_example).astype(jnp.float32)
  return loss, metrics


def shift_time(t, shift: float):
  """SD3's resolution-dependent timestep shift: t -> s t / (1 + (s - 1) t) (s = 1: unchanged).

  The same t spends more of [0, 1] at high noise for s > 1, where a larger or more redundant image
  (here: upscaled digits on a mostly empty canvas) still shows its content; Esser et al. (2024)
  shift both the training timesteps and the sampling grid."""
  if shift == 1.0:
    return t
  return shift * t / (1.0 + (shift - 1.0) * t)


def flow_loss(model_fn: Callable, x0, y, rng, *, time_dist: str = "uniform", t=None, noise=None,
              shift: float = 1.0):
  """Rectified-flow / flow-matching loss: MSE between predicted and true velocity eps - x0.

  x_t = (1 - t) x0 + t eps, t ~ U(0, 1) (``time_dist="uniform"``) or sigmoid(N(0, 1))
  (``"logit_normal"``, SD3), then shifted by ``shift`` (``shift_time``; a given t is not);
  the model receives t * FLOW_TIME_SCALE. Returns (loss, metrics).
  """
  t_rng, noise_rng, model_rng = jax.random.split(rng, 3)
  x0 = x0.astype(jnp.float32)
  B = x0.shape[0]
  if t is None:
    if time_dist == "uniform":
      t = jax.random.uniform(t_rng, (B,), jnp.float32)
    elif time_dist == "logit_normal":
      t = jax.nn.sigmoid(jax.random.normal(t_rng, (B,), jnp.float32))
    else:
      raise ValueError(f"Unknown flow time distribution {time_dist!r}; use 'uniform' or "
                       "'logit_normal'.")
    t = shift_time(t, shift)
  if noise is None:
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  t_b = t.reshape((B,) + (1,) * (x0.ndim - 1))
  x_t = (1.0 - t_b) * x0 + t_b * noise
  v, _ = _split_output(model_fn(x_t, t * FLOW_TIME_SCALE, y, model_rng), x_t, learn_sigma=False)
  mse = jnp.mean((v - (noise - x0)) ** 2).astype(jnp.float32)
  return mse, {"mse": mse}


def _packed_noising(x0_BxSxP, segment_ids_BxS, num_slots: int, rng, draw_t, t_BxK, noise):
  """Shared by the packed losses: (t per slot [B, K], t per token [B, S], noise, model rng);
  t and noise are drawn unless given."""
  t_rng, noise_rng, model_rng = jax.random.split(rng, 3)
  B = x0_BxSxP.shape[0]
  if t_BxK is None:
    t_BxK = draw_t(t_rng, (B, num_slots))
  if noise is None:
    noise = jax.random.normal(noise_rng, x0_BxSxP.shape, jnp.float32)
  slot_BxS = jnp.clip(segment_ids_BxS - 1, 0, num_slots - 1)
  t_BxS = jnp.take_along_axis(t_BxK, slot_BxS, axis=1)
  return t_BxK, t_BxS, noise, model_rng


def _per_image_mean(per_token_BxS, segment_ids_BxS, image_mask_BxK):
  """Each image's mean of its tokens' values, then the mean over the slots holding an image:
  every pixel of an image weighs alike, and every image alike (as the unpacked losses)."""
  onehot_BxSxK = layers.slot_onehot(segment_ids_BxS, image_mask_BxK.shape[1])
  sums_BxK = jnp.einsum("bs,bsk->bk", per_token_BxS, onehot_BxSxK)
  per_image_BxK = sums_BxK / jnp.maximum(jnp.sum(onehot_BxSxK, axis=1), 1.0)
  mask = image_mask_BxK.astype(jnp.float32)
  return jnp.sum(per_image_BxK * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def packed_ddpm_loss(model_fn: Callable, schedule: Schedule, x0_BxSxP, segment_ids_BxS,
                     image_mask_BxK, y_BxK, rng, *, channels: int, learn_sigma: bool,
                     t=None, noise=None):
  """``ddpm_loss`` on packed rows of images (train/image_packing.py's layout): a timestep per
  image slot, noise per token, the mse (+ vb) per pixel averaged per image, then over images.
  ``model_fn(x_t [B, S, P], t [B, K], y [B, K], rng)`` -> [B, S, P·(2 with learn_sigma)];
  ``t`` [B, K] and ``noise`` [B, S, P] are drawn from ``rng`` unless given."""
  x0 = x0_BxSxP.astype(jnp.float32)
  B, S, P = x0.shape
  K = image_mask_BxK.shape[1]
  draw = lambda key, shape: jax.random.randint(key, shape, 0, schedule.num_steps, jnp.int32)
  t_BxK, t_BxS, noise, model_rng = _packed_noising(x0, segment_ids_BxS, K, rng, draw, t, noise)
  x_t = q_sample(schedule, x0, t_BxS, noise)
  out = model_fn(x_t, t_BxK, y_BxK, model_rng)
  # Tokens as examples of [p·p, C] pixels: the per-example helpers then give per-token values.
  pixels = lambda a: a.reshape(B * S, P // channels, -1)
  eps, var_values = _split_output(pixels(out), pixels(x_t), learn_sigma)
  per_token = _mean_flat((pixels(noise) - eps) ** 2)
  mean = lambda v: _per_image_mean(v.reshape(B, S), segment_ids_BxS, image_mask_BxK)
  metrics = {"mse": mean(per_token)}
  if learn_sigma:
    vb = _vb_bits_per_dim(schedule, jax.lax.stop_gradient(eps), var_values, pixels(x0),
                          pixels(x_t), t_BxS.reshape(B * S))
    metrics["vb"] = mean(vb)
    per_token = per_token + vb
  return mean(per_token).astype(jnp.float32), metrics


def packed_flow_loss(model_fn: Callable, x0_BxSxP, segment_ids_BxS, image_mask_BxK, y_BxK, rng,
                     *, t=None, noise=None):
  """``flow_loss`` (uniform t) on packed rows: t per image slot, the velocity mse per pixel
  averaged per image, then over images."""
  x0 = x0_BxSxP.astype(jnp.float32)
  K = image_mask_BxK.shape[1]
  draw = lambda key, shape: jax.random.uniform(key, shape, jnp.float32)
  t_BxK, t_BxS, noise, model_rng = _packed_noising(x0, segment_ids_BxS, K, rng, draw, t, noise)
  x_t = (1.0 - t_BxS[..., None]) * x0 + t_BxS[..., None] * noise
  v = model_fn(x_t, t_BxK * FLOW_TIME_SCALE, y_BxK, model_rng).astype(jnp.float32)
  per_token = jnp.mean((v - (noise - x0)) ** 2, axis=-1)
  mse = _per_image_mean(per_token, segment_ids_BxS, image_mask_BxK).astype(jnp.float32)
  return mse, {"mse": mse}


# --------------------------------------------------------------------------------------------
# Samplers


def _start(shape, rng, noise):
  """(x_T, rng for the per-step noise): x_T drawn from rng unless given."""
  shape = tuple(shape)
  noise_rng, rng = jax.random.split(rng)
  if noise is None:
    return jax.random.normal(noise_rng, shape, jnp.float32), rng
  if tuple(noise.shape) != shape:
    raise ValueError(f"noise has shape {noise.shape}, expected the sample shape {shape}.")
  return jnp.asarray(noise, jnp.float32), rng


def ddpm_sample(model_fn: Callable, schedule: Schedule, shape, y, rng, *, learn_sigma: bool,
                clip: bool = True, steps: int | None = None, noise=None):
  """Ancestral sampling from pure noise; returns x0 of ``shape`` (float32).

  Uses the learned variance when learn_sigma, else the fixed posterior variance. ``steps`` (e.g.
  250 as DiT's sample.py) respaces the schedule; None runs all T steps. ``clip`` clamps the x0
  prediction to [-1, 1]: right for pixels, turn it off for VAE latents (DiT does). ``noise``
  optionally gives the starting x_T; ``rng`` then drives only the per-step noise.
  """
  sched = schedule if steps is None else respace(schedule, steps)
  n = sched.num_steps
  shape = tuple(shape)
  x, rng = _start(shape, rng, noise)
  B = shape[0]

  def body(i, x):
    idx = jnp.full((B,), n - 1 - i, jnp.int32)
    t_model = jnp.asarray(sched.timesteps)[idx]
    eps, var_values = _split_output(model_fn(x, t_model, y), x, learn_sigma)
    mean, log_var, _ = _p_mean_variance(sched, eps, var_values, x, idx, clip=clip)
    z = jax.random.normal(jax.random.fold_in(rng, i), shape, jnp.float32)
    nonzero = (idx != 0).astype(jnp.float32).reshape((B,) + (1,) * (x.ndim - 1))
    return mean + nonzero * jnp.exp(0.5 * log_var) * z

  return jax.lax.fori_loop(0, n, body, x)


def ddim_sample(model_fn: Callable, schedule: Schedule, shape, y, rng, *, steps: int,
                eta: float = 0.0, learn_sigma: bool, clip: bool = True, noise=None):
  """DDIM (Song et al. eq. 12) on ``steps`` respaced timesteps; eta=0 is deterministic.

  The learned-variance channels, if any, are ignored (eta sets the noise). ``clip`` as in
  ddpm_sample; eps is re-derived from the clipped x0 as in the reference. ``noise`` as in
  ddpm_sample: with a given x_T and eta=0 the result does not depend on ``rng``.
  """
  sched = respace(schedule, steps)
  n = sched.num_steps
  shape = tuple(shape)
  x, rng = _start(shape, rng, noise)
  B, nd = shape[0], len(shape)

  def body(i, x):
    idx = jnp.full((B,), n - 1 - i, jnp.int32)
    t_model = jnp.asarray(sched.timesteps)[idx]
    eps, _ = _split_output(model_fn(x, t_model, y), x, learn_sigma)
    _, _, pred_x0 = _p_mean_variance(sched, eps, None, x, idx, clip=clip)
    eps = (_at(sched.sqrt_recip_alphas_cumprod, idx, nd) * x - pred_x0) / \
        _at(sched.sqrt_recipm1_alphas_cumprod, idx, nd)
    ab = _at(sched.alphas_cumprod, idx, nd)
    ab_prev = _at(sched.alphas_cumprod_prev, idx, nd)
    sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab)) * jnp.sqrt(1 - ab / ab_prev)
    mean = pred_x0 * jnp.sqrt(ab_prev) + jnp.sqrt(jnp.maximum(1 - ab_prev - sigma ** 2, 0.0)) * eps
    z = jax.random.normal(jax.random.fold_in(rng, i), shape, jnp.float32)
    nonzero = (idx != 0).astype(jnp.float32).reshape((B,) + (1,) * (nd - 1))
    return mean + nonzero * sigma * z

  return jax.lax.fori_loop(0, n, body, x)


def flow_sample(model_fn: Callable, shape, y, rng, *, steps: int, noise=None,
                shift: float = 1.0):
  """Euler ODE integration of dx/dt = v(x, t) from noise at t=1 to data at t=0 in ``steps``.

  A uniform time grid, shifted by ``shift`` (``shift_time``, as the model was trained); ``noise``
  optionally gives the starting x_1 (then ``rng`` is unused).
  """
  if steps < 1:
    raise ValueError(f"steps={steps} must be at least 1.")
  shape = tuple(shape)
  x, _ = _start(shape, rng, noise)
  B = shape[0]
  ts = shift_time(jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32), shift)

  def body(i, x):
    t = jnp.full((B,), ts[i], jnp.float32)
    v, _ = _split_output(model_fn(x, t * FLOW_TIME_SCALE, y), x, learn_sigma=False)
    return x - (ts[i] - ts[i + 1]) * v

  return jax.lax.fori_loop(0, steps, body, x)


def cfg_model_fn(model_fn: Callable, scale: float, null_label: int) -> Callable:
  """Classifier-free guidance: ``model_fn(x, t, y)`` returning uncond + scale·(cond − uncond).

  One model call on the batch doubled along axis 0 (labels y, then null_label). Guidance applies to
  the first C channels (eps or velocity, C = x's channel count); learned-variance channels come
  from the conditional half. Unlike DiT's forward_with_cfg, which guides only 3 of 4 latent
  channels for reproducibility, this guides all C (the standard formulation its comment names).
  """
  def guided(x, t, y):
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                   jnp.concatenate([y, jnp.full_like(y, null_label)]))
    return _guide(out, x, scale)

  return guided


def cfg_drop_model_fn(model_fn: Callable, scale: float) -> Callable:
  """Classifier-free guidance for a model that drops its condition itself (the text families):
  ``model_fn(x, t, cond, force_drop_ids_B)``, ``cond`` any pytree of [B, ...] arrays (caption
  ids and mask). One call on the doubled batch, the second half with force_drop_ids_B = 1 (the
  unconditional model); combined as ``cfg_model_fn``. Returns ``guided(x, t, cond)``."""
  def guided(x, t, cond):
    B = x.shape[0]
    doubled = jax.tree.map(lambda a: jnp.concatenate([a, a]), cond)
    drop_2B = jnp.concatenate([jnp.zeros((B,), jnp.int32), jnp.ones((B,), jnp.int32)])
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), doubled, drop_2B)
    return _guide(out, x, scale)

  return guided


def _guide(out, x, scale: float):
  """uncond + scale·(cond − uncond) on the first C channels of [cond; uncond] outputs."""
  B, C = x.shape[0], x.shape[-1]
  cond, uncond = out[:B], out[B:]
  guided_eps = uncond[..., :C] + scale * (cond[..., :C] - uncond[..., :C])
  return jnp.concatenate([guided_eps, cond[..., C:]], axis=-1)


# --------------------------------------------------------------------------------------------
# Image grid


def save_grid(images, path: str, rows: int, *, min_size: int = 32,
              pad: int = 2) -> tuple[int, int]:
  """Writes images [N, H, W, C] (C = 1 or 3, or [N, H, W]) in [-1, 1] as a PNG grid.

  Row-major: ``rows`` rows of ceil(N / rows) tiles, so samples ordered by class give one row per
  class. Tiles smaller than ``min_size`` are upscaled by an integer factor with nearest neighbour;
  ``pad`` pixels of black separate and surround tiles. Returns the PNG's (width, height).
  """
  from PIL import Image  # Host-side only; keep PIL out of import time of training code.

  imgs = np.asarray(images, dtype=np.float32)
  if imgs.ndim == 3:
    imgs = imgs[..., None]
  if imgs.ndim != 4 or imgs.shape[-1] not in (1, 3):
    raise ValueError(f"save_grid takes images [N, H, W, C] with C = 1 or 3, got shape "
                     f"{imgs.shape}; decode latents to pixels first.")
  if rows < 1:
    raise ValueError(f"rows={rows} must be at least 1.")
  N, H, W, C = imgs.shape
  cols = max(1, -(-N // rows))
  s = max(1, -(-min_size // max(H, W)))
  pix = np.round((np.clip(np.nan_to_num(imgs), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
  pix = pix.repeat(s, axis=1).repeat(s, axis=2)
  h, w = H * s, W * s
  grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, C), np.uint8)
  for k in range(min(N, rows * cols)):
    r, c = divmod(k, cols)
    y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
    grid[y0:y0 + h, x0:x0 + w] = pix[k]
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(grid[..., 0] if C == 1 else grid).save(path)  # uint8 2-D -> "L", 3-ch -> "RGB"
  return grid.shape[1], grid.shape[0]
