"""Orbax checkpoints of the train state and the grain iterator position, saved together."""

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from nets import registry
from parallel import mesh as parallel_mesh
from parallel import sharding
from train import data, models, tasks
from train import state as state_lib
from train import workdir as workdir_lib


class CheckpointSaveError(workdir_lib.WorkdirError):
  """A checkpoint save failed (e.g. a full disk): one sentence naming the step and what is left."""


class Checkpointer:
  """One CheckpointManager in ``workdir/checkpoints`` with items "state" and "data".

  Saves are asynchronous (the device->host copy happens before ``save`` returns, so the caller
  may donate the state right after); ``keep`` newest steps are kept, and a forced save (the final
  step) ignores the interval. Orbax writes into a temporary folder and renames it when complete, so
  an interrupted or failed save never shadows the previous good checkpoint. A failed save raises
  ``CheckpointSaveError`` naming its step: at once for the synchronous part, else from
  ``check_saved`` (cheap; the loop calls it every step), the next ``save`` or ``close``.
  """

  def __init__(self, workdir: str, ckpt_cfg):
    self.every = ckpt_cfg.every
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep, save_interval_steps=ckpt_cfg.every,
        enable_async_checkpointing=ckpt_cfg.async_save, create=True)
    _plain_array_writes_on_cpu()
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))
    self._in_flight = None  # the step of an async save not yet known to have finished
    _quiet_orbax_save_failures()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Every ``ckpt.every`` steps (Orbax's own policy would also save the very first step)."""
    return step % self.every == 0

  def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
    """Saves the state and the iterator position reached after ``step`` steps."""
    self.check_saved(wait=True)  # Orbax waits for the previous save here anyway
    args = ocp.args.Composite(state=ocp.args.StandardSave(_saved_fields(state)),
                              data=data.checkpoint_args_save(data_iter))
    try:
      saved = self.manager.save(step, args=args, force=force)
    except Exception as e:  # the synchronous part: folders, metadata, the device->host copy
      raise self._save_failed(step, e) from e
    if saved:
      self._in_flight = step
    return saved

  def check_saved(self, *, wait: bool = False) -> None:
    """Raises CheckpointSaveError if the last async save failed; without ``wait`` it only looks
    at a save that has already finished, so calling it every step costs nothing."""
    if self._in_flight is None:
      return
    if not wait and self.manager.is_saving_in_progress():
      return
    step, self._in_flight = self._in_flight, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # raised once, by the thread that finalised the save
      raise self._save_failed(step, e) from e

  def _save_failed(self, step: int, error: Exception) -> CheckpointSaveError:
    reason = _first_line(error)
    full = isinstance(error, OSError) and error.errno == errno.ENOSPC or (
        "No space left" in reason)
    intact = [s for s in workdir_lib.checkpoint_steps(os.path.dirname(self.directory)) if s != step]
    if intact:
      left = (f"the previous checkpoints (steps {intact}) are intact. "
              f"{'Free space' if full else 'Fix the cause'} and rerun to resume from step "
              f"{intact[-1]}.")
    else:
      left = (f"there is no earlier checkpoint. {'Free space' if full else 'Fix the cause'} and "
              "rerun to start again.")
    return CheckpointSaveError(f"saving checkpoint step {step} to {self.directory} failed "
                               f"({type(error).__name__}: {reason}); {left}")

  def restore(self, step: int, abstract_state, data_iter):
    """Restores the state into ``abstract_state``'s shardings and ``data_iter`` in place.

    ``abstract_state`` may have any mesh (a different device count, other fsdp/tensor sizes):
    Orbax reads each array straight into its new sharding (elastic restore).
    """
    state = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_saved_fields(abstract_state)))).state
    self._restore_position(step, data_iter)
    if isinstance(abstract_state, state_lib.TrainState):
      state = state_lib.TrainState(**state)
    return state

  def _restore_position(self, step: int, data_iter):
    """Sets ``data_iter`` to the position saved with ``step``, also from another process count.

    grain writes one ``process_I-of-N.json`` per process. Every process of odyssey's pipeline
    holds the same position (the number of global batches consumed; train/data.py shards each
    batch over processes), so a run on a different number of processes continues from it.
    """
    folder = epath.Path(self.directory) / str(step) / "data"
    mine = folder / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    files = [mine] if mine.exists() else sorted(folder.glob("process_*-of-*.json"))
    if not files:
      raise FileNotFoundError(f"checkpoint step {step} has no data position in {folder}")
    positions = {f.read_text().strip() for f in files}
    if len(positions) > 1:
      raise ValueError(f"checkpoint step {step} was written by {len(files)} processes at different "
                       f"data positions, so it cannot continue on {jax.process_count()}.")
    data_iter.set_state(json.loads(positions.pop()))

  def restore_newest_valid(self, abstract_state, data_iter, report) -> tuple[int | None, object]:
    """(step, state) of the newest checkpoint that restores, or (None, None) if there is none.

    A checkpoint whose files are damaged (truncated or missing files, a missing item, unreadable
    metadata) is reported through ``report(sentence)`` and moved to
    ``workdir/checkpoints_corrupt/<step>`` (kept for inspection, and so a later save of the same
    step cannot collide with it); the previous step is tried next. Nothing is deleted. A
    checkpoint with intact files that holds a state of another structure (another model or
    optimizer) is not damaged: the run is refused with a sentence and nothing is moved.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      # Compared before reading any array (metadata only), so a failed restore means damage.
      mismatch = self._structure_mismatch(step, abstract_state)
      if mismatch:
        raise workdir_lib.WorkdirError(
            f"checkpoint step {step} in {self.directory} holds a state this config cannot "
            f"continue ({mismatch}); its files are intact and were left in place; rerun with "
            "the config it was written with, or use a new --workdir (with --config.init.from="
            f"{os.path.dirname(self.directory)} to fine-tune from its parameters).")
      try:
        return step, self.restore(step, abstract_state, data_iter)
      except Exception as e:  # Orbax/TensorStore raise many types for a damaged checkpoint
        moved = self._quarantine(step)
        report(f"checkpoint step {step} is unreadable ({type(e).__name__}: {_first_line(e)}); "
               f"moved it to {moved} and trying the previous checkpoint.")
    return None, None

  def _structure_mismatch(self, step: int, abstract_state) -> str | None:
    """The first array that is missing, extra or shaped differently in the saved state's metadata,
    or None when it agrees or is unreadable (damage, which the restore then meets)."""
    try:
      saved = ocp.PyTreeCheckpointHandler().metadata(
          epath.Path(self.directory) / str(step) / "state")
    except Exception:  # unreadable metadata: damaged files
      return None
    have = _shapes_by_path(getattr(saved, "tree", saved))
    want = _shapes_by_path(abstract_state)
    if not have:
      return None
    for name, shape in want.items():
      if name not in have:
        return f"it has no array {name}, which this config's state needs"
      if have[name] != shape:
        return f"{name} has shape {have[name]} there, this config needs {shape}"
    extra = sorted(set(have) - set(want))
    if extra:
      return f"it has array {extra[0]}, for which this config's state has no place"
    return None

  def _quarantine(self, step: int) -> str:
    target = os.path.join(os.path.dirname(self.directory), "checkpoints_corrupt", str(step))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      if os.path.exists(target):
        target = f"{target}.{len(os.listdir(os.path.dirname(target)))}"
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"odyssey_quarantine_{step}")
    self.manager.reload()
    return target

  def close(self):
    """Waits for pending async saves (raising CheckpointSaveError if one failed), then releases
    the manager."""
    try:
      self.check_saved(wait=True)
    finally:
      with contextlib.suppress(Exception):  # a failure was reported above, or by save()
        self.manager.close()


def _plain_array_writes_on_cpu():
  """On the CPU backend, Orbax writes every array without replica-parallel slicing.

  Replica-parallel saving splits each replicated array among the devices holding it, so that on
  a pod every replica writes a part; to do so it compiles a slicing program per array shape and
  device, which on (simulated) CPU devices, sharing one host's memory and disk, only costs time:
  14 s for the first save of 80 replicated arrays on 8 simulated devices, 0.4 s without. Other
  backends keep Orbax's default."""
  global _PLAIN_WRITES
  if _PLAIN_WRITES or jax.default_backend() != "cpu":
    return
  from absl import logging as absl_logging
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # not Orbax's "overriding jax.Array" warning
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
  finally:
    absl_logging.set_verbosity(level)
  _PLAIN_WRITES = True


_PLAIN_WRITES = False  # registered in this process


def _saved_fields(state):
  """The train state as Orbax saves it: its fields by name, without ``ema_params`` when there is
  no EMA and without ``task_state`` when the task keeps none, so such a run writes (and resumes)
  exactly the checkpoints of the odyssey before those fields existed. Any other pytree is saved
  as it is."""
  if not isinstance(state, state_lib.TrainState):
    return state
  fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  for optional in ("ema_params", "task_state"):
    if fields[optional] is None:
      del fields[optional]
  return fields


def remove_interrupted_saves(workdir: str) -> list[str]:
  """Deletes the temporary folders (``<step>.orbax-checkpoint-tmp*``) of saves that never
  finished (a failed save, a kill or a second Ctrl-C during one) and returns their names. They
  were never renamed to a step, so nothing can restore them; call only while holding the lock."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  removed = sorted(n for n in os.listdir(directory) if TMP_MARK in n)
  for name in removed:
    path = os.path.join(directory, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
  return removed


TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax's suffix for a save still being written


def _shapes_by_path(tree) -> dict[str, tuple]:
  """{"a/b/0": shape} for every array of ``tree``, with dict keys, attributes and sequence
  indices alike (Orbax's metadata spells a TrainState and optax's tuples as dicts and lists)."""
  def part(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, "shape", None)
    if shape is not None:
      out["/".join(part(k) for k in path)] = tuple(shape)
  return out


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return (text.splitlines()[0][:300] if text else type(error).__name__)


class _OrbaxSaveFailureFilter(logging.Filter):
  """Drops Orbax's own error records about a failed save (each with the whole traceback chain,
  about a thousand lines); ``CheckpointSaveError`` reports the failure in one sentence."""

  MARKS = ("Failed to run", "Save Finalize thread", "Checkpointer failed")

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    message = str(record.msg)
    return not any(mark in message for mark in self.MARKS)


def _quiet_orbax_save_failures():
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxSaveFailureFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_OrbaxSaveFailureFilter())


# A workdir written by ``python -m train.convert`` holds this file: its checkpoint is parameters
# only (no optimizer state, no data position), for init.from, generation, sampling and export.
CONVERTED_MARKER = "converted.json"


def steps_in(workdir: str) -> list[int]:
  """Checkpoint steps present in ``workdir/checkpoints`` (Orbax's own listing; [] if none)."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    return []
  manager = ocp.CheckpointManager(directory, item_names=("state", "data"))
  steps = list(manager.all_steps())
  manager.close()
  return sorted(steps)


WEIGHTS = ("auto", "raw", "ema")  # --weights of train.sample, train.generate, train.convert


def _params_manager(workdir: str, step: int | None, key: str = "params"):
  """(manager, step, saved metadata of the state's ``key`` subtree: "params", or "ema_params"
  for the EMA) for ``step`` (None: the newest) of ``workdir``."""
  steps = steps_in(workdir)
  if not steps:
    raise ValueError(f"{workdir} has no checkpoint to load parameters from.")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ValueError(f"{workdir} has no checkpoint at step {step}; it has steps {steps}.")
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  try:
    saved = manager.item_metadata(step).state
  except Exception as e:  # unreadable metadata: a damaged checkpoint
    manager.close()
    raise ValueError(f"checkpoint step {step} of {workdir} is unreadable ({type(e).__name__}: "
                     f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}).") from e
  saved = getattr(saved, "tree", saved)
  if not isinstance(saved, dict) or "params" not in saved:
    manager.close()
    raise ValueError(f"checkpoint step {step} of {workdir} holds no parameters.")
  if key not in saved:
    manager.close()
    raise ValueError(f"checkpoint step {step} of {workdir} holds no EMA of the parameters (its "
                     "run had train.ema.decay=0); use --weights=raw.")
  return manager, step, saved[key]


def resolve_weights(workdir: str, weights: str, *, step: int | None = None) -> str:
  """"raw" or "ema" for ``weights`` ("auto": the EMA when ``workdir`` is a diffusion run whose
  checkpoint holds one, else the raw parameters); one sentence for an unknown name or for "ema"
  from a checkpoint without an EMA."""
  if weights not in WEIGHTS:
    raise ValueError(f"--weights={weights} is not one of {', '.join(WEIGHTS)}.")
  if weights == "raw":
    return "raw"
  manager, step, _ = _params_manager(workdir, step)
  try:
    saved = manager.item_metadata(step).state
  finally:
    manager.close()
  held = "ema_params" in getattr(saved, "tree", saved)
  if weights == "auto":
    return "ema" if held and load_config(workdir).get("task") == "diffusion" else "raw"
  if not held:
    raise ValueError(f"{workdir} (checkpoint step {step}) holds no EMA of the parameters (it was "
                     "trained with train.ema.decay=0); use --weights=raw.")
  return "ema"


def check_params_fit(workdir: str, abstract_params, *, step: int | None = None) -> int:
  """The step whose parameters would restore into ``abstract_params``; one sentence naming the
  first parameter that is missing, extra or shaped differently. Reads metadata only."""
  manager, step, saved = _params_manager(workdir, step)
  manager.close()
  check_same_shapes(saved, abstract_params, f"{workdir} (step {step})")
  return step


def restore_params(workdir: str, abstract_params, *, step: int | None = None,
                   weights: str = "raw"):
  """(step, params) restored from ``workdir``'s checkpoint into ``abstract_params``' shardings.

  Only the ``params`` subtree of the saved state is read (Orbax partial restore), or with
  ``weights`` "ema" (or "auto", ``resolve_weights``) the ``ema_params`` one, so this works for
  training checkpoints (a whole TrainState) and for converted ones (parameters only), and the
  optimizer state is never loaded. A parameter whose shape differs from ``abstract_params`` is
  named in one sentence before anything is read.
  """
  key = "ema_params" if resolve_weights(workdir, weights, step=step) == "ema" else "params"
  manager, step, saved = _params_manager(workdir, step, key)
  try:
    check_same_shapes(saved, abstract_params, f"{workdir} (step {step})")
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={key: abstract_params}, restore_args={key: restore_args},
        partial_restore=True))).state
  finally:
    manager.close()
  return step, restored[key]


def model_param_shapes(config):
  """ShapeDtypeStructs of the parameters ``config.model`` defines (no mesh; nothing runs)."""
  import flax.linen as nn
  model = registry.get(config.model.name).Model(models.model_config(config))
  task = tasks.get(config)
  example = task.model_example_batch(1, model.cfg)
  args = task.init_args(jax.tree.map(jnp.asarray, example))
  return nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args)["params"]))


def check_same_shapes(saved, abstract, source: str) -> None:
  """One sentence naming the first parameter that is missing, extra or shaped differently."""
  flat_saved = {jax.tree_util.keystr(k): v for k, v in
                jax.tree_util.tree_flatten_with_path(saved)[0]}
  flat_want = {jax.tree_util.keystr(k): v for k, v in
               jax.tree_util.tree_flatten_with_path(abstract)[0]}
  for name, want in flat_want.items():
    if name not in flat_saved:
      raise ValueError(f"{source} has no parameter params{name}, which this model config needs; "
                       "the checkpoint was made for another model.")
    have = tuple(getattr(flat_saved[name], "shape", ()))
    if have != tuple(want.shape):
      raise ValueError(f"parameter params{name} in {source} has shape {have}, but this model "
                       f"config needs {tuple(want.shape)}.")
  extra = sorted(set(flat_saved) - set(flat_want))
  if extra:
    raise ValueError(f"{source} has parameter(s) this model config has no place for, e.g. "
                     f"params{extra[0]}; the checkpoint was made for another model.")


def model_differences(workdir: str, config) -> list[str]:
  """Model hyperparameters (as the family's Config resolves them) that differ between
  ``workdir``'s config and ``config`` ("field: theirs -> ours"), for fine-tuning runs: the shapes
  match, but e.g. another norm_eps or rope_theta is another function. remat is not compared."""
  return [f"{k}: {change}" for k, change in model_field_changes(load_config(workdir), config)
          if k != "remat"]


def model_field_changes(theirs_config, config) -> list[tuple[str, str]]:
  """(field, "theirs -> ours") for each model hyperparameter, as the family's Config resolves
  them (defaults filled in; MoE fields as ``moe.x``), that differs between two configs of one
  family. Raises ValueError when a config's model group is not one the family reads."""
  theirs = flat_dict(dataclasses.asdict(models.model_config(theirs_config)))
  ours = flat_dict(dataclasses.asdict(models.model_config(config)))
  return [(k, f"{theirs.get(k)!r} -> {ours.get(k)!r}") for k in sorted(set(theirs) | set(ours))
          if theirs.get(k) != ours.get(k)]


def flat_dict(d: dict, prefix: str = "") -> dict:
  """{"a.b": v} for the nested dict {"a": {"b": v}}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flat_dict(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's own ``config.json`` (written by ``python -m train`` or ``train.convert``)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{workdir} has no config.json; is it an odyssey workdir?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_trained(workdir: str, *, step: int | None = None, devices=None, weights: str = "raw"):
  """(config, model, mesh, params) of a trained workdir, for inference on ``devices`` (default: one).

  The config is the run's own ``config.json``; the mesh is replaced by plain data parallelism
  over ``devices``, and the model uses the local attention kernel. Only parameters are read (the
  raw ones or their EMA: ``weights``, as ``restore_params``), so converted workdirs
  (``python -m train.convert``) load the same way.
  """
  config = load_config(workdir)
  devices = jax.devices()[:1] if devices is None else devices
  config.mesh.update(data=len(devices), fsdp=1, tensor=1, seq=1, expert=1)
  mesh = parallel_mesh.make_mesh(config.mesh, devices)
  rules = sharding.rules_from_config(config.parallel)
  model, _, _ = models.build(config, mesh, seq_parallel=False)
  _, params = restore_params(workdir, abstract_params(config, model, mesh, rules), step=step,
                             weights=weights)
  return config, model, mesh, params


def abstract_params(config, model, mesh, rules):
  """ShapeDtypeStructs (with shardings over ``mesh``) of ``model``'s parameters; nothing runs."""
  task = tasks.get(config)
  n = mesh.devices.size
  example = task.model_example_batch(n, model.cfg)
  init = lambda: model.init(jax.random.PRNGKey(0), *task.init_args(
      jax.tree.map(jnp.asarray, example)))["params"]
  abstract, _ = sharding.abstract_and_shardings(init, mesh, rules)
  return abstract
