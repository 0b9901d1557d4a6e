"""Config groups every family shares; a family config adds task, model, data and train."""

import ml_collections


def shared(*, steps: int, batch_size: int, lr: float, warmup_steps: int) -> ml_collections.ConfigDict:
  """seed, mesh, parallel, train (steps, batch, remat), opt, ckpt, log and eval groups."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # -1 fills the remaining devices; the product must equal the device count.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, seq=1, expert=1))
  # Over several hosts: how many hosts (TPU slices; processes on GPU/CPU) each axis spans; the
  # rest of the axis stays within a host. Unused on one host.
  c.mesh.dcn = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, seq=1, expert=1))
  c.parallel = ml_collections.ConfigDict(dict(
      attention="auto",  # dense | blockwise | cudnn | splash | auto (GPU: cudnn, TPU: splash)
      seq_strategy="auto",  # over mesh.seq: ulysses | ring | usp | allgather | auto
      usp_ulysses=0,  # usp: Ulysses group size (0 = the largest that divides the heads)
      block_size=512,  # blockwise kernel query/key block
      rules=(),  # extra (logical, mesh axes) rows placed before parallel/sharding.py RULES
      loop="mesh",  # mesh: jit over config.mesh | pmap: jax.pmap data parallelism, same step body
  ))
  c.train = ml_collections.ConfigDict(dict(
      steps=steps, batch_size=batch_size,
      remat="none",  # activation checkpointing: none | full | selective | offload
      grad_accum=1,  # micro-batches per step (a scan inside the step); batch_size must divide
      max_bad_steps=5,  # consecutive non-finite (skipped) steps before the run stops
      # A train step, eval or sample whose device work makes no progress for this long (3x for
      # the first one, which compiles) ends the run with a sentence (train/watchdog.py).
      hang_timeout_s=600.0,
  ))
  # An exponential moving average of the parameters, kept in the train state and checkpointed
  # (docs/training.md): decay 0 = none (nothing held); warmup none (constant decay) | ratio
  # (min(decay, (1+t)/(10+t))) | power (min(decay, 1-(1+t)^-power)), t = updates applied so far.
  c.train.ema = ml_collections.ConfigDict(dict(decay=0.0, warmup="none", power=2 / 3))
  c.opt = ml_collections.ConfigDict(dict(
      name="adamw", lr=lr, warmup_steps=warmup_steps, final_lr_frac=0.1, b1=0.9, b2=0.95,
      eps=1e-8, weight_decay=0.1, clip_norm=1.0, decay_embeddings=False))
  # Fine-tuning: start a fresh run (step 0, new optimizer state) from the parameters of another
  # workdir's checkpoint (a trained run, or a Hugging Face model imported by train.convert);
  # step -1 takes its newest. Ignored once this run has its own checkpoint to resume from.
  # On the command line --config.init.from=DIR (train/__main__.py maps it: `from` is a keyword).
  c.init = ml_collections.ConfigDict(dict(from_="", step=-1))
  c.ckpt = ml_collections.ConfigDict(dict(every=200, keep=3, async_save=True))
  # profile_steps "a:b": a jax.profiler trace of steps a..b (inclusive) into workdir/profile.
  c.log = ml_collections.ConfigDict(dict(every=10, progress=True, profile_steps=""))
  # weights: which parameters evaluation and samples use: auto (the EMA for diffusion when
  # train.ema is on, else the raw parameters) | raw | ema.
  c.eval = ml_collections.ConfigDict(dict(every=200, steps=8, batch_size=batch_size,
                                          weights="auto"))
  return c
