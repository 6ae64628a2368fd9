"""Multi-process start-up: when and how train.py calls `jax.distributed.initialize`.

One process drives all local accelerators (a TPU VM's chips, a host's GPUs), so a single host
needs nothing here. Several hosts (or several processes on one host) join through
`jax.distributed.initialize`, which must run before anything touches a JAX backend:

* explicit: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (any launcher);
* detected: SLURM (`srun`: SLURM_NTASKS > 1), Open MPI (`mpirun`: OMPI_COMM_WORLD_SIZE > 1), and
  Cloud TPU VMs (TPU pod slices; also fine on a single-host TPU), for which JAX reads the
  coordinator, process count and id from the environment itself;
* `--distributed=on` forces the call with JAX's own detection (e.g. a cluster JAX knows but this
  file does not), `--distributed=off` never calls it.

On CPU the cross-process collectives need an implementation: gloo is selected here.
"""

from __future__ import annotations

import os

import jax
from absl import logging

MODES = ("auto", "on", "off")


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, "0"))
    except ValueError:
        return 0


def _on_cloud_tpu_vm() -> bool:
    try:  # JAX's own check (a private module: treat any failure as "no")
        from jax._src.clusters import cloud_tpu_cluster

        return bool(cloud_tpu_cluster.running_in_cloud_tpu_vm)
    except Exception:  # noqa: BLE001
        return False


def detected_cluster() -> str | None:
    """The multi-process launcher found in the environment ("slurm", "openmpi", "cloud_tpu") or None."""
    if "SLURM_JOB_ID" in os.environ and _env_int("SLURM_NTASKS") > 1 and "SLURM_PROCID" in os.environ:
        return "slurm"
    if _env_int("OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    if _on_cloud_tpu_vm():
        return "cloud_tpu"
    return None


def initialize(
    mode: str = "auto",
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Calls `jax.distributed.initialize` when the launch is multi-process; True when it did.

    Must run before the first use of a JAX backend (jax.devices(), any computation).
    """
    if mode not in MODES:
        raise ValueError(f"--distributed={mode!r}: use one of {MODES}.")
    explicit = {
        k: v
        for k, v in dict(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
        ).items()
        if v is not None
    }
    if mode == "off":
        if explicit:
            raise ValueError(f"--distributed=off contradicts {sorted(explicit)}; drop one or the other.")
        return False
    if explicit and len(explicit) < 3 and detected_cluster() is None:
        missing = sorted({"coordinator_address", "num_processes", "process_id"} - set(explicit))
        raise ValueError(
            f"Multi-process launch needs --coordinator_address, --num_processes and --process_id "
            f"together outside SLURM/Open MPI/Cloud TPU; missing {missing}."
        )
    cluster = detected_cluster()
    if mode == "auto" and not explicit and cluster is None:
        return False
    # XLA:CPU has no cross-process collectives unless told which implementation to use; the
    # setting only concerns the CPU client, so it is harmless next to GPUs and TPUs.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**explicit)
    logging.info(
        "jax.distributed: process %d of %d (%s), %d local / %d global devices.",
        jax.process_index(),
        jax.process_count(),
        "explicit flags" if explicit else (cluster or "JAX auto-detection"),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
