"""The family contract: every nets/ module that defines ``FAMILY`` (a ``Family``) is a model
family, selected by ``config.model.name``; train/ asks the family and probes nothing.

Adding a family is one new module here that fills in ``FAMILY = Family(...)`` at its bottom (plus a
config and an experiment); tests/nets/test_contract.py then checks it like every other.
"""

import dataclasses
import functools
import importlib
import pkgutil
from typing import Any, Callable

import nets
from nets import counting

TASKS = ("lm", "classification", "diffusion", "autoencoder", "vqvae", "var")


@dataclasses.dataclass(frozen=True)
class Family:
  """What train/ may know about a family.

  Its ``Config`` names the shared concepts alike in every family: width, depth, num_heads,
  mlp_width, max_len, dtype (and image_size, channels for image families), as properties where
  the config.model field has another name.
  """
  name: str  # config.model.name
  Config: type  # frozen dataclass; ``Config.from_config(config.model)`` builds it
  Model: type  # linen module: Model(cfg, attention_fn=..., [moe_layout=...])
  task: str  # one of TASKS: what the model's inputs and outputs are
  num_params: Callable[..., int]  # (cfg, active=False) -> closed-form parameter count
  flops: Callable[[Any, counting.Step], float]  # forward FLOPs per token (LM) or image
  # (cfg, seq_len) -> the (shortest) sequence attention sees: what mesh.seq must split evenly
  attention_length: Callable[[Any, int], int]
  sequence_parallel: bool = True  # runs with mesh.seq > 1
  # Linear recurrences over the sequence: takes ``recurrence_fn`` (parallel/state_passing.py),
  # and its attention layers, if any, must see the sequence in order (no zigzag).
  state_passing: bool = False
  # Its causal mask is in the positions it passes to attention (VAR: block-causal by scale), not
  # in token order: the cuDNN and Splash kernels, which mask by index, are not used for it.
  position_masks: bool = False
  moe: Callable[[Any], Any] | None = None  # cfg -> its nets.moe.Config; None: no MoE layers
  # (cfg, batch, max_len) -> the empty decode cache or recurrent state; None: no cached decoding
  init_cache: Callable[[Any, int, int], Any] | None = None
  length_multiple: Callable[[Any], int] = lambda cfg: 1  # LM input lengths must be multiples
  converter: str | None = None  # the nets.convert module for Hugging Face weights, if any
  test_config: dict = dataclasses.field(default_factory=dict)  # tiny config.model for tests
  # diffusion: what the model is conditioned on: "class" (labels y [B]) or "text" (caption ids
  # and mask [B, L]; nets/text_encoder.py)
  conditioning: str = "class"

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"family {self.name!r}: task={self.task!r} is not one of {TASKS}.")

  @property
  def expert_parallel(self) -> bool:
    """Whether the family has MoE layers, so mesh.expert can split experts."""
    return self.moe is not None

  @property
  def decodes_with_cache(self) -> bool:
    return self.init_cache is not None

  def moe_config(self, cfg):
    """The MoE config of ``cfg``, or None for a family without MoE layers."""
    return None if self.moe is None else self.moe(cfg)


@functools.cache
def families() -> dict[str, Family]:
  """Every family, by name: the nets/ modules that define ``FAMILY``."""
  found = {}
  for info in pkgutil.iter_modules(nets.__path__):
    if info.ispkg:  # nets.convert: the Hugging Face converters, not a family
      continue
    family = getattr(importlib.import_module(f"nets.{info.name}"), "FAMILY", None)
    if family is not None:
      found[family.name] = family
  return dict(sorted(found.items()))


def get(name: str) -> Family:
  """The family ``name``, or a sentence listing the known names."""
  known = families()
  if name not in known:
    raise ValueError(f"config.model.name={name!r} is not a known model; known models: "
                     f"{list(known)}.")
  return known[name]


def of_model(model) -> Family:
  """The family whose ``Model`` class ``model`` is an instance of."""
  for family in families().values():
    if isinstance(model, family.Model):
      return family
  raise ValueError(f"{type(model).__name__} is not the Model of a known family.")
