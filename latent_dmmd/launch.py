"""Several CPU processes from ``accelerate launch --num_processes N --cpu``.

Without MPI, ``accelerate launch --cpu`` starts a single process whatever ``--num_processes``
says (it expects ``mpirun`` to multiply it). This module notices that situation and starts
the N gloo processes itself with ``torch.distributed.run`` (torchrun), so the documented
command does what it says.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shlex
import signal
import sys
import threading

logger = logging.getLogger(__name__)

_DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def requested_cpu_processes(parent_cmdline: list[str]) -> int:
    """``--num_processes`` of an ``accelerate launch ... --cpu`` command line (1 if absent)."""
    if "launch" not in parent_cmdline or "--cpu" not in parent_cmdline:
        return 1
    for i, arg in enumerate(parent_cmdline):
        if arg == "--num_processes" and i + 1 < len(parent_cmdline):
            return int(parent_cmdline[i + 1])
        if arg.startswith("--num_processes="):
            return int(arg.split("=", 1)[1])
    return 1


def _parent_cmdline() -> list[str]:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a.decode() for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def maybe_relaunch_on_cpus(script: str, argv: list[str]) -> None:
    """If this process is the lone child of ``accelerate launch --cpu --num_processes N`` (N > 1),
    replace it by N torchrun-managed CPU processes running the same script and arguments."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes"):
        return
    if any(name in os.environ for name in _DISTRIBUTED_ENV):
        return  # already one of several processes
    n = requested_cpu_processes(_parent_cmdline())
    if n <= 1:
        return
    port = os.environ.get("MASTER_PORT", "29500")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={port}",
           script, *argv]  # fmt: skip
    logger.warning("accelerate launch --cpu starts one process without MPI; starting %d CPU processes: %s",
                   n, shlex.join(cmd))  # fmt: skip
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or n) // n)))
    sys.stdout.flush()
    die_with_parent()  # kept across exec: killing `accelerate launch` ends torchrun, which ends its workers
    os.execv(sys.executable, cmd)


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``), so
    ``kill -9`` of a launcher leaves no orphaned workers. Returns False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(1, int(sig), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except OSError:
        return False


_HELD: list = []  # what a distributed worker keeps alive until its os._exit


def _distributed() -> bool:
    """Whether this process is one of several of a distributed run (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def hold_until_exit(*objects) -> None:
    """Keep a distributed run's DDP-wrapped models alive until ``run_worker`` ends the process with
    ``os._exit``. Freeing a DDP model frees its reducer, whose release destroys gloo's process group with the
    GIL held and joins its worker threads, one of which may still be dropping the last barrier's work (tensors
    with Python objects: it waits for the GIL) -- a deadlock in about 1 run out of 6 with two processes on a
    busy machine (pytorch/pytorch#56297). Held, the group is never destroyed: the process ends without
    teardown once its outputs are written. A single process holds nothing (in-process callers free the model)."""
    if _distributed():
        _HELD.extend(objects)


def run_worker(main, timeout: float | None = None) -> None:
    """Run a training ``main`` as one process of a distributed run and make sure it exits.

    The worker dies with its launcher, and after ``main`` returns (the pipeline is written and
    fsynced) the process ends with ``os._exit``, never freeing what ``hold_until_exit`` holds (the
    DDP models, whose release could deadlock). The process group is destroyed first under a
    watchdog: after ``timeout`` seconds (``LATENT_DMMD_TEARDOWN_TIMEOUT``, default 60) the process
    exits anyway, with status 0, since its work is done.
    """
    distributed = _distributed()
    if distributed:
        die_with_parent()
    main()
    if not distributed:
        return
    timeout = float(os.environ.get("LATENT_DMMD_TEARDOWN_TIMEOUT", "60")) if timeout is None else timeout
    sys.stdout.flush()
    sys.stderr.flush()
    watchdog = threading.Timer(timeout, _exit_after_teardown_timeout, args=(timeout,))
    watchdog.daemon = True
    watchdog.start()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    watchdog.cancel()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown to hang in: everything is written


def _exit_after_teardown_timeout(timeout: float) -> None:
    logger.warning("the process group did not shut down within %.0f s; exiting (the run's outputs are complete)", timeout)
    sys.stderr.flush()
    os._exit(0)
