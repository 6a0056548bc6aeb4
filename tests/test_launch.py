"""`robustcl launch` and launch/: the accelerate command it builds and refuses to build, the shipped configs and
scripts, the world-size guard (accelerate's silent single-process mode), and real multi-process CPU runs: one gloo
group of 2, and 2 "machines" on loopback."""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import BIN, REPO, cli_env, with_sets

from robustcl import cli

LAUNCH = REPO / "launch"
TINY = with_sets(
    "training.max_steps=2", "training.batch_size=16", "eval.after_pretrain=false", "model.widths=[8,16,32,64]"
)
PREFIX = "robustcl: launching: "


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """The real console entry point in this process: (exit code, stdout, stderr)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the thread count robustcl launch passes on
    for var in ("RANK", "ACCELERATE_USE_CPU", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["robustcl", *args])
        with pytest.raises(SystemExit) as exited:
            cli.main()
        out = capsys.readouterr()
        return exited.value.code or 0, out.out, out.err

    return run


def _accelerate_args(printed: str):
    """Parse a printed command with accelerate's own parser: (environment assignments, namespace)."""
    from accelerate.commands.launch import launch_command_parser

    assert printed.startswith(PREFIX), printed
    words = shlex.split(printed.removeprefix(PREFIX))
    env = {}
    while "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[:2] == ["accelerate", "launch"]
    return env, launch_command_parser().parse_args(words[2:])


FIXED = "--mixed_precision no --dynamo_backend no -m robustcl"


@pytest.mark.parametrize(
    "flags, processes, expected",
    [
        (
            "--cpu --gpus 2",
            2,
            "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 "
            f"--num_cpu_threads_per_process 1 {FIXED}",
        ),
        (
            "--gpus 8 --nodes 2 --node-rank 1 --main-address 10.0.0.1:29500",
            16,
            "accelerate launch --multi_gpu --num_processes 16 --num_machines 2 --num_cpu_threads_per_process 1 "
            "--mixed_precision no --dynamo_backend no --machine_rank 1 --main_process_ip 10.0.0.1 "
            "--main_process_port 29500 -m robustcl",
        ),
        (
            "--gpus 8 --deepspeed launch/zero2.json --mixed-precision bf16",
            8,
            "accelerate launch --use_deepspeed --deepspeed_config_file launch/zero2.json "
            "--deepspeed_multinode_launcher standard --num_processes 8 --num_machines 1 "
            "--num_cpu_threads_per_process 1 --mixed_precision bf16 --dynamo_backend no -m robustcl",
        ),
        (  # DeepSpeed on CPU: never accelerate's CPU switch (it turns DeepSpeed off); the GPUs are hidden instead
            "--cpu --gpus 2 --deepspeed launch/zero2.json",
            2,
            "CUDA_VISIBLE_DEVICES='' OMP_NUM_THREADS=1 accelerate launch --use_deepspeed --deepspeed_config_file "
            "launch/zero2.json --deepspeed_multinode_launcher standard --num_processes 2 --num_machines 1 "
            f"--num_cpu_threads_per_process 1 {FIXED}",
        ),
        (
            "--cpu",
            1,
            f"accelerate launch --cpu --num_processes 1 --num_machines 1 --num_cpu_threads_per_process 1 {FIXED}",
        ),
    ],
    ids=["cpu-2", "2-nodes", "deepspeed", "deepspeed-cpu", "cpu-1"],
)
def test_dry_run_prints_the_accelerate_command(run_cli, flags, processes, expected):
    command = ["pretrain", "recipes/acl.yaml", "--set", "model.widths=[8, 16, 32, 64]", "-o", "runs/my run"]
    code, out, err = run_cli("launch", "--dry-run", *flags.split(), "--", *command)
    assert code == 0, err
    assert out == f"{PREFIX}{expected} {shlex.join(command)}\n"
    # What is printed is a valid accelerate command that names the same processes.
    env, args = _accelerate_args(out.strip())
    assert args.module and args.training_script == "robustcl" and args.training_script_args == command
    assert args.num_processes == processes
    assert not args.cpu or args.num_processes == 1  # accelerate's --cpu starts a single process
    assert args.use_deepspeed == ("--deepspeed" in flags)
    assert ("ACCELERATE_USE_CPU" in env) == (flags == "--cpu --gpus 2")


def test_without_a_separator_the_command_starts_at_the_first_word(run_cli):
    code, out, _ = run_cli("launch", "--dry-run", "--cpu", "--gpus", "2", "pretrain", "r.yaml", "--set", "a=1")
    assert code == 0 and out.rstrip().endswith("-m robustcl pretrain r.yaml --set a=1")


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            "--gpus 8 --nodes 2 --node-rank 2 --main-address 10.0.0.1:29500 -- pretrain r.yaml",
            "--node-rank 2 is out of range for --nodes 2 (--node-rank) — use 0 … 1",
        ),
        (
            "--gpus 8 --nodes 2 --node-rank 1 --main-address 10.0.0.1 -- pretrain r.yaml",
            "--main-address must be HOST:PORT with a port number, got '10.0.0.1'",
        ),
        ("--gpus 8 --nodes 2 --node-rank 1 -- pretrain r.yaml", "--nodes 2 needs the address of the first node"),
        ("--gpus 8 --nodes 2 --main-address h:29500 -- pretrain r.yaml", "--nodes 2 needs the rank of this node"),
        ("--gpus 8 --deepspeed launch/missing.json -- pretrain r.yaml", "DeepSpeed config file not found"),
        ("--gpus 8 --deepspeed launch/zero2.yaml -- pretrain r.yaml", "DeepSpeed config is not valid JSON"),
        ("--gpus 8 --mixed-precision fp8 -- pretrain r.yaml", "unknown mixed precision 'fp8'"),
        ("--gpus 8 -- pretrian r.yaml", "'pretrian' is not a robustcl command"),
        ("--gpus 8", "nothing to launch"),
    ],
    ids=["node-rank", "port", "no-address", "no-rank", "no-ds-file", "ds-not-json", "precision", "typo", "empty"],
)
def test_mistakes_exit_2_with_one_line(run_cli, flags, message):
    code, out, err = run_cli("launch", "--dry-run", *flags.split())
    assert code == 2 and out == ""
    assert err.startswith("robustcl: error: ") and err.count("\n") == 1 and message in err, err
    if "deepspeed" in flags:
        assert flags.split()[3] in err  # names the file


def test_the_jobs_exit_code_without_a_traceback(run_cli, monkeypatch):
    from accelerate.commands import launch as accelerate_launch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def fail(args):
        assert args.multi_gpu and args.num_processes == 2 and args.training_script_args == ["pretrain", "r.yaml"]
        failure = ProcessFailure(local_rank=1, pid=1, exitcode=3, error_file="/nonexistent")
        raise ChildFailedError("robustcl", {1: failure})

    monkeypatch.setattr(accelerate_launch, "launch_command", fail)
    code, _, err = run_cli("launch", "--cpu", "--gpus", "2", "--", "pretrain", "r.yaml")
    assert code == 3 and "Traceback" not in err
    assert err.splitlines()[-1] == "robustcl: launch: process 1 of 2 exited with code 3"

    def fail_single(args):
        raise subprocess.CalledProcessError(-9, ["python"])  # killed by SIGKILL

    monkeypatch.setattr(accelerate_launch, "launch_command", fail_single)
    assert run_cli("launch", "--cpu", "--", "pretrain", "r.yaml")[0] == 128 + 9


def test_a_machine_local_accelerate_config_is_not_mixed_in(run_cli, monkeypatch, tmp_path):
    """Accelerate fills every setting its command line leaves out from ~/.cache/.../default_config.yaml."""
    import accelerate.commands.config as accelerate_config
    from accelerate.commands import launch as accelerate_launch

    local = tmp_path / "default_config.yaml"
    local.write_text(
        "distributed_type: MULTI_GPU\nnum_processes: 8\ngpu_ids: '0,1'\nmixed_precision: fp16\n"
        "main_training_function: main\ndeepspeed_config:\n  zero_stage: 3\n"
    )
    monkeypatch.setattr(accelerate_launch, "default_config_file", str(local))
    monkeypatch.setattr(accelerate_config, "default_config_file", str(local))
    validated = []
    monkeypatch.setattr(
        accelerate_launch,
        "launch_command",
        lambda args: validated.append(accelerate_launch._validate_launch_command(args)),
    )
    code, _, err = run_cli("launch", "--cpu", "--gpus", "2", "--", "pretrain", "r.yaml")
    assert code == 0 and f"robustcl: note: not using {local}" in err
    args, defaults, _ = validated[0]
    assert defaults is None and args.gpu_ids is None and args.zero_stage is None
    assert (args.num_processes, args.mixed_precision, args.multi_gpu) == (2, "no", True)


def test_every_launch_file_loads():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    configs = {p.name: load_config_from_file(str(p)) for p in sorted(LAUNCH.glob("*.yaml"))}
    assert set(configs) == {"1gpu.yaml", "1node-8gpus.yaml", "2nodes-8gpus.yaml", "zero2.yaml"}
    assert all(isinstance(c, ClusterConfig) for c in configs.values())
    assert (configs["1node-8gpus.yaml"].num_processes, configs["1node-8gpus.yaml"].mixed_precision) == (8, "bf16")
    assert (configs["2nodes-8gpus.yaml"].num_processes, configs["2nodes-8gpus.yaml"].num_machines) == (16, 2)
    ds = configs["zero2.yaml"].deepspeed_config
    assert (REPO / ds["deepspeed_config_file"]).is_file() and ds["deepspeed_multinode_launcher"] == "standard"
    for name, stage in [("zero1.json", 1), ("zero2.json", 2), ("zero3.json", 3)]:
        config = json.loads((LAUNCH / name).read_text())
        assert config["zero_optimization"]["stage"] == stage
        assert config["train_micro_batch_size_per_gpu"] == "auto" and "optimizer" not in config
    for script in ("slurm.sbatch", "torchrun.sh"):
        res = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    assert "robustcl launch" in (LAUNCH / "slurm.sbatch").read_text()
    assert "-m robustcl pretrain" in (LAUNCH / "torchrun.sh").read_text()


ACCELERATE_CPU_2 = ["python", "/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "robustcl"]
SIMPLE_LAUNCHER = {"ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_USE_CPU": "True", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(
    "got, env, parent, message",
    [
        (1, {}, None, None),  # robustcl pretrain / python -m robustcl
        (2, {"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, None, None),  # torchrun, accelerate --multi_gpu: one group
        (1, {"WORLD_SIZE": "2"}, None, "WORLD_SIZE=2) but this one is in a process group of 1"),
        (1, SIMPLE_LAUNCHER, ACCELERATE_CPU_2, "accelerate launch was asked for 2 processes but started 1"),
        (1, SIMPLE_LAUNCHER, ["bash"], "asked for several processes"),  # the launcher's command line unknown
        (1, SIMPLE_LAUNCHER, ["python", "/venv/bin/accelerate", "launch", "--num_processes", "1", "x.py"], None),
        (1, {**SIMPLE_LAUNCHER, "ROBUSTCL_LAUNCH_PROCESSES": "1"}, ["bash"], None),  # robustcl launch --gpus 1
        (1, {"ROBUSTCL_LAUNCH_PROCESSES": "2"}, None, "robustcl launch asked for 2 processes"),
        (1, {"PMI_SIZE": "2"}, None, "PMI_SIZE=2"),  # mpirun / srun tasks that are not one group
    ],
    ids=["plain", "torchrun", "independent", "cpu-flag", "cpu-flag-no-argv", "one", "robustcl-1", "robustcl", "mpi"],
)
def test_world_size_guard(got, env, parent, message):
    from accelerate.utils import DistributedType

    from robustcl.distributed import launch_problem

    kind = DistributedType.MULTI_CPU if got > 1 else DistributedType.NO
    problem = launch_problem(got, kind, env, parent_argv=parent or [])
    if message is None:
        assert problem is None
    else:
        assert problem is not None and message in problem[0]
        assert "robustcl launch --cpu --gpus 2 -- " in problem[2] or "robustcl launch --gpus 2 -- " in problem[2]


def test_world_size_guard_catches_dropped_deepspeed():
    from accelerate.utils import DistributedType

    from robustcl.distributed import launch_problem

    env = {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}
    assert launch_problem(2, DistributedType.DEEPSPEED, env) is None
    problem = launch_problem(2, DistributedType.MULTI_CPU, env)
    assert problem is not None and "asked for DeepSpeed but the processes run MULTI_CPU" in problem[0]


def _pretrain_args(run_dir: Path) -> list[str]:
    return ["pretrain", str(REPO / "recipes" / "quickstart.yaml"), *TINY, "--output-dir", str(run_dir)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Jobs:
    """Real launches started together: each is CPU-bound (~8 s of imports per process) on a 2-core machine, so they
    finish in about half the time of one after the other. ``result(name)`` waits for one."""

    def __init__(self, root: Path) -> None:
        self.root, self.procs, self.done = root, {}, {}

    def start(self, name: str, cmd: list[str], cwd: Path = REPO) -> None:
        log = (self.root / f"{name}.out").open("w"), (self.root / f"{name}.err").open("w")
        self.procs[name] = subprocess.Popen(cmd, cwd=cwd, env=cli_env(), stdout=log[0], stderr=log[1], text=True)

    def result(self, name: str) -> tuple[int, str, str]:
        if name not in self.done:
            code = self.procs[name].wait(timeout=300)
            out, err = ((self.root / f"{name}.{kind}").read_text() for kind in ("out", "err"))
            self.done[name] = code, out, err
        return self.done[name]

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("launches")
    jobs = Jobs(root)
    gloo_flags = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    # accelerate's silent mode: --cpu with 2 processes starts one.
    jobs.start(
        "silent",
        [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "2", *gloo_flags, "-m", "robustcl"]
        + _pretrain_args(root / "silent"),
    )
    # One gloo group of 2, started from outside the repository.
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    robustcl_launch = [str(BIN / "robustcl"), "launch", "--cpu"]
    jobs.start("cpu2", [*robustcl_launch, "--gpus", "2", "--", *_pretrain_args(root / "cpu2")], cwd=elsewhere)
    # Two "machines" (one process each) on loopback, sharing the run directory as a cluster filesystem would.
    address = f"127.0.0.1:{_free_port()}"
    for rank in (0, 1):
        jobs.start(
            f"node{rank}",
            [*robustcl_launch, "--gpus", "1", "--nodes", "2", "--node-rank", str(rank), "--main-address", address]
            + ["--", *_pretrain_args(root / "nodes")],
        )
    yield jobs
    jobs.stop()


def _checkpoint_processes(run: Path) -> int:
    (checkpoint,) = (run / "checkpoints").iterdir()  # the last one; no temporary folder left
    assert checkpoint.name == "step-00000002" and (checkpoint / "COMPLETE").exists()
    return len(list(checkpoint.glob("random_states_*.pkl")))


@pytest.mark.slow
def test_guard_stops_accelerates_silent_single_process(jobs):
    """`accelerate launch --cpu --num_processes 2` starts one process: refused before anything is written."""
    code, _, err = jobs.result("silent")
    assert code != 0
    assert "robustcl: error: accelerate launch was asked for 2 processes but started 1" in err, err[-3000:]
    assert "robustcl launch --cpu --gpus 2 -- pretrain" in err
    assert not (jobs.root / "silent").exists()


@pytest.mark.slow
def test_two_cpu_processes_from_another_directory(jobs):
    code, _, err = jobs.result("cpu2")
    assert code == 0, err[-3000:]
    assert f"{PREFIX}ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 " in err
    assert _checkpoint_processes(jobs.root / "cpu2") == 2


@pytest.mark.slow
def test_two_machines_on_loopback(jobs):
    """Two `robustcl launch --nodes 2` (one process each) on one host, sharing the run directory."""
    results = [jobs.result(f"node{rank}") for rank in (0, 1)]
    for code, _, err in results:
        assert code == 0, err[-3000:]
    run = jobs.root / "nodes"
    assert _checkpoint_processes(run) == 2
    # Only the main process writes the run's files: nothing beyond one run's.
    assert {p.name for p in run.iterdir()} == {
        "checkpoints",
        "data_fingerprint.json",
        "encoder",
        "metrics.jsonl",
        "recipe.yaml",
        "summary.json",
    }
    assert "robustcl: trained 2 steps" in results[0][1] and "robustcl: trained" not in results[1][1]
