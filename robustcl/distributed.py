"""Process-group checks shared by every command that runs under a launcher (``robustcl launch``, ``accelerate
launch``, ``torchrun``, ``mpirun``).

Two launches look fine and compute something else (measured with accelerate 1.15, torch 2.13 on a CPU machine):

- ``accelerate launch --cpu --num_processes 2`` (or a config with ``use_cpu`` and no ``--multi_gpu``) starts ONE
  process through accelerate's single-process launcher. Nothing says how many were asked for: no ``WORLD_SIZE``,
  but the launcher exports ``MASTER_ADDR``/``MASTER_PORT`` (only when asked for more than one process or machine)
  and its ``ACCELERATE_DYNAMO_BACKEND`` etc. Its command line, in the parent process, names ``--num_processes``.
- ``accelerate launch --multi_gpu`` without ``ACCELERATE_USE_CPU`` on a machine without GPUs starts N processes
  with ``WORLD_SIZE=N``; a plain ``Accelerator()`` then makes N independent single-process runs.
  (``Accelerator(cpu=True)``, which robustcl uses on CPU, joins them into one gloo group instead.)

A third one drops DeepSpeed: ``ACCELERATE_USE_DEEPSPEED=true`` from the launcher, but ``ACCELERATE_USE_CPU`` or
``Accelerator(cpu=True)`` turns it off and the processes run plain DDP.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import TypeVar

from accelerate import Accelerator
from accelerate.utils import DistributedType

from .errors import UserError
from .launcher import LAUNCH_PROCESSES_VAR

T = TypeVar("T")

# The world-size variables of torchrun / accelerate's multi-process launchers, then of MPI launchers.
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def check_world_size(accelerator: Accelerator) -> None:
    """Refuse to run when the processes are not one process group of the size the launcher asked for."""
    problem = launch_problem(accelerator.num_processes, accelerator.distributed_type, dict(os.environ))
    if problem is not None:
        raise UserError(*problem)


def launch_problem(
    got: int, distributed_type: DistributedType, env: dict[str, str], parent_argv: list[str] | None = None
) -> tuple[str, str, str] | None:
    """(what, where, fix) when ``got`` processes in the group are not what the launcher asked for, else None.

    ``parent_argv`` is the launching process's command line (read from /proc when None)."""
    for var in (LAUNCH_PROCESSES_VAR, *_WORLD_SIZE_VARS):
        value = env.get(var, "").strip()
        if value.isdigit():
            asked = int(value)
            if asked != got:
                if var == LAUNCH_PROCESSES_VAR:
                    asked_for = f"robustcl launch asked for {asked} processes"
                else:
                    asked_for = f"the launcher started {asked} processes ({var}={asked})"
                alone = " (they would train independently)" if got == 1 else ""
                return (
                    f"{asked_for} but this one is in a process group of {got}{alone}",
                    "launcher",
                    _fix(asked, env),
                )
            break
    else:
        if "ACCELERATE_DYNAMO_BACKEND" in env and got == 1:  # started by accelerate's single-process launcher
            asked = accelerate_num_processes(_parent_argv() if parent_argv is None else parent_argv)
            if (asked is not None and asked > 1) or (asked is None and "MASTER_PORT" in env):
                cpu = env.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes")
                return (
                    f"accelerate launch was asked for {asked or 'several'} processes but started 1"
                    + (" (its --cpu flag always starts a single process)" if cpu else ""),
                    "launcher",
                    _fix(asked or 2, env, cpu=True if cpu else None),
                )
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and distributed_type != DistributedType.DEEPSPEED:
        return (
            f"the launcher asked for DeepSpeed but the processes run {distributed_type.value}",
            "ACCELERATE_USE_CPU / Accelerator(cpu=True)",
            "accelerate's CPU switch turns DeepSpeed off; on CPU launch with robustcl launch --cpu --deepspeed FILE",
        )
    return None


def _fix(processes: int, env: dict[str, str], cpu: bool | None = None) -> str:
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    command = suggested_command(processes, env, cpu)
    if cpu:
        return (
            f"run one gloo process group with: {command} (or ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
            f"--num_processes {processes} --num_machines 1 --mixed_precision no --dynamo_backend no -m robustcl ...)"
        )
    return f"run: {command}"


def suggested_command(processes: int, env: dict[str, str], cpu: bool) -> str:
    """The ``robustcl launch`` command that runs this process's own robustcl command on ``processes`` processes."""
    nodes = int(env["GROUP_WORLD_SIZE"]) if env.get("GROUP_WORLD_SIZE", "").isdigit() else 1
    flags = ["--cpu"] if cpu else []
    if nodes > 1 and processes % nodes == 0:
        host, port = env.get("MASTER_ADDR", "HOST"), env.get("MASTER_PORT", "PORT")
        rank = env.get("GROUP_RANK", "R")
        flags += ["--gpus", str(processes // nodes), "--nodes", str(nodes), "--node-rank", rank]
        flags += ["--main-address", f"{host}:{port}"]
    else:
        flags += ["--gpus", str(processes)]
    command = sys.argv[1:] or ["pretrain", "RECIPE"]
    return shlex.join(["robustcl", "launch", *flags, "--", *command])


def accelerate_num_processes(argv: list[str] | None) -> int | None:
    """``--num_processes`` of an ``accelerate launch`` command line (None when it is not one or does not say)."""
    if not argv:
        return None
    for i, arg in enumerate(argv):
        name = os.path.basename(arg)
        if name == "accelerate" or arg in ("accelerate.commands.launch", "accelerate.commands.accelerate_cli"):
            rest = argv[i + 1 :]
            break
        if arg.endswith(os.path.join("accelerate", "commands", "launch.py")):
            rest = argv[i + 1 :]
            break
    else:
        return None
    if rest[:1] == ["launch"]:
        rest = rest[1:]
    try:
        from accelerate.commands.config import default_config_file, load_config_from_file
        from accelerate.commands.launch import launch_command_parser

        args, _ = launch_command_parser().parse_known_args(rest)
        if args.num_processes is None and (args.config_file or os.path.isfile(default_config_file)):
            return load_config_from_file(args.config_file).num_processes  # what accelerate itself falls back on
    except (Exception, SystemExit):
        return None
    return args.num_processes


def _parent_argv() -> list[str] | None:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return None


def raise_on_every_process(accelerator: Accelerator, error: UserError | None) -> None:
    """Raise the main process's ``error`` (None: no error) on every process, so that a refusal decided there ends
    every process with the same message and exit code instead of leaving the others waiting in a collective."""
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        # Plain strings and ints between our own processes.
        message = [None if error is None else (str(error), error.exit_code)]
        broadcast_object_list(message, from_process=0)
        if message[0] is not None and error is None:
            error = UserError(message[0][0])
            error.exit_code = message[0][1]
    if error is not None:
        raise error


@contextmanager
def on_main_process(accelerator: Accelerator, context: Callable[[], AbstractContextManager]) -> Iterator[None]:
    """Enter ``context()`` (e.g. a folder lock) on the main process only, for the block; when entering it raises a
    :class:`UserError`, every process raises it."""
    with ExitStack() as stack:
        error = None
        if accelerator.is_main_process:
            try:
                stack.enter_context(context())
            except UserError as err:
                error = err
        raise_on_every_process(accelerator, error)
        yield


def processes_on_node(accelerator: Accelerator) -> int:
    """How many processes of the group share this machine (torchrun and accelerate export LOCAL_WORLD_SIZE)."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    return int(value) if value.isdigit() else accelerator.num_processes


def node_main_first(accelerator: Accelerator, work: Callable[[], T]) -> T:
    """``work()`` on each node's main process first, then on the others: dataset preparation (download, Arrow
    conversion) happens once per node and the others open the finished cache instead of racing to write it. A
    failure on a node's main process ends every process, with its message, instead of leaving them in a barrier."""
    if accelerator.num_processes == 1:
        return work()
    first = accelerator.is_local_main_process
    result: T | None = None
    error: Exception | None = None
    if first:
        try:
            result = work()
        except Exception as exc:  # noqa: BLE001 — re-raised below, after the others have heard of it
            error = exc
    reported = first_failure(error, "preparing the data")
    if error is not None:
        raise error
    if reported is not None:
        raise reported
    return result if first else work()


def first_failure(error: Exception | None, doing: str) -> Exception | None:
    """The first failure of any process of the default group (None: none failed), as every process raises it: a
    UserError as itself (message, exit code), anything else as a RuntimeError naming it. Every process must call
    this, failed or not: it is a collective."""
    import torch.distributed as dist

    summary = None
    if error is not None:
        summary = (str(error), error.exit_code if isinstance(error, UserError) else None, type(error).__name__)
    summaries: list = [None] * dist.get_world_size()
    dist.all_gather_object(summaries, summary)  # plain strings and ints between our own processes
    first = next((s for s in summaries if s is not None), None)
    if first is None:
        return None
    message, exit_code, kind = first
    if exit_code is None:
        return RuntimeError(f"another process failed {doing}: {kind}: {message}")
    failure = UserError(message)
    failure.exit_code = exit_code
    return failure


def end_process_group() -> None:
    """Tear the process group down once a command has finished its collectives. A process that exits with it alive
    can abort at interpreter shutdown ("terminate called without an active exception": gloo's worker threads are
    destroyed after the interpreter, pytorch/pytorch#190489). Only after success: a process that failed may leave
    the others inside a collective, where tearing down could wait for them."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
