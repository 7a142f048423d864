"""One launcher for the multi-process tests: gloo on the loopback address, bounded in time.

``launch(fn, tmp_path, *args)`` runs ``fn(rank, world_size, *args)`` in ``world_size`` spawned
processes that share a freshly initialised gloo process group (127.0.0.1, a free port). A
process that raises fails the test with its traceback; if they have not all finished within
``timeout`` seconds (a deadlock: one rank stuck in a collective the other never joins) they
are killed and the test fails, instead of hanging the run.

``fn`` must be a module-level function of a test module (spawned processes import it by
name; pytest puts tests/ on sys.path and spawn passes sys.path on to the children).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HOST = "127.0.0.1"


def free_port() -> int:
    # Another process may take the port between close() and the rendezvous; rare on a test
    # machine, and the failure is a clear "address in use", not a wrong result.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple) -> None:
    torch.set_num_threads(1)  # two ranks on a shared 2-core machine
    os.environ.update(MASTER_ADDR=HOST, MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
    )
    try:
        fn(rank, world_size, *args)
        # Every rank's collectives are finished before any rank leaves.
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without the interpreter's teardown: after FSDP2 runs, tearing gloo and torch's
    # threads down at exit aborted a rank now and then ("terminate called without an active
    # exception", SIGABRT) after its work was done and its results written (seen in about 1
    # of 8 runs of the FSDP2 meta-step test, also with the barrier above).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout: float = 180.0) -> None:
    ctx = mp.start_processes(
        _entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):  # raises ProcessRaisedException if a rank failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{fn.__name__} did not finish within {timeout} s on {world_size} ranks")


def has_fully_shard() -> bool:
    """Whether this torch has the public FSDP2 entry point (torch 2.6 and later)."""
    try:
        import torch.distributed.fsdp as fsdp
    except ImportError:
        return False
    return hasattr(fsdp, "fully_shard")
