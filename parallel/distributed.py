"""Multi-controller start-up: ``jax.distributed.initialize`` from flags or the cluster environment.

One process per host (or per GPU) runs the same program; JAX's coordination service connects them
and the mesh spans every process's devices. How the processes find each other, in order:

1. explicit: ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (what
   ``python -m train.launch`` passes; also the fallback for any cluster JAX does not detect), or
   the same values in ``JAX_COORDINATOR_ADDRESS``, ``ODYSSEY_NUM_PROCESSES``, ``ODYSSEY_PROCESS_ID``;
2. automatic, when the environment shows a multi-process job JAX can read (``MULTI_PROCESS_ENV``):
   a TPU VM pod slice (``TPU_WORKER_HOSTNAMES`` with several hosts, or a multislice
   ``MEGASCALE_COORDINATOR_ADDRESS``), SLURM (``srun`` with ``SLURM_NTASKS`` > 1), Open MPI
   (``mpirun``, ``OMPI_COMM_WORLD_SIZE`` > 1);
3. otherwise one process: nothing to initialise.

On CPU the cross-process collectives go through gloo (set before initialising).
"""

import os

import jax


def _several(name: str, sep: str | None = None) -> bool:
  value = os.environ.get(name, "")
  if sep is not None:
    return len([v for v in value.split(sep) if v.strip()]) > 1
  return value.isdigit() and int(value) > 1


# Environment variables that show a multi-process job jax.distributed.initialize() can configure
# itself from (its cluster detection), and how to read them.
MULTI_PROCESS_ENV = {
    "TPU_WORKER_HOSTNAMES": lambda: _several("TPU_WORKER_HOSTNAMES", ","),
    "MEGASCALE_COORDINATOR_ADDRESS": lambda: bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")),
    "SLURM_NTASKS": lambda: "SLURM_JOB_ID" in os.environ and _several("SLURM_NTASKS"),
    "OMPI_COMM_WORLD_SIZE": lambda: _several("OMPI_COMM_WORLD_SIZE"),
}


def detected_cluster() -> str | None:
  """The MULTI_PROCESS_ENV variable that shows a multi-process job, if any."""
  return next((name for name, present in MULTI_PROCESS_ENV.items() if present()), None)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, platform: str | None = None) -> str:
  """Connects this process to the others (before any JAX backend starts); returns how.

  Raises ValueError with one sentence for an incomplete or inconsistent explicit setting.
  ``platform`` is the JAX platform the run will use (default: ``JAX_PLATFORMS``'s first entry);
  on "cpu" the gloo collectives are selected.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = num_processes or _int_env("ODYSSEY_NUM_PROCESSES")
  if process_id is None:
    process_id = _int_env("ODYSSEY_PROCESS_ID")
  explicit = (coordinator_address, num_processes, process_id)
  platform = platform or (os.environ.get("JAX_PLATFORMS") or "").split(",")[0] or None
  if any(v is not None for v in explicit):
    if coordinator_address is None and num_processes in (None, 1) and process_id in (None, 0):
      return "single process"
    if coordinator_address is None or num_processes is None or process_id is None:
      raise ValueError("a multi-process run needs all of --coordinator_address, --num_processes "
                       f"and --process_id (got {coordinator_address!r}, {num_processes!r}, "
                       f"{process_id!r}).")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, {num_processes}).")
    if num_processes == 1:
      return "single process"
    _cpu_collectives(platform)
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return f"process {process_id} of {num_processes}, coordinator {coordinator_address}"
  cluster = detected_cluster()
  if cluster is None:
    return "single process"
  _cpu_collectives(platform)
  jax.distributed.initialize()
  return (f"process {jax.process_index()} of {jax.process_count()}, detected from {cluster}")


def _cpu_collectives(platform: str | None) -> None:
  if platform in (None, "cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _int_env(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  if not value.lstrip("-").isdigit():
    raise ValueError(f"{name}={value!r} must be an integer.")
  return int(value)


def define_flags(flags):
  """The explicit multi-process flags of a CLI (``absl.flags``): (coordinator_address,
  num_processes, process_id) holders, for ``initialize``."""
  return (flags.DEFINE_string(
              "coordinator_address", None, "HOST:PORT of process 0's coordination service, for a "
              "multi-process run the environment does not describe (python -m train.launch "
              "passes it for local runs; parallel/distributed.py)."),
          flags.DEFINE_integer("num_processes", None, "Processes in the run."),
          flags.DEFINE_integer("process_id", None, "This process's index, 0..N-1."))
