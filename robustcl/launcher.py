"""``robustcl launch``: run a robustcl command on several processes or machines through Accelerate's launcher.

Accelerate is driven through its Python API (``launch_command_parser`` builds the arguments, ``launch_command``
starts the processes), with every setting given explicitly and the machine-local ``accelerate config`` file
ignored, so what runs is exactly the printed ``accelerate launch`` command. The modes:

- GPUs (the default): ``--multi_gpu`` when there is more than one process in total (NCCL), else a single process.
- ``--cpu``: one real gloo process group, ``ACCELERATE_USE_CPU=true`` + ``--multi_gpu``. Accelerate's own ``--cpu``
  flag starts a single process whatever ``--num_processes`` says, so it is used only for one process in total.
- ``--deepspeed FILE``: ``--use_deepspeed --deepspeed_config_file FILE`` and the ``standard`` (torchrun-like)
  multi-node launcher instead of pdsh/ssh. Never accelerate's CPU switch (``ACCELERATE_USE_CPU`` or ``--cpu``):
  it silently turns DeepSpeed off. With ``--cpu`` the GPUs are hidden instead and the trainer picks gloo.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from unittest import mock

from .errors import UserError

if TYPE_CHECKING:
    from typer.core import TyperCommand

MIXED_PRECISION = ("no", "bf16", "fp16")
# Set for the processes `robustcl launch` starts: the total it asked for, which robustcl.distributed checks.
LAUNCH_PROCESSES_VAR = "ROBUSTCL_LAUNCH_PROCESSES"
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class LaunchPlan:
    """One ``accelerate launch`` invocation: its arguments, the environment it needs, the processes it starts."""

    args: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    processes: int = 1

    def shell(self) -> str:
        """The equivalent shell command, quoted."""
        env = [f"{key}={shlex.quote(value)}" for key, value in self.env.items()]
        return " ".join([*env, shlex.join(["accelerate", "launch", *self.args])])


def parse_main_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[IPv6]:PORT`` too) → (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(
            f"--main-address must be HOST:PORT with a port number, got {text!r}",
            "--main-address",
            "give the address of the node with --node-rank 0 and a free port, e.g. --main-address 10.0.0.1:29500",
        )
    return host, int(port)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def plan_launch(
    command: list[str],
    *,
    gpus: int,
    nodes: int = 1,
    node_rank: int | None = None,
    main_address: str | None = None,
    deepspeed: Path | None = None,
    cpu: bool = False,
    mixed_precision: str = "no",
    known_commands: tuple[str, ...] = (),
) -> LaunchPlan:
    """Check the options and build the ``accelerate launch`` arguments; raises UserError on a mistake."""
    _check_command(command, known_commands)
    _check_sizes(gpus, nodes, mixed_precision)
    rank = _node_rank(nodes, node_rank, main_address)
    address = parse_main_address(main_address) if main_address is not None else None
    if deepspeed is not None:
        _check_deepspeed_config(deepspeed)

    total = gpus * nodes
    args, env = _backend(total, gpus, deepspeed, cpu)
    args += ["--num_processes", str(total), "--num_machines", str(nodes)]
    args += ["--num_cpu_threads_per_process", str(threads_per_process(gpus, cpu))]
    args += ["--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    if address is not None:
        args += ["--machine_rank", str(rank), "--main_process_ip", address[0], "--main_process_port", str(address[1])]
    args += ["-m", "robustcl", *command]
    return LaunchPlan(tuple(args), env, total)


def _check_command(command: list[str], known_commands: tuple[str, ...]) -> None:
    """A robustcl command to launch, one of ``known_commands`` when they are given."""
    if not command:
        raise UserError(
            "nothing to launch",
            "robustcl launch",
            "name the robustcl command after --, e.g. robustcl launch --gpus 8 -- pretrain recipes/acl.yaml",
        )
    if known_commands and command[0] not in known_commands:
        raise UserError(
            f"{command[0]!r} is not a robustcl command",
            "robustcl launch -- COMMAND",
            f"use one of {', '.join(known_commands)}, e.g. robustcl launch --gpus 8 -- pretrain recipes/acl.yaml",
        )


def _check_sizes(gpus: int, nodes: int, mixed_precision: str) -> None:
    """At least one process per node and one node; a precision Accelerate knows."""
    if gpus < 1 or nodes < 1:
        raise UserError("--gpus and --nodes must be at least 1", "robustcl launch", "e.g. --gpus 8 --nodes 2")
    if mixed_precision not in MIXED_PRECISION:
        raise UserError(f"unknown mixed precision {mixed_precision!r}", "--mixed-precision", "use no, bf16 or fp16")


def _node_rank(nodes: int, node_rank: int | None, main_address: str | None) -> int:
    """This node's rank, checked; several nodes need it and the first node's address."""
    if nodes > 1 and main_address is None:
        raise UserError(
            f"--nodes {nodes} needs the address of the first node",
            "--main-address",
            "add --main-address HOST:PORT (the node with --node-rank 0 and a free port), the same on every node",
        )
    if nodes > 1 and node_rank is None:
        raise UserError(
            f"--nodes {nodes} needs the rank of this node",
            "--node-rank",
            f"add --node-rank R, 0 on the first node … {nodes - 1} on the last (under SLURM: $SLURM_NODEID)",
        )
    rank = node_rank or 0
    if not 0 <= rank < nodes:
        raise UserError(
            f"--node-rank {rank} is out of range for --nodes {nodes}",
            "--node-rank",
            f"use 0 … {nodes - 1}, a different value on each node" if nodes > 1 else "drop --node-rank (one node)",
        )
    return rank


def _backend(total: int, gpus: int, deepspeed: Path | None, cpu: bool) -> tuple[list[str], dict[str, str]]:
    """The launcher's arguments and environment that choose DeepSpeed, several processes or one, on GPUs or the CPU."""
    args: list[str] = []
    env: dict[str, str] = {}
    if deepspeed is not None:
        # Accelerate's CPU switch turns DeepSpeed off without a word: never set it; hide the GPUs for --cpu.
        args += ["--use_deepspeed", "--deepspeed_config_file", str(deepspeed)]
        args += ["--deepspeed_multinode_launcher", "standard"]
        if cpu:  # and the DeepSpeed path ignores --num_cpu_threads_per_process (torchrun would set 1)
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["OMP_NUM_THREADS"] = str(threads_per_process(gpus, cpu))
        if _env_flag("ACCELERATE_USE_CPU"):
            env["ACCELERATE_USE_CPU"] = "false"
    elif total > 1:
        args.append("--multi_gpu")
        if cpu:
            env["ACCELERATE_USE_CPU"] = "true"
        elif _env_flag("ACCELERATE_USE_CPU"):
            env["ACCELERATE_USE_CPU"] = "false"
    elif cpu:
        args.append("--cpu")  # one process: the simple launcher, which sets ACCELERATE_USE_CPU from this flag
    return args, env


def threads_per_process(processes_per_node: int, cpu: bool) -> int:
    """OMP_NUM_THREADS for each process: the environment's when set; on CPU the cores this process may use
    (physical ones) shared between the node's processes; with GPUs 1 (torchrun's and accelerate's default)."""
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    if not cpu:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        import psutil

        cores = min(cores, psutil.cpu_count(logical=False) or cores)
    except ImportError:
        pass
    return max(1, cores // processes_per_node)


def _check_deepspeed_config(path: Path) -> None:
    if not path.is_file():
        raise UserError(
            "DeepSpeed config file not found",
            str(path),
            "pass an existing DeepSpeed JSON, e.g. --deepspeed launch/zero2.json from the repository root",
        )
    try:
        json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(
            f"DeepSpeed config is not valid JSON ({err})",
            str(path),
            "pass a DeepSpeed JSON such as launch/zero2.json (accelerate YAMLs go to accelerate launch --config_file)",
        ) from None


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_hardware(plan_gpus: int, cpu: bool, deepspeed: Path | None) -> None:
    """Before a real launch: enough GPUs on this node (unless --cpu), DeepSpeed importable when asked for."""
    if not cpu:
        have = visible_gpus()
        if have < plan_gpus:
            raise UserError(
                f"--gpus {plan_gpus} but this machine has {have} visible GPU(s)",
                "--gpus",
                f"use --gpus {have}" if have else "add --cpu to run the processes on the CPU (gloo)",
            )
    if deepspeed is not None:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise UserError("DeepSpeed is not installed", "--deepspeed", "pip install deepspeed, or drop --deepspeed")


def check_pretrain_batch(command: list[str], processes: int, pretrain: TyperCommand) -> None:
    """Before a real launch of ``pretrain``: the recipe's global batch must split over the processes, checked as the
    trainer checks it (:func:`robustcl.data.batches.plan_batches`). Only the launcher knows the process count before the
    processes start; without this each of them would start, load the data and stop with the same error."""
    if not command or command[0] != "pretrain":
        return
    try:
        with pretrain.make_context("pretrain", list(command[1:]), resilient_parsing=True) as ctx:
            recipe_file, overrides = ctx.params.get("recipe"), ctx.params.get("set_")
    except Exception:  # a command-line mistake: the command itself reports it
        return
    if recipe_file is None:
        return
    from .data.batches import plan_batches
    from .recipe import load_recipe

    try:
        recipe = load_recipe(recipe_file, overrides)
    except UserError:
        return  # a recipe mistake needs no process count: the command reports it, once, from the main process
    plan_batches(recipe.training, processes)


def run_launch(plan: LaunchPlan) -> int:
    """Start the processes through Accelerate's Python API; return the job's exit code."""
    from accelerate.commands import launch as accelerate_launch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = accelerate_launch.launch_command_parser().parse_args(list(plan.args))
    # Accelerate fills every setting not given on its command line from ~/.cache/huggingface/accelerate's
    # default_config.yaml when that file exists: all are given here, and the file is hidden from it.
    env = {**plan.env, LAUNCH_PROCESSES_VAR: str(plan.processes)}
    with mock.patch.dict(os.environ, env), mock.patch.object(accelerate_launch, "default_config_file", ""):
        try:
            accelerate_launch.launch_command(args)
        except subprocess.CalledProcessError as err:
            return _report_failure(_exit_code(err.returncode), None, plan.processes)
        except ChildFailedError as err:
            rank, failure = err.get_first_failure()
            return _report_failure(_exit_code(failure.exitcode), rank, plan.processes)
        except SignalException as err:  # Ctrl-C / scancel: torchrun stopped the processes
            return _report_failure(128 + int(err.sigval), None, plan.processes)
        except KeyboardInterrupt:
            return _report_failure(130, None, plan.processes)
        except ConnectionError as err:  # the first node's port is taken
            raise UserError(str(err).split(". ")[0], "--main-address", "choose another free port") from None
    return 0


def default_accelerate_config() -> Path | None:
    """The machine-local ``accelerate config`` file, which ``robustcl launch`` does not use."""
    from accelerate.commands.config import default_config_file

    return Path(default_config_file) if os.path.isfile(default_config_file) else None


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else (code or 1)  # killed by signal N → 128+N, as a shell reports it


def _report_failure(code: int, rank: int | None, processes: int) -> int:
    where = f"process {rank} of {processes}" if rank is not None else "the job"
    print(f"robustcl: launch: {where} exited with code {code}", file=sys.stderr)
    return code
