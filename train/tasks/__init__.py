"""Training tasks: what a batch is, the loss, evaluation and samples, chosen by ``config.task``.

A task object (built from the config) provides:
  check()                      -> raises one sentence for a config this task cannot run
  datasets()                   -> (train grain dataset, val grain dataset or {source: val dataset};
                                  the latter is evaluated per source and pooled, and the task
                                  then provides source_headline({source: metrics}) -> str)
  example_batch(batch_size)    -> zeros with the global shapes of one batch
  model_example_batch(batch_size, model_cfg) -> zeros shaped as the model's input
  batch_axes                   -> logical axes of each batch entry (for its sharding)
  init_args(batch)             -> positional arguments of model.init
  loss_fn(model, permutation)  -> fn(params, batch, rng) -> (loss, metrics)
  eval_fn(model, permutation)  -> fn(params, batch) -> sums; summarize(sums) -> metrics
  extra_metrics(model, params, sharding) -> validation metrics computed outside the eval step
                                  (the LM's multiple-choice eval.tasks), in the mesh context
  samples(model, params, step, final, out) -> writes samples (text, PNG grid) and returns them
and optionally a non-gradient part of the train state (train/steps.py):
  init_task_state(model_cfg)   -> its initial pytree (replicated, checkpointed)
  task_update(model)           -> fn(params, task_state, batch, rng, axis_name)
                                  -> (params, task_state, metrics), run after each update
"""

from train.tasks import autoencoder, classification, diffusion, lm, var, vqvae

TASKS = {"lm": lm.LMTask, "classification": classification.ClassificationTask,
         "diffusion": diffusion.DiffusionTask, "autoencoder": autoencoder.AutoencoderTask,
         "vqvae": vqvae.VQVAETask, "var": var.VARTask}


def get(config):
  """The task object for ``config.task``."""
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r} is not one of {sorted(TASKS)}.")
  return TASKS[config.task](config)
