"""Model selection by name: ``config.model.name`` is a family of nets/registry.py."""

import dataclasses

from nets import registry
from parallel import attention
from parallel import moe as parallel_moe
from parallel import sharding, state_passing
from train import text_encoders


def model_config(config):
  """The family's frozen hyperparameter dataclass, built from config.model (+ train.remat, and a
  text family's frozen T5 encoder Config read from model.text_encoder_path)."""
  family = registry.get(config.model.name)
  text = text_encoders.model_fields(config.model) if family.conditioning == "text" else {}
  return family.Config.from_config(config.model, remat=config.train.remat, **text)


def frozen_text_encoder(config, model_cfg) -> str:
  """The Hugging Face folder of the model's frozen imported text encoder, or "" (none)."""
  text = registry.get(config.model.name).conditioning == "text"
  return model_cfg.text_encoder_path if text and model_cfg.text_encoder == "t5" else ""


def seq_len(config) -> int:
  """LM tokens per sequence, or the tokens of a packed image row (data.native_size); 0 for
  fixed-size images, whose length the model config gives."""
  if config.task == "lm":
    return config.train.seq_len
  return config.data.seq_len if config.data.get("native_size", False) else 0


def attention_length(config, model_cfg) -> int:
  """The (shortest) sequence attention sees: what mesh.seq must split evenly."""
  family = registry.get(config.model.name)
  return family.attention_length(model_cfg, seq_len(config))


def attention_plan(config, mesh_sizes: dict, model_cfg) -> attention.Plan:
  """The attention kernel and sequence-parallel strategy for this config (validated).

  Families without sequence parallelism (Mamba, MEGABYTE) get the local kernel; validation has
  already refused mesh.seq > 1 for them.
  """
  family = registry.get(config.model.name)
  if not family.sequence_parallel or not model_cfg.num_heads:  # no attention layers
    local = sharding.unsplit(mesh_sizes, sharding.rules_from_config(config.parallel), "act_seq",
                             "act_heads")
    # Image families attend over what the family says (Swin: a window's tokens).
    return attention.make_plan(config.parallel, local, num_heads=1, num_kv_heads=1,
                               seq_len=seq_len(config) or attention_length(config, model_cfg))
  return attention.make_plan(config.parallel, mesh_sizes, num_heads=model_cfg.num_heads,
                             num_kv_heads=model_cfg.num_kv_heads,
                             seq_len=attention_length(config, model_cfg),
                             contiguous=family.state_passing,
                             position_masks=family.position_masks)


def recurrence_plan(config, mesh_sizes: dict, model_cfg) -> state_passing.Plan | None:
  """How a family with linear recurrences runs them on this mesh (validated); None for others."""
  if not registry.get(config.model.name).state_passing:
    return None
  return state_passing.make_plan(config.parallel, mesh_sizes, num_heads=model_cfg.linear_heads,
                                 seq_len=seq_len(config))


def build(config, mesh, *, seq_parallel: bool = True):
  """Returns (Model, its Config, attention Plan) with attention chosen by config.parallel.

  ``seq_parallel=False`` gives the same model with the local kernel only (for sampling, whose
  sequence lengths need not divide the seq axis).
  """
  family = registry.get(config.model.name)
  cfg = model_config(config)
  rules = sharding.rules_from_config(config.parallel)
  sizes = dict(mesh.shape) if seq_parallel else sharding.unsplit(dict(mesh.shape), rules, "act_seq")
  plan = attention_plan(config, sizes, cfg)
  kwargs = {}
  recurrence = recurrence_plan(config, sizes, cfg)
  if recurrence is not None:
    kwargs["recurrence_fn"] = state_passing.recurrence_fn(recurrence, mesh)
    kwargs["conv_fn"] = state_passing.conv_fn(recurrence, mesh)
  moe_cfg = family.moe_config(cfg)
  if moe_cfg is not None and moe_cfg.enabled:
    if not seq_parallel:  # sampling batches are padded to the data-parallel size only
      moe_cfg = dataclasses.replace(moe_cfg, groups=0)
    kwargs["moe_layout"] = parallel_moe.layout(moe_cfg, sizes, mesh, rules)
  return family.Model(cfg, attention_fn=attention.attention_fn(plan, mesh), **kwargs), cfg, plan
