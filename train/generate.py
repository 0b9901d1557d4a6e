"""``python -m train.generate --workdir=DIR --prompt=TEXT [--prompt=TEXT ...] [--max_new_tokens=N
--temperature=T --top_k=K --top_p=P --seed=S --num_samples=N --step=STEP --end_id=ID
--weights=auto|raw|ema]``.

Continues each prompt with the language model of a trained (``python -m train``) or converted
(``python -m train.convert``) workdir and prints prompt + continuation. Prompts are encoded the way
the model was trained: with the workdir's ``tokenizer.json`` or ``tokenizer.model`` (a run keeps a
copy of its ``data.tokenizer``; an imported Hugging Face model brings its own), else byte-level.
``--prompt_ids=1,2,3`` gives token ids directly. Decoding (train/decoding.py) uses the KV cache
(llama) or the recurrent state (mamba); other families rerun the whole sequence per token.

The model is sharded as it was trained: the mesh is the workdir's ``config.mesh`` (``--mesh=
data=2,fsdp=4`` chooses another; unnamed axes are 1, one axis may be -1), so a model that needed
fsdp/tensor/expert parallelism to train decodes over the same devices. On a CPU-only machine
without ``--cpu_devices``, as many CPU devices are simulated as that mesh needs.

Example (the workdir of ``make run``)::

  python -m train.generate --workdir=/tmp/odyssey/lm_stdlib --prompt="def " \
      --prompt="class " --max_new_tokens=100 --temperature=0.7 --top_p=0.9
"""

import contextlib
import dataclasses
import os
import sys

from absl import app, flags, logging



class Codec:
  """Text <-> token ids as the workdir's model saw them (train/tokenizer.py ``from_workdir``: its
  tokenizer.json or tokenizer.model, else bytes), and which ids are text."""

  def __init__(self, workdir: str):
    from train import tokenizer
    self.tokenizer = tokenizer.from_workdir(workdir)
    # Byte-level: EOS/BOS/PAD are never sampled, as in the LM task's own samples.
    self.valid_vocab = self.tokenizer.sample_vocab
    self.pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
    self.name = self.tokenizer.path or "bytes"

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode_prompt(text)

  def decode(self, ids) -> str:
    return self.tokenizer.decode(ids)


def parse_ids(text: str) -> list[int]:
  """"1,2,3" -> [1, 2, 3], or one sentence."""
  try:
    ids = [int(part) for part in text.split(",") if part.strip()]
  except ValueError:
    raise ValueError(f"--prompt_ids={text!r} is not a comma-separated list of integers.") from None
  if not ids:
    raise ValueError("--prompt_ids is empty; give at least one token id.")
  return ids


def lm_workdir_config(workdir: str, *, purpose: str = "generation", verb: str = "generate"):
  """The config of ``workdir``, a language-model workdir with a checkpoint, or one sentence
  saying what it is instead (``purpose``/``verb``: what the caller needs it for)."""
  from train import checkpoint
  if not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir} does not exist.")
  config = checkpoint.load_config(workdir)
  if "task" not in config:
    raise ValueError(f"{workdir}/config.json has no 'task'; it was written by an older odyssey "
                     "that this one cannot load.")
  if config.task != "lm":
    raise ValueError(f"{workdir} holds a '{config.task}' model; {purpose} needs a language "
                     "model (task 'lm').")
  if not checkpoint.steps_in(workdir):
    raise ValueError(f"{workdir} has no checkpoint to {verb} from; train it first.")
  return config


def prepare(workdir: str, texts: list[str], id_lists: list[str], *, max_new_tokens: int,
            temperature: float, top_k: int, top_p: float, num_samples: int):
  """(config, codec, prompts as id lists) after every check that needs no compile, each failing
  with one sentence: sampling settings, the workdir (config, task, checkpoint), prompt lengths."""
  from train import decoding, models
  decoding.check_knobs(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p)
  if num_samples < 1:
    raise ValueError(f"--num_samples={num_samples} must be at least 1.")
  config = lm_workdir_config(workdir)
  codec = Codec(workdir)
  if not texts and not id_lists:
    texts = [config.sample.prompt]
  prompts = [codec.encode(t) for t in texts] + [parse_ids(s) for s in id_lists]
  cfg = models.model_config(config)
  for i, ids in enumerate(prompts):
    if not ids:
      raise ValueError(f"prompt {i} encodes to no tokens; give at least one character.")
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
      raise ValueError(f"prompt {i} has token id {bad[0]} outside the model's vocabulary "
                       f"[0, {cfg.vocab_size}).")
    if len(ids) + max_new_tokens > cfg.max_len:
      raise ValueError(f"prompt {i} has {len(ids)} tokens, which with --max_new_tokens="
                       f"{max_new_tokens} exceeds the model's max_len={cfg.max_len}.")
  return config, codec, prompts


def parse_mesh(text: str) -> dict[str, int]:
  """"data=2,fsdp=4" -> every mesh axis's size (unnamed axes 1), or one sentence."""
  from parallel import mesh as parallel_mesh
  sizes = {name: 1 for name in parallel_mesh.MESH_AXES}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = part.partition("=")
    if name not in sizes or not value.lstrip("-").isdigit():
      raise ValueError(f"--mesh={text!r} must be comma-separated AXIS=SIZE with AXIS one of "
                       f"{parallel_mesh.MESH_AXES}, e.g. --mesh=data=2,fsdp=4.")
    sizes[name] = int(value)
  return sizes


def mesh_sizes(workdir: str, mesh: str | None) -> dict:
  """The decoding mesh's config: ``--mesh`` when given, else the workdir's training mesh."""
  from train import checkpoint
  if mesh:
    return parse_mesh(mesh)
  saved = checkpoint.load_config(workdir).mesh
  from parallel import mesh as parallel_mesh
  return {name: int(saved[name]) for name in parallel_mesh.MESH_AXES}


def devices_needed(sizes: dict) -> int | None:
  """Devices a mesh config needs, or None when an axis is -1 (it fills whatever there is)."""
  import math
  return None if -1 in sizes.values() else math.prod(sizes.values())


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A workdir's model with its parameters sharded over a mesh, ready for inference (``load``)."""
  config: object  # the workdir's config.json, with the mesh it was loaded on
  model: object  # the model with the local attention kernel (any length, no sequence parallelism)
  params: dict
  step: int  # the checkpoint step the parameters come from
  mesh: object  # the jax.sharding.Mesh
  rules: tuple  # the logical -> mesh axis rules
  sizes: dict  # the mesh's resolved axis sizes

  @contextlib.contextmanager
  def context(self):
    """The mesh and logical rules that tracing the model needs."""
    import flax.linen as nn
    import jax
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def rows_sharding(self):
    """[rows, ...] arrays split over the batch axes (the rows must divide ``data_parallel``)."""
    from parallel import sharding
    return sharding.logical_sharding(self.mesh, self.rules, ("act_batch", None))

  @property
  def data_parallel(self) -> int:
    from parallel import sharding
    return sharding.data_parallel_size(self.sizes, self.rules)


def load(workdir: str, config, *, mesh: str | None = None, step: int | None = None,
         weights: str = "auto") -> Loaded:
  """The model of ``workdir`` (``config``: its checked config, ``lm_workdir_config``) with the
  parameters of checkpoint ``step`` (default the newest) sharded over ``mesh`` ("data=2,fsdp=4";
  default the workdir's own mesh); a mesh that misfits the devices is one sentence first.
  ``weights``: raw | ema (the EMA of the parameters, train.ema) | auto (raw for an LM)."""
  import jax
  import ml_collections
  from parallel import mesh as parallel_mesh
  from parallel import sharding
  from train import checkpoint, models
  sizes = mesh_sizes(workdir, mesh)
  mesh_cfg = ml_collections.ConfigDict({**sizes, "dcn": dict(config.mesh.get("dcn", {}))})
  resolved = parallel_mesh.mesh_shape(mesh_cfg, jax.device_count())  # a sentence if it misfits
  rules = sharding.rules_from_config(config.parallel)
  models.attention_plan(config, sharding.unsplit(resolved, rules, "act_seq"),
                        models.model_config(config))
  config.mesh.update(sizes)
  device_mesh = parallel_mesh.make_mesh(config.mesh)
  model, _, _ = models.build(config, device_mesh, seq_parallel=False)
  step, params = checkpoint.restore_params(
      workdir, checkpoint.abstract_params(config, model, device_mesh, rules), step=step,
      weights=weights)
  return Loaded(config=config, model=model, params=params, step=step, mesh=device_mesh,
                rules=rules, sizes=resolved)


def run(workdir: str, texts: list[str], id_lists: list[str] = (), *, max_new_tokens: int,
        temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
        num_samples: int = 1, step: int | None = None, end_id: int | None = None,
        mesh: str | None = None, weights: str = "auto"):
  """[(prompt index, prompt + continuation as text)], ``num_samples`` rows per prompt, decoded
  with the parameters sharded over ``mesh`` ("data=2,fsdp=4"; default the workdir's mesh)."""
  import jax
  from parallel import mesh as parallel_mesh
  from train import decoding, watchdog
  config, codec, prompts = prepare(workdir, list(texts), list(id_lists),
                                   max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p, num_samples=num_samples)
  loaded = load(workdir, config, mesh=mesh, step=step, weights=weights)
  rows = [p for p in prompts for _ in range(num_samples)]
  padded = rows + [rows[-1]] * (-len(rows) % loaded.data_parallel)  # rows split over batch axes
  print(f"odyssey: decoding on mesh {parallel_mesh._fmt(loaded.sizes)} of {jax.device_count()} "
        f"{jax.devices()[0].platform} devices.", file=sys.stderr, flush=True)
  watchdog.start(config.train.get("hang_timeout_s", 600.0))
  with loaded.context(), watchdog.phase("sample"):
    outs = decoding.generate(loaded.model, loaded.params, padded, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                             valid_vocab=codec.valid_vocab, end_id=end_id, pad_id=codec.pad_id,
                             sharding=loaded.rows_sharding())
  watchdog.stop()
  return [(i // num_samples, codec.decode(list(row) + [int(t) for t in new]))
          for i, (row, new) in enumerate(zip(rows, outs[:len(rows)]))]


def start_devices(workdir: str, mesh: str | None, cpu_devices: int | None,
                  processes: tuple) -> None:
  """Before JAX starts: on a CPU-only machine without ``cpu_devices`` (or XLA_FLAGS' count), as
  many simulated devices as the mesh needs; then jax.distributed from ``processes`` (coordinator
  address, number of processes, process id: python -m train's multi-process flags)."""
  from parallel import devices, distributed, xla_flags
  count = cpu_devices
  if count is None and not xla_flags.platforms() and os.path.isdir(workdir):
    count = devices_needed(mesh_sizes(workdir, mesh))
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
      count = None
  devices.set_cpu_devices(count)
  distributed.initialize(*processes)


def define_flags():
  """The CLI's flags, defined only when run as a program (tests and other modules import this one
  without claiming flag names such as --workdir)."""
  global _WORKDIR, _PROMPT, _PROMPT_IDS, _MAX_NEW, _TEMPERATURE, _TOP_K, _TOP_P, _SEED, _NUM_SAMPLES, _STEP, _END_ID, _CPU_DEVICES, _MESH, _WEIGHTS, _COORDINATOR, _NUM_PROCESSES, _PROCESS_ID
  _WORKDIR = flags.DEFINE_string("workdir", None, "A trained or converted LM workdir.")
  _PROMPT = flags.DEFINE_multi_string(
      "prompt", [], "Text to continue; repeat for a batch (default: the workdir's sample.prompt).")
  _PROMPT_IDS = flags.DEFINE_multi_string(
      "prompt_ids", [], "Comma-separated token ids to continue, bypassing the tokenizer; "
      "repeatable; these prompts come after the --prompt ones.")
  _MAX_NEW = flags.DEFINE_integer("max_new_tokens", 100, "Tokens to generate per sample.")
  _TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Softmax temperature; 0 is greedy.")
  _TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0: all.")
  _TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus: the most likely tokens holding this much "
                              "probability, in (0, 1]; 1: all.")
  _SEED = flags.DEFINE_integer("seed", 0, "Sampling seed; the same seed gives the same samples.")
  _NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
  _STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the newest).")
  _WEIGHTS = flags.DEFINE_string(
      "weights", "auto", "raw (the trained parameters) | ema (their EMA, train.ema) | auto "
      "(raw for a language model).")
  _END_ID = flags.DEFINE_integer("end_id", None, "Stop a sample when it produces this token id.")
  _CPU_DEVICES = flags.DEFINE_integer(
      "cpu_devices", None, "Simulate this many CPU devices (default on a CPU-only machine: as "
      "many as the mesh needs).")
  from parallel import distributed
  _COORDINATOR, _NUM_PROCESSES, _PROCESS_ID = distributed.define_flags(flags)
  _MESH = flags.DEFINE_string(
      "mesh", None, "Decoding mesh, e.g. data=2,fsdp=4 (unnamed axes 1; one may be -1); default: "
      "the workdir's training mesh.")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Orbax warns about the checkpoint items generation does not read (the data position).
  logging.set_verbosity(logging.ERROR)
  # Imported here: the device count must be set before JAX initialises its backends.
  try:
    start_devices(_WORKDIR.value, _MESH.value, _CPU_DEVICES.value,
                  (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value))
    samples = run(_WORKDIR.value, _PROMPT.value, _PROMPT_IDS.value,
                  max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                  top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value,
                  num_samples=_NUM_SAMPLES.value, step=_STEP.value, end_id=_END_ID.value,
                  mesh=_MESH.value, weights=_WEIGHTS.value)
  except ValueError as e:
    sys.exit(f"odyssey: {e}")
  import jax
  if jax.process_index() != 0:  # every process decoded the same rows; one prints them
    return
  for i, (prompt, text) in enumerate(samples):
    print(f"=== prompt {prompt}, sample {i % _NUM_SAMPLES.value} ===\n{text}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
