"""train/diffusion.py: schedules, q_sample, losses, samplers, classifier-free guidance, PNG grid."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from train import diffusion_process

SHAPE = (4, 4, 4, 2)  # [B, H, W, C], tiny so every compile is fast


def _cos_f(u, s=0.008):
  return np.cos((u + s) / (1 + s) * np.pi / 2) ** 2


# --- schedules ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_quantities_match_closed_forms(kind):
  s = diffusion_process.make_schedule(kind, 1000)
  b = s.betas
  ac = np.cumprod(1 - b)
  ac_prev = np.append(1.0, ac[:-1])
  np.testing.assert_allclose(s.alphas_cumprod, ac, rtol=1e-12)
  np.testing.assert_allclose(s.alphas_cumprod_prev, ac_prev, rtol=1e-12)
  np.testing.assert_allclose(s.sqrt_alphas_cumprod ** 2, ac, rtol=1e-12)
  np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod ** 2, 1 - ac, rtol=1e-12)
  pv = b * (1 - ac_prev) / (1 - ac)
  np.testing.assert_allclose(s.posterior_variance, pv, rtol=1e-12)
  assert s.posterior_variance[0] == 0.0
  np.testing.assert_allclose(s.posterior_log_variance_clipped[1:], np.log(pv[1:]), rtol=1e-12)
  assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]
  np.testing.assert_allclose(s.posterior_mean_coef1, b * np.sqrt(ac_prev) / (1 - ac), rtol=1e-12)
  np.testing.assert_allclose(s.posterior_mean_coef2, (1 - ac_prev) * np.sqrt(1 - b) / (1 - ac),
                             rtol=1e-12)
  np.testing.assert_array_equal(s.timesteps, np.arange(1000))
  assert s.num_steps == 1000 and s.betas.dtype == np.float64


def test_linear_schedule_endpoints_scale_with_num_steps():
  s = diffusion_process.make_schedule("linear", 1000)
  np.testing.assert_allclose([s.betas[0], s.betas[-1]], [1e-4, 0.02], rtol=1e-12)
  assert np.all(np.diff(s.betas) > 0)
  s = diffusion_process.make_schedule("linear", 250)  # Reference: scale = 1000 / T.
  np.testing.assert_allclose([s.betas[0], s.betas[-1]], [4e-4, 0.08], rtol=1e-12)


def test_cosine_schedule_follows_f_and_clips_betas():
  T = 1000
  s = diffusion_process.make_schedule("cosine", T)
  assert s.betas.max() == 0.999 and s.betas[-1] == 0.999
  unclipped = s.betas < 0.999
  assert unclipped.sum() > 900
  # Step index i ends at continuous time (i + 1) / T: ᾱ[i] = f((i+1)/T) / f(0) until clipping.
  i = np.arange(T)[unclipped]
  assert np.all(i == np.arange(len(i)))  # Only the tail is clipped.
  np.testing.assert_allclose(s.alphas_cumprod[i], _cos_f((i + 1) / T) / _cos_f(0.0), rtol=1e-9)


def test_unknown_schedule_is_a_sentence():
  with pytest.raises(ValueError, match="Unknown noise schedule 'quadratic'"):
    diffusion_process.make_schedule("quadratic", 10)


def test_respace_keeps_alphas_cumprod_at_kept_steps():
  s = diffusion_process.make_schedule("linear", 1000)
  r = diffusion_process.respace(s, 250)
  assert r.num_steps == 250 and r.timesteps[0] == 0 and r.timesteps[-1] == 999
  assert len(np.unique(r.timesteps)) == 250
  np.testing.assert_allclose(r.alphas_cumprod, s.alphas_cumprod[r.timesteps], rtol=1e-10)
  full = diffusion_process.respace(s, 1000)
  np.testing.assert_allclose(full.betas, s.betas, rtol=1e-9)
  with pytest.raises(ValueError, match="steps=0"):
    diffusion_process.respace(s, 0)


# --- q_sample -------------------------------------------------------------------------------


def test_q_sample_exact_and_statistics():
  s = diffusion_process.make_schedule("linear", 1000)
  q = jax.jit(functools.partial(diffusion_process.q_sample, s))
  x0 = np.full((3, 2, 2, 1), 0.5, np.float32)
  noise = np.random.default_rng(0).standard_normal(x0.shape).astype(np.float32)
  got = q(x0, jnp.array([0, 500, 999]), noise)
  a = s.sqrt_alphas_cumprod[[0, 500, 999]][:, None, None, None]
  b = s.sqrt_one_minus_alphas_cumprod[[0, 500, 999]][:, None, None, None]
  np.testing.assert_allclose(got, a * 0.5 + b * noise, rtol=1e-5, atol=1e-6)

  x0 = np.full((20000, 1), 0.5, np.float32)
  noise = np.random.default_rng(1).standard_normal(x0.shape).astype(np.float32)
  xt = np.asarray(q(x0, jnp.full((20000,), 300), noise))
  ac = s.alphas_cumprod[300]
  np.testing.assert_allclose(xt.mean(), np.sqrt(ac) * 0.5, atol=0.03)
  np.testing.assert_allclose(xt.var(), 1 - ac, rtol=0.05)


# --- losses ---------------------------------------------------------------------------------

X0 = np.random.default_rng(0).uniform(-1, 1, SHAPE).astype(np.float32)
NOISE = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)


def _oracle_eps(schedule, x0):
  """Model predicting the exact noise of x_t, given the (closed-over) x0."""
  def model_fn(x_t, t, y, rng):
    a = jnp.asarray(schedule.sqrt_alphas_cumprod, jnp.float32)[t][:, None, None, None]
    b = jnp.asarray(schedule.sqrt_one_minus_alphas_cumprod, jnp.float32)[t][:, None, None, None]
    return (x_t - a * x0) / b
  return model_fn


def test_ddpm_loss_mse_hand_computed():
  s = diffusion_process.make_schedule("linear", 100)
  oracle = _oracle_eps(s, X0)

  @jax.jit
  def run(w, t, noise):  # w=1: the oracle; w=0: a model predicting zeros.
    model = lambda x_t, t, y, rng: w * oracle(x_t, t, y, rng)
    return diffusion_process.ddpm_loss(model, s, X0, None, jax.random.PRNGKey(1), learn_sigma=False,
                               t=t, noise=noise)

  loss, m = run(1.0, jnp.array([1, 10, 50, 99]), NOISE)
  assert float(loss) < 1e-8 and float(m["mse"]) == float(loss) and "vb" not in m
  loss, _ = run(0.0, jnp.array([1, 10, 50, 99]), NOISE)
  np.testing.assert_allclose(float(loss), float(np.mean(NOISE ** 2)), rtol=1e-6)
  assert loss.dtype == jnp.float32 and loss.shape == ()


def test_ddpm_loss_vb_finite_nonnegative_and_zero_for_exact_posterior():
  s = diffusion_process.make_schedule("linear", 100)
  oracle = _oracle_eps(s, X0)

  @jax.jit
  def run(w, v, t):  # eps = w * oracle + (1 - w) * x_t / 2, variance channels = v
    model = lambda x_t, t, y, rng: jnp.concatenate(
        [w * oracle(x_t, t, y, rng) + (1 - w) * 0.5 * x_t, jnp.full_like(x_t, v)], -1)
    return diffusion_process.ddpm_loss(model, s, X0, None, jax.random.PRNGKey(1), learn_sigma=True, t=t)

  # v = -1 selects the posterior log-variance: with the exact mean KL(q || p) = 0 for t >= 1.
  _, m = run(1.0, -1.0, jnp.array([1, 10, 50, 99]))
  assert abs(float(m["vb"])) < 1e-4
  for t in ([0, 0, 0, 0], [0, 3, 60, 99]):  # t=0 takes the discretised decoder NLL.
    loss, m = run(0.0, 0.3, jnp.array(t))
    assert np.isfinite(float(m["vb"])) and float(m["vb"]) > 0
    np.testing.assert_allclose(float(loss), float(m["mse"]) + float(m["vb"]), rtol=1e-6)


def test_ddpm_loss_vb_gradient_does_not_reach_the_mean():
  s = diffusion_process.make_schedule("cosine", 100)
  params = {"mean": jnp.float32(0.7), "var": jnp.float32(0.2)}

  def parts(p):  # Toy model: eps channels depend only on "mean", variance channels on "var".
    model = lambda x_t, t, y, rng: jnp.concatenate(
        [p["mean"] * x_t, jnp.tanh(p["var"] * x_t + p["var"])], axis=-1)
    loss, m = diffusion_process.ddpm_loss(model, s, X0, None, jax.random.PRNGKey(1), learn_sigma=True)
    return loss, m

  grads = jax.jit(lambda p: (jax.grad(lambda p: parts(p)[1]["vb"])(p),
                             jax.grad(lambda p: parts(p)[1]["mse"])(p),
                             jax.grad(lambda p: parts(p)[0])(p)))
  g_vb, g_mse, g_loss = grads(params)
  assert float(g_vb["mean"]) == 0.0 and abs(float(g_vb["var"])) > 0
  np.testing.assert_allclose(float(g_loss["mean"]), float(g_mse["mean"]), rtol=1e-6)


def test_flow_loss_oracle_is_zero_and_time_is_scaled():
  def oracle(x_t, t_model, y, rng):  # x_t = (1-t) x0 + t eps  =>  eps - x0 = (x_t - x0) / t.
    # Exact only if the model really receives t * 1000.
    return (x_t - X0) / (t_model / diffusion_process.FLOW_TIME_SCALE)[:, None, None, None]

  t = jnp.array([0.1, 0.4, 0.7, 0.95])
  loss, m = jax.jit(lambda t: diffusion_process.flow_loss(oracle, X0, None, jax.random.PRNGKey(1), t=t))(t)
  assert float(loss) < 1e-9 and float(m["mse"]) == float(loss)

  zero = lambda x_t, t, y, rng: jnp.zeros_like(x_t)
  run = jax.jit(lambda rng, noise: diffusion_process.flow_loss(zero, X0, None, rng, noise=noise)[0])
  np.testing.assert_allclose(float(run(jax.random.PRNGKey(3), NOISE)),
                             float(np.mean((NOISE - X0) ** 2)), rtol=1e-6)
  loss, _ = jax.jit(lambda rng: diffusion_process.flow_loss(zero, X0, None, rng,
                                                    time_dist="logit_normal"))(
      jax.random.PRNGKey(4))
  assert np.isfinite(float(loss))
  with pytest.raises(ValueError, match="Unknown flow time distribution"):
    diffusion_process.flow_loss(zero, X0, None, jax.random.PRNGKey(4), time_dist="beta")


def test_errors_are_sentences():
  s = diffusion_process.make_schedule("cosine", 10)
  with pytest.raises(ValueError, match="learn_sigma=True"):
    jax.eval_shape(lambda x: diffusion_process.ddpm_loss(lambda x_t, t, y, rng: x_t, s, x, None,
                                                 jax.random.PRNGKey(0), learn_sigma=True),
                   jax.ShapeDtypeStruct(SHAPE, jnp.float32))
  with pytest.raises(ValueError, match="linear schedule needs num_steps > 20"):
    diffusion_process.make_schedule("linear", 20)


# --- samplers -------------------------------------------------------------------------------


def _toy_sample_model(learn_sigma: bool, counter=None):
  def model_fn(x, t, y):
    if counter is not None:
      counter.append(1)  # Runs once per trace, not per step.
    eps = 0.3 * x + 1e-4 * t.astype(jnp.float32)[:, None, None, None] \
        + 0.1 * y.astype(jnp.float32)[:, None, None, None]
    return jnp.concatenate([eps, jnp.tanh(x)], -1) if learn_sigma else eps
  return model_fn


def test_ddim_eta0_deterministic_eta1_stochastic_one_compile():
  s = diffusion_process.make_schedule("linear", 50)
  y = jnp.arange(4)
  traces = []
  model = _toy_sample_model(True, traces)
  sample = jax.jit(lambda rng, eta: diffusion_process.ddim_sample(
      model, s, SHAPE, y, rng, steps=10, eta=eta, learn_sigma=True, noise=NOISE))
  a = sample(jax.random.PRNGKey(1), 0.0)
  b = sample(jax.random.PRNGKey(2), 0.0)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = sample(jax.random.PRNGKey(1), 1.0)
  d = sample(jax.random.PRNGKey(2), 1.0)
  assert np.all(np.isfinite(np.asarray(c))) and not np.allclose(c, d)
  # One compile for all steps and rngs (eta is traced), and the model body traced once.
  assert sample._cache_size() == 1 and len(traces) == 1


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_ddpm_sample_one_compile_and_finite(learn_sigma):
  s = diffusion_process.make_schedule("cosine", 30)
  y = jnp.arange(4)
  traces = []
  sample = jax.jit(lambda rng: diffusion_process.ddpm_sample(
      _toy_sample_model(learn_sigma, traces), s, SHAPE, y, rng, learn_sigma=learn_sigma))
  a = sample(jax.random.PRNGKey(1))
  b = sample(jax.random.PRNGKey(2))
  assert sample._cache_size() == 1 and len(traces) == 1
  assert np.all(np.isfinite(np.asarray(a))) and not np.allclose(a, b)
  assert a.shape == SHAPE and a.dtype == jnp.float32


@pytest.mark.parametrize("sampler", ["ddpm", "ddpm_respaced", "ddim"])
def test_gaussian_samplers_recover_a_point_mass_and_pass_original_timesteps(sampler):
  # With the exact eps of a point mass c, the x0 prediction is c at every step and the last step
  # (ᾱ_prev = 1) returns it exactly; respaced samplers must hand the model original timesteps.
  s = diffusion_process.make_schedule("linear", 40)
  c = np.linspace(-0.8, 0.8, int(np.prod(SHAPE)), dtype=np.float32).reshape(SHAPE)
  seen = []

  def model(x, t, y):
    jax.debug.callback(lambda t: seen.append(int(np.asarray(t)[0])), t)
    a = jnp.asarray(s.sqrt_alphas_cumprod, jnp.float32)[t][:, None, None, None]
    b = jnp.asarray(s.sqrt_one_minus_alphas_cumprod, jnp.float32)[t][:, None, None, None]
    return (x - a * c) / b

  if sampler == "ddpm":
    run = lambda rng: diffusion_process.ddpm_sample(model, s, SHAPE, None, rng, learn_sigma=False)
    want_t = np.arange(40)
  elif sampler == "ddpm_respaced":
    run = lambda rng: diffusion_process.ddpm_sample(model, s, SHAPE, None, rng, learn_sigma=False, steps=7)
    want_t = diffusion_process.respace(s, 7).timesteps
  else:
    run = lambda rng: diffusion_process.ddim_sample(model, s, SHAPE, None, rng, steps=7, learn_sigma=False)
    want_t = diffusion_process.respace(s, 7).timesteps
  out = jax.jit(run)(jax.random.PRNGKey(3))
  jax.effects_barrier()
  np.testing.assert_allclose(np.asarray(out), np.asarray(c), atol=1e-5)
  assert seen == list(want_t[::-1])


def test_time_shift_is_sd3s_map_in_training_and_sampling():
  t = jnp.linspace(0.0, 1.0, 11)
  assert diffusion_process.shift_time(t, 1.0) is t
  shifted = np.asarray(diffusion_process.shift_time(t, 3.0))
  np.testing.assert_allclose(shifted, 3 * np.asarray(t) / (1 + 2 * np.asarray(t)), rtol=1e-6)
  assert shifted[0] == 0.0 and shifted[-1] == 1.0 and np.all(np.diff(shifted) > 0)
  assert np.all(shifted[1:-1] > np.asarray(t)[1:-1])  # more time at high noise

  # Training: a model answering v = t (x0 = noise = 0, so the target is 0) has loss mean(t^2)
  # over the drawn times, shifted; a given t is used as given.
  zeros = jnp.zeros(SHAPE)
  answer_t = lambda x_t, t_model, y, rng: jnp.broadcast_to(
      (t_model / diffusion_process.FLOW_TIME_SCALE)[:, None, None, None], x_t.shape)
  rng = jax.random.PRNGKey(5)
  drawn = jax.random.uniform(jax.random.split(rng, 3)[0], (SHAPE[0],), jnp.float32)
  loss = lambda **kw: float(diffusion_process.flow_loss(answer_t, zeros, None, rng, noise=zeros,
                                                        **kw)[0])
  np.testing.assert_allclose(loss(shift=3.0),
                             np.mean(np.asarray(diffusion_process.shift_time(drawn, 3.0)) ** 2),
                             rtol=1e-5)
  given = jnp.array([0.1, 0.4, 0.7, 0.95])[:SHAPE[0]]
  assert loss(shift=3.0, t=given) == loss(t=given)

  # Sampling: the model sees the shifted grid, and Euler stays exact on a point mass.
  c = np.linspace(-1.0, 1.0, int(np.prod(SHAPE)), dtype=np.float32).reshape(SHAPE)
  seen = []

  def velocity(x, t_model, y):
    jax.debug.callback(lambda t: seen.append(float(np.asarray(t)[0])), t_model)
    return (x - c) / (t_model / diffusion_process.FLOW_TIME_SCALE)[:, None, None, None]

  out = jax.jit(lambda rng: diffusion_process.flow_sample(velocity, SHAPE, None, rng, steps=4,
                                                          shift=3.0))(jax.random.PRNGKey(0))
  jax.effects_barrier()
  np.testing.assert_allclose(np.asarray(out), c, atol=1e-5)
  grid = np.asarray(diffusion_process.shift_time(jnp.linspace(1.0, 0.0, 5), 3.0))[:-1]
  np.testing.assert_allclose(np.array(seen) / diffusion_process.FLOW_TIME_SCALE, grid, rtol=1e-6)


@pytest.mark.parametrize("steps", [1, 4])
def test_flow_sample_is_exact_for_a_point_mass(steps):
  # The flow of a point mass is straight: v(x, t) = (x - c) / t, and Euler is exact on it.
  c = np.linspace(-1.0, 1.0, int(np.prod(SHAPE)), dtype=np.float32).reshape(SHAPE)
  traces = []

  def velocity(x, t_model, y):
    traces.append(1)
    return (x - c) / (t_model / diffusion_process.FLOW_TIME_SCALE)[:, None, None, None]

  sample = jax.jit(lambda rng: diffusion_process.flow_sample(velocity, SHAPE, None, rng, steps=steps))
  out = sample(jax.random.PRNGKey(0))
  sample(jax.random.PRNGKey(1))
  np.testing.assert_allclose(np.asarray(out), np.asarray(c), atol=1e-5)
  assert sample._cache_size() == 1 and len(traces) == 1


# --- classifier-free guidance ---------------------------------------------------------------


def test_cfg_scale_one_is_conditional_scale_zero_is_unconditional():
  null = 10
  calls = []

  def model(x, t, y):
    calls.append(x.shape[0])
    yf = y.astype(jnp.float32)[:, None, None, None]
    eps = jnp.sin(x + yf) + 1e-3 * t.astype(jnp.float32)[:, None, None, None]
    return jnp.concatenate([eps, jnp.cos(x * yf)], -1)  # learned-variance channels

  x, t, y = NOISE, jnp.array([3, 5, 7, 9]), jnp.array([0, 1, 2, 3])

  @jax.jit
  def run():
    cond, uncond = model(x, t, y), model(x, t, jnp.full_like(y, null))
    calls.clear()
    g1 = diffusion_process.cfg_model_fn(model, 1.0, null)(x, t, y)
    assert calls == [8]  # One call on the doubled batch.
    g0 = diffusion_process.cfg_model_fn(model, 0.0, null)(x, t, y)
    g4 = diffusion_process.cfg_model_fn(model, 4.0, null)(x, t, y)
    return cond, uncond, g1, g0, g4

  cond, uncond, g1, g0, g4 = map(np.asarray, run())
  np.testing.assert_allclose(g1, cond, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(g0[..., :2], uncond[..., :2], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(g0[..., 2:], cond[..., 2:], rtol=1e-6)  # variance from cond half
  np.testing.assert_allclose(g4[..., :2], uncond[..., :2] + 4.0 * (cond - uncond)[..., :2],
                             rtol=1e-5, atol=1e-5)


def test_cfg_composes_with_a_jitted_sampler():
  s = diffusion_process.make_schedule("cosine", 20)
  guided = diffusion_process.cfg_model_fn(_toy_sample_model(True), 1.5, null_label=10)
  out = jax.jit(lambda rng: diffusion_process.ddim_sample(guided, s, SHAPE, jnp.arange(4), rng, steps=5,
                                                  learn_sigma=True))(jax.random.PRNGKey(0))
  assert out.shape == SHAPE and np.all(np.isfinite(np.asarray(out)))


# --- save_grid ------------------------------------------------------------------------------


def test_save_grid_grayscale_upscales_small_images(tmp_path):
  imgs = np.concatenate([np.full((4, 8, 8, 1), -1.0), np.full((4, 8, 8, 1), 1.0)])
  path = str(tmp_path / "sub" / "grid.png")
  size = diffusion_process.save_grid(imgs, path, rows=2)
  im = Image.open(path)
  # 8x8 -> 32x32 tiles, 4 columns x 2 rows, 2-pixel borders.
  assert im.size == size == (4 * 34 + 2, 2 * 34 + 2) and im.mode == "L"
  a = np.asarray(im)
  assert a[2, 2] == 0 and a[2 + 34, 2] == 255 and a[0, 0] == 0
  assert a[2 + 34:2 + 34 + 32, 2:2 + 32].min() == 255  # whole upscaled tile


def test_save_grid_rgb_keeps_large_images_and_fills_missing_tiles(tmp_path):
  imgs = np.random.default_rng(0).uniform(-1, 1, (5, 32, 32, 3)).astype(np.float32)
  path = str(tmp_path / "rgb.png")
  diffusion_process.save_grid(imgs, path, rows=2, pad=0)
  im = Image.open(path)
  assert im.size == (3 * 32, 2 * 32) and im.mode == "RGB"
  a = np.asarray(im)
  want = np.round((np.asarray(imgs[4]) + 1) * 127.5).astype(np.uint8)
  np.testing.assert_array_equal(a[32:, 32:64], want)
  assert a[32:, 64:].max() == 0
  with pytest.raises(ValueError, match="C = 1 or 3"):
    diffusion_process.save_grid(np.zeros((2, 4, 4, 4)), path, rows=1)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_clip_pixels_but_not_latents(sampler, monkeypatch):
  """A point mass at latent-sized values (up to 3): clipping x0 to [-1, 1], right for pixels,
  would return 1 instead of 3, so the diffusion task samples "arrayrecord" data (VAE latents)
  unclipped and image sources clipped."""
  from types import SimpleNamespace

  from configs import diffusion
  from train.tasks import diffusion as diffusion_task
  s = diffusion_process.make_schedule("linear", 40)
  c = np.linspace(-3.0, 3.0, int(np.prod(SHAPE)), dtype=np.float32).reshape(SHAPE)

  def model(x, t, y):
    a = jnp.asarray(s.sqrt_alphas_cumprod, jnp.float32)[t][:, None, None, None]
    b = jnp.asarray(s.sqrt_one_minus_alphas_cumprod, jnp.float32)[t][:, None, None, None]
    return (x - a * c) / b

  fn = getattr(diffusion_process, f"{sampler}_sample")
  for clip, want in ((False, c), (True, np.clip(c, -1, 1))):
    out = fn(model, s, SHAPE, None, jax.random.PRNGKey(0), learn_sigma=False, clip=clip, steps=7)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-4)
  seen = []
  monkeypatch.setattr(diffusion_process, f"{sampler}_sample",
                      lambda *a, clip, **k: seen.append(clip) or jnp.zeros(SHAPE))
  for data, clip in (("digits", True), ("arrayrecord", False)):
    config = diffusion.get_config("model=dit,variant=digits")
    config.data.name = data
    config.diffusion.update(sampler=sampler, cfg_scale=1.0)
    task = diffusion_task.DiffusionTask(config)
    fake = SimpleNamespace(cfg=SimpleNamespace(image_size=SHAPE[1], channels=SHAPE[-1],
                                               learn_sigma=False),
                           apply=lambda *a, **k: None)
    task._sample(fake, None, jnp.zeros((SHAPE[0],), jnp.int32), jax.random.PRNGKey(0))
    assert seen[-1] is clip, (data, seen)
