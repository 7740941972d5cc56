"""The cluster path for real: the commands users run on a supercomputer, on a local Slurm.

The ``slurm_cluster`` fixture (tests/conftest_slurm.py) brings up slurmctld + 2 slurmd nodes
with tools/local_slurm.sh. Against it: the preprocess launcher's submitit job array (ids,
throttle, one failed task retried and nothing else redone), the plain-sbatch array script,
training that is signalled midway, checkpoints, requeues itself and ends with exactly the
weights of an uninterrupted run, multi-node training (slurm/train_8node.sh, and
launchers/train.py --slurm through submitit) with one CPU rank per node, Megatron TP=2 over
gloo, and the whole pipeline (preprocess -> train -> eval -> collect) chained by afterok,
then an eval array that redoes only a lost prediction shard.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
import torch
from conftest import script_module
from safetensors.torch import load_file

from evr1.config import Config, dump_config, load_config
from evr1.data.synthetic import make_synthetic
from evr1.models.loading import ensure_model
from evr1.pipeline import rendezvous, stages
from evr1.pipeline.executor import dependency
from evr1.pipeline.preemption import PreemptionWatcher
from evr1.train import checkpoint as ckpt
from evr1.video.shards import MANIFEST, TaskFiles

ROOT = Path(__file__).resolve().parents[1]
# Slurm's own limits on a job the tests submit, so a hang fails a test instead of CI.
JOB_TIMEOUT_S = 240
# The sbatch scripts ask for real-cluster resources; the local nodes have 2 CPUs each.
SMALL_JOB = ["--cpus-per-task=1", "--mem=2G", "--time=10"]


# --------------------------------------------------------------------------- set-up


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Synthetic data (with two broken files), a tiny model and a reference set of shards made
    by the local, in-process preprocess: what every Slurm path must reproduce."""
    root = tmp_path_factory.mktemp("slurm")
    cfg = small_config(root, root / "reference")
    make_synthetic(cfg.synthetic, progress=False)
    ensure_model(cfg)  # built once here: jobs running side by side must not race to build it
    assert stages.preprocess_sequential(cfg) == 0
    return root


def small_config(root: Path, run_dir: Path, *overrides: str) -> Config:
    """The demo config made small (as in tests/test_train.py), on the data under ``root``."""
    return load_config(ROOT / "configs/demo_cpu.yaml", [
        f"run_dir={run_dir}", f"synthetic.out_dir={root / 'data'}", "synthetic.num_videos=6",
        "synthetic.include_real_videos=false", "synthetic.include_corrupt=true",
        f"data.train_jsonl={root / 'data/train.jsonl'}",
        f"data.eval_jsonl={root / 'data/heldout.jsonl'}",
        f"model.path={root / 'tiny_model'}", "preprocess.num_tasks=2",
        "rollout.n=4", "rollout.max_new_tokens=8", "train.prompts_per_step=2",
        "train.micro_batch_size=3", "train.eval_samples=2", "train.wandb_mode=disabled",
        "launch.cpus_per_task=1", "launch.mem_gb=2", "launch.time_min=10",
        # One thread per job: torch would otherwise start one per core of the whole machine.
        "launch.setup=[export OMP_NUM_THREADS=1]", *overrides])


def write_config(cfg: Config, path: Path) -> Path:
    dump_config(cfg, path)
    return path


def assert_same_shards(shard_dir: Path, root: Path) -> None:
    """The shards hold exactly the reference's samples, frames and attributes, and the
    manifests agree except for the shard files' checksums: HDF5 may lay the same content out
    in different bytes (seen once in CI, with every dataset and attribute equal)."""
    import h5py
    import numpy as np

    reference = root / "reference/shards"
    ours, theirs = (json.loads((d / MANIFEST).read_text()) for d in (shard_dir, reference))
    for manifest in (ours, theirs):
        for shard in manifest["shards"]:
            shard.pop("shard_sha256")
    assert ours == theirs

    def items(folder: Path) -> dict:
        out = {}
        for path in sorted(folder.glob("*.h5")):
            with h5py.File(path) as f:
                f.visititems(lambda name, obj, p=path: out.__setitem__(
                    (p.name, name), (obj[()] if isinstance(obj, h5py.Dataset) else None,
                                     dict(obj.attrs))))
        return out

    mine, ref = items(shard_dir), items(reference)
    assert mine.keys() == ref.keys()
    for key, (data, attrs) in ref.items():
        assert np.array_equal(mine[key][0], data) if data is not None else mine[key][0] is None
        assert mine[key][1].keys() == attrs.keys()
        assert all(np.array_equal(mine[key][1][k], v) for k, v in attrs.items()), key


# --------------------------------------------------------------------------- Slurm helpers


def run(cmd: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          **kwargs)


def sbatch(*args: str) -> str:
    out = run(["sbatch", "--parsable", *args])
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job_records(job_id: str) -> list[dict[str, str]]:
    """``scontrol show job`` as dicts, one per job (an array gives one per task)."""
    out = run(["scontrol", "show", "job", "-o", job_id])
    assert out.returncode == 0, out.stderr
    return [dict(field.split("=", 1) for field in line.split() if "=" in field)
            for line in out.stdout.splitlines() if line.strip()]


def job_record(job_id: str) -> dict[str, str]:
    [record] = job_records(job_id)
    return record


def wait_for_jobs(job_ids: list[str], timeout: float = JOB_TIMEOUT_S) -> None:
    """Until none of the jobs is pending or running (a requeued job counts as pending)."""
    deadline = time.monotonic() + timeout
    while True:
        # Every task of an array has its own record (and state): check them all.
        states = {f"{j}/{r.get('ArrayTaskId', '')}": r["JobState"]
                  for j in job_ids for r in job_records(j)}
        if not {"PENDING", "RUNNING", "COMPLETING", "REQUEUED", "CONFIGURING"} & set(
                states.values()):
            return
        assert time.monotonic() < deadline, f"jobs still not finished: {states}"
        time.sleep(0.5)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def need_two_nodes(cluster) -> None:
    if len(cluster.nodes) < 2:  # a cluster started by hand with --nodes 1
        pytest.skip(f"needs 2 Slurm nodes, the running cluster has {cluster.nodes}: "
                    "tools/local_slurm.sh start --nodes 2")


def slurm_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


# --------------------------------------------------------------------------- tests without Slurm


def test_dependency_names_whole_arrays():
    assert dependency([]) == ""
    assert dependency(["12_0", "12_1", "9"]) == "afterok:9:12"


def test_signal_sets_the_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionWatcher() as watcher:
        assert not watcher.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_until(lambda: watcher.received is not None, 5, "the signal handler")
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal does not change the reason
        assert watcher.requested and watcher.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == before


def test_rendezvous_from_slurm_variables():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
           "SLURM_JOB_ID": "123", "SLURM_JOB_NODELIST": "g[01-02]", "EVR1_MASTER_ADDR": "10.0.0.7"}
    assert rendezvous.export_from_slurm(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("5", "1", "8")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.7", "20123")
    # What a launcher (torchrun, the sbatch script) already set is kept.
    preset = {"SLURM_PROCID": "0", "RANK": "3", "MASTER_ADDR": "h"}
    assert not rendezvous.export_from_slurm(preset) and preset["RANK"] == "3"
    assert not rendezvous.export_from_slurm({})  # not a Slurm task


@pytest.mark.slow
def test_pipeline_runs_locally_without_slurm(prepared, tmp_path):
    cfg = small_config(prepared, tmp_path / "run", "launch.cluster=local", "train.steps=1")
    out = run([sys.executable, "launchers/pipeline.py", "--stages", "preprocess,train", "--config",
               str(write_config(cfg, tmp_path / "c.yaml"))], timeout=300,
              env={**os.environ, "OMP_NUM_THREADS": "1"})  # as the Slurm jobs here
    assert out.returncode == 0, out.stdout + out.stderr
    assert "preprocess: local array" in out.stdout
    assert_same_shards(cfg.shard_dir, prepared)
    assert ckpt.latest_checkpoint(cfg.checkpoint_dir).name == "step-00000001"


@pytest.mark.slow
def test_collect_job_fails_while_a_shard_is_missing(prepared, tmp_path):
    """The pipeline's collect job body: missing predictions end the job FAILED, not COMPLETED."""
    cfg = small_config(prepared, tmp_path / "run", "launch.cluster=local",
                       f"eval.models=[{prepared / 'tiny_model'}]", "eval.num_shards=2")
    with pytest.raises(RuntimeError, match="results are incomplete"):
        stages.collect_job(cfg)
    assert (tmp_path / "run/eval/results.json").is_file()  # the partial report is still written


# --------------------------------------------------------------------------- on the cluster


@pytest.mark.slurm
def test_preprocess_array_retries_only_the_failed_task(slurm_cluster, prepared, tmp_path):
    cfg = small_config(prepared, tmp_path / "run", "launch.cluster=slurm",
                       "launch.array_parallelism=1", "launch.max_retries=1")
    # A folder where task 1's shard must go: its first attempt fails (it cannot replace it)
    # and the test removes it before the resubmitted task starts.
    obstacle = TaskFiles.of(cfg.shard_dir, 1, 2).shard
    obstacle.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "launchers/preprocess.py", "--array", "--config",
                             str(write_config(cfg, tmp_path / "c.yaml"))], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # submitit's result file of array index 1 of the first array (the retry is an array of
        # one task): it exists once that attempt has failed, before the launcher resubmits.
        folder = cfg.submitit_dir / "preprocess"
        wait_until(lambda: any(folder.glob("*_1_0_result.pkl")), JOB_TIMEOUT_S,
                   "task 1's first attempt to fail")
        obstacle.rmdir()
        out, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    printed = re.search(r"preprocess: slurm array, job ids (.*)", out)
    assert printed, out
    ids = printed.group(1).split()
    # An array of two tasks (Slurm array task ids), then task 1 alone in a new job (submitit
    # submits a one-task array as a plain job).
    assert len(ids) == 3 and all(re.fullmatch(r"\d+_\d+", i) for i in ids[:2]), ids
    first, retry = ids[0].split("_")[0], ids[2].split("_")[0]
    assert ids[1] == f"{first}_1" and retry != first
    assert "retrying tasks [1]" in out
    wait_for_jobs([first, retry])  # the launcher returns on results; the jobs end just after
    states = {r["JobId"]: r["JobState"] for j in (first, retry) for r in job_records(j)}
    assert sorted(states.values()) == ["COMPLETED", "COMPLETED", "FAILED"], states
    # The % throttle reached sbatch: Slurm records it, and the two tasks never overlapped.
    tasks = job_records(first)
    assert {t["ArrayTaskThrottle"] for t in tasks} == {"1"}
    (a, b) = sorted(tasks, key=lambda t: t["StartTime"])
    assert slurm_time(b["StartTime"]) >= slurm_time(a["EndTime"])
    assert "#SBATCH --array=0-1%1" in (folder / f"{first}_submission.sh").read_text()
    assert_same_shards(cfg.shard_dir, prepared)


@pytest.mark.slurm
def test_plain_sbatch_array_gives_the_same_manifest(slurm_cluster, prepared, tmp_path):
    cfg = small_config(prepared, tmp_path / "run")
    config = write_config(cfg, tmp_path / "c.yaml")
    # (not sbatch --wait: it polls with growing intervals, up to tens of seconds)
    array = sbatch("--array=0-1", *SMALL_JOB, f"--output={tmp_path}/%A_%a.out",
                   "slurm/preprocess.sh", str(config))
    wait_for_jobs([array])
    logs = "".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert [t["JobState"] for t in job_records(array)] == ["COMPLETED"] * 2, logs
    assert_same_shards(cfg.shard_dir, prepared)


@pytest.mark.slurm
def test_signalled_training_requeues_and_matches_an_uninterrupted_run(slurm_cluster, prepared,
                                                                     tmp_path):
    steps = 40
    common = [f"train.steps={steps}", "train.save_every=1000", "train.offline.mode=always",
              f"preprocess.out_dir={prepared / 'reference/shards'}"]
    jobs = {}
    for name in ("straight", "signalled"):
        cfg = small_config(prepared, tmp_path / name, *common)
        jobs[name] = sbatch(*SMALL_JOB, f"--output={tmp_path}/{name}.out", "slurm/train.sh",
                            str(write_config(cfg, tmp_path / f"{name}.yaml")))
    metrics = tmp_path / "signalled/metrics.jsonl"

    def train_steps() -> list[int]:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return [json.loads(x)["step"] for x in lines if '"kind": "train"' in x]

    wait_until(lambda: len(train_steps()) >= 3, JOB_TIMEOUT_S, "the first training steps")
    # What the --signal=B:USR1@300 of slurm/train.sh sends before the time limit.
    assert run(["scancel", "--signal=USR1", "--batch", jobs["signalled"]]).returncode == 0
    wait_for_jobs(list(jobs.values()))

    log = (tmp_path / "signalled.out").read_text()
    requeued = re.search(r"requeueing job \d+ after step (\d+)", log)
    assert requeued, log
    stopped = int(requeued.group(1))
    assert 3 <= stopped < steps, log
    assert f"resumed from {tmp_path / 'signalled/checkpoints'}/step-{stopped:08d}" in log
    assert job_record(jobs["signalled"])["Restarts"] == "1"
    assert job_record(jobs["straight"])["Restarts"] == "0"
    for job in jobs.values():
        assert job_record(job)["JobState"] == "COMPLETED", log
    # Every step ran exactly once across the two pieces of the job.
    assert train_steps() == list(range(1, steps + 1))

    final = [ckpt.latest_checkpoint(tmp_path / name / "checkpoints") for name in jobs]
    assert [f.name for f in final] == [f"step-{steps:08d}"] * 2
    a, b = (load_file(f / "model/model.safetensors") for f in final)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs from the uninterrupted run"
    start = load_file(prepared / "tiny_model/model.safetensors")
    assert any(not torch.equal(a[k], start[k]) for k in start), "training changed nothing"


@pytest.mark.slurm
def test_multinode_sbatch_script_trains_megatron_tp2_across_two_nodes(slurm_cluster, prepared,
                                                                      tmp_path):
    """slurm/train_8node.sh itself, on 2 nodes with one CPU rank each: Megatron TP=2 spans
    the nodes (gloo), the rendezvous comes from the SLURM_* variables and the first node's
    address as Slurm records it."""
    pytest.importorskip("megatron.core")
    from transformers import AutoModelForImageTextToText

    need_two_nodes(slurm_cluster)
    cfg = small_config(prepared, tmp_path / "run", "train.backend=megatron",
                       "train.megatron.tensor_parallel=2", "train.steps=2", "train.save_every=2",
                       f"preprocess.out_dir={prepared / 'reference/shards'}")
    log_file = tmp_path / "train.out"
    # The CPU overrides of the script's GPU-node #SBATCH lines (see its header); a time limit
    # above the --signal=USR1@600 warning's 10 minutes, or the warning comes at once.
    job = sbatch("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", *SMALL_JOB, "--time=15",
                 f"--output={log_file}", "slurm/train_8node.sh",
                 str(write_config(cfg, tmp_path / "c.yaml")))
    wait_for_jobs([job])
    log = log_file.read_text() if log_file.exists() else "(no log)"
    record = job_record(job)
    assert record["JobState"] == "COMPLETED", log[-4000:]
    assert record["NumNodes"] == "2" and record["NumTasks"] == "2", record
    # One rank on each node, as Slurm placed them (all nodes are this host here).
    ranks = dict(re.findall(r"evr1-rank (\d)/2: node (\S+) \(node id", log))
    assert set(ranks) == {"0", "1"} and len(set(ranks.values())) == 2, log[-4000:]
    assert set(ranks.values()) <= set(slurm_cluster.nodes)
    first_addr = run(["scontrol", "show", "node", ranks["0"], "-o"]).stdout
    master = re.search(r"master (\S+):\d+", log)
    assert master and f"NodeAddr={master.group(1)} " in first_addr, log[-4000:]
    assert log.count("training: 2 steps") == 1, "exactly one rank reports"
    final = ckpt.latest_checkpoint(cfg.checkpoint_dir)
    assert final is not None and final.name == "step-00000002"
    assert (final / "meta.json").is_file()
    trained = AutoModelForImageTextToText.from_pretrained(final / "model").state_dict()
    start = AutoModelForImageTextToText.from_pretrained(prepared / "tiny_model").state_dict()
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in start), "weights did not move"


@pytest.mark.slurm
@pytest.mark.parametrize("backend", ["megatron", "hf"])
def test_multinode_sbatch_script_gives_each_node_half_of_the_rollouts(slurm_cluster, prepared,
                                                                      tmp_path, backend):
    """slurm/train_8node.sh with either backend on 2 nodes, one CPU rank each, TP=1: two
    data-parallel replicas, each generating half of every step's rollouts (issue 19). The
    hf backend's run needs its multi-process (FSDP) path."""
    if backend == "megatron":
        pytest.importorskip("megatron.core")
    need_two_nodes(slurm_cluster)
    cfg = small_config(prepared, tmp_path / "run", f"train.backend={backend}",
                       "train.steps=2", "train.save_every=2", "train.prompts_per_step=4",
                       f"preprocess.out_dir={prepared / 'reference/shards'}")
    log_file = tmp_path / "train.out"
    job = sbatch("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", *SMALL_JOB, "--time=15",
                 f"--output={log_file}", "slurm/train_8node.sh",
                 str(write_config(cfg, tmp_path / "c.yaml")))
    wait_for_jobs([job])
    log = log_file.read_text() if log_file.exists() else "(no log)"
    assert job_record(job)["JobState"] == "COMPLETED", log[-4000:]
    ranks = dict(re.findall(r"evr1-rank (\d)/2: node (\S+) \(node id", log))
    assert set(ranks) == {"0", "1"} and len(set(ranks.values())) == 2, log[-4000:]
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text()
            .splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    half = cfg.train.prompts_per_step // 2 * cfg.rollout.n
    for r in train:  # replica i is rank i (TP=1), on node ranks[str(i)]
        assert r["rollouts/replica0"] == r["rollouts/replica1"] == half, r
        assert r["rollouts"] == 2 * half
    assert ckpt.latest_checkpoint(cfg.checkpoint_dir).name == "step-00000002"


@pytest.mark.slurm
def test_submitit_launcher_runs_one_job_across_two_nodes(slurm_cluster, prepared, tmp_path):
    """launchers/train.py --slurm with launch.nodes=2: one submitit job, srun starts a rank on
    each node, they meet through evr1.pipeline.rendezvous (Megatron TP=2 over gloo)."""
    pytest.importorskip("megatron.core")
    need_two_nodes(slurm_cluster)
    cfg = small_config(prepared, tmp_path / "run", "launch.nodes=2", "launch.tasks_per_node=1",
                       "train.backend=megatron", "train.megatron.tensor_parallel=2",
                       "train.steps=1", "train.save_every=1",
                       f"preprocess.out_dir={prepared / 'reference/shards'}")
    out = run([sys.executable, "launchers/train.py", "--slurm", "--config",
               str(write_config(cfg, tmp_path / "c.yaml"))], timeout=JOB_TIMEOUT_S)
    job = re.search(r"train: Slurm job (\d+), 2 node\(s\) x 1 task\(s\)", out.stdout)
    assert job, out.stdout + out.stderr
    folder = cfg.submitit_dir / "train"
    logs = {rank: (folder / f"{job.group(1)}_{rank}_log.out").read_text() for rank in (0, 1)}
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + logs[0][-3000:]
    assert "training: 1 steps" in out.stdout
    wait_for_jobs([job.group(1)])
    record = job_record(job.group(1))
    assert record["JobState"] == "COMPLETED" and record["NumNodes"] == "2", record
    assert record["NumTasks"] == "2", record
    nodes = {}
    for rank, text in logs.items():
        line = re.search(rf"evr1-rank {rank}/2: node (\S+) .* master (\S+):(\d+)", text)
        assert line, text[-3000:]
        nodes[rank] = line.group(1)
        master = line.group(2)
        assert line.group(3) == str(rendezvous.master_port(job.group(1)))
    assert len(set(nodes.values())) == 2 and set(nodes.values()) <= set(slurm_cluster.nodes)
    assert f"NodeAddr={master} " in run(["scontrol", "show", "node", nodes[0], "-o"]).stdout
    assert ckpt.latest_checkpoint(cfg.checkpoint_dir).name == "step-00000001"


@pytest.mark.slurm
def test_pipeline_chains_all_stages_and_eval_reruns_only_a_lost_shard(slurm_cluster, prepared,
                                                                      tmp_path, capsys):
    """preprocess array -> train -> eval array -> collect, submitted at once and chained by
    afterok; then the eval and collect launchers on Slurm after one prediction shard is lost."""
    cfg = small_config(prepared, tmp_path / "run", "launch.cluster=slurm", "train.steps=2",
                       "eval.models=[latest]", "eval.num_shards=2")
    config = write_config(cfg, tmp_path / "c.yaml")
    # The launchers run in this process (their main, as the command line calls it): each
    # process of its own would cost a start-up (torch, transformers) on CI's 2 cores, and the
    # Slurm jobs are what this test is about (the other tests here run launchers as commands).
    assert launcher("pipeline", config) == 0
    out = capsys.readouterr().out
    printed = [re.search(pattern, out) for pattern in (
        r"preprocess: Slurm array, job ids (\d+)_0 ", r"train: Slurm job (\d+)",
        r"eval: Slurm array, job ids (\d+)_0 ", r"collect: Slurm job (\d+)")]
    assert all(printed), out
    array, train_id, eval_array, collect_id = (m.group(1) for m in printed)
    try:
        check_chain(cfg, array, train_id, eval_array, collect_id, prepared)
    finally:  # a failed check must not leave the chain running on the shared cluster
        run(["scancel", array, train_id, eval_array, collect_id])
    rerun_lost_eval_shard(cfg, config, capsys)


def launcher(name: str, config: Path, *args: str) -> int:
    """launchers/<name>.py's main in this process, with ``--config config``."""
    return script_module(f"launchers/{name}.py").main(["--config", str(config), *args])


def check_chain(cfg: Config, array: str, train_id: str, eval_array: str, collect_id: str,
                prepared: Path) -> None:
    # Submitted at once; each stage waits on the one before, as Slurm records it (the
    # preprocess tasks take seconds, training longer: every dependency is still pending).
    for job, after in ((train_id, array), (eval_array, train_id), (collect_id, eval_array)):
        # Slurm gives a pending job its reason at its first scheduling pass, a moment after the
        # submission (until then Reason=None): wait for that pass, not for the job.
        wait_until(lambda job=job: all(r["Reason"] != "None" or r["JobState"] != "PENDING"
                                       for r in job_records(job)),
                   30, f"Slurm's first pass over {job}")
        for record in job_records(job):
            assert record["Reason"] == "Dependency", record
            assert record["Dependency"].startswith(f"afterok:{after}"), record
    submission = (cfg.submitit_dir / "collect" / f"{collect_id}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{eval_array}" in submission
    assert "#SBATCH --kill-on-invalid-dep=yes" in submission

    wait_for_jobs([array, train_id, eval_array, collect_id], timeout=2 * JOB_TIMEOUT_S)
    stages_records = {name: job_records(job) for name, job in (
        ("preprocess", array), ("train", train_id), ("eval", eval_array),
        ("collect", collect_id))}
    states = {name: [r["JobState"] for r in rs] for name, rs in stages_records.items()}
    assert states == {"preprocess": ["COMPLETED"] * 2, "train": ["COMPLETED"],
                      "eval": ["COMPLETED"] * 2, "collect": ["COMPLETED"]}, states
    order = list(stages_records.values())
    for before, after in zip(order, order[1:], strict=False):
        assert min(slurm_time(r["StartTime"]) for r in after) >= max(
            slurm_time(r["EndTime"]) for r in before)
    assert_same_shards(cfg.shard_dir, prepared)
    assert ckpt.latest_checkpoint(cfg.checkpoint_dir).name == "step-00000002"
    results = json.loads((cfg.path(f"{cfg.run_dir}/eval") / "results.json").read_text())
    [row] = results["results"]
    assert row["complete"] and row["missing_shards"] == [] and row["n"] > 0, row
    assert "step-00000002" in row["model_path"], row
    assert (cfg.path(f"{cfg.run_dir}/eval") / "results.md").is_file()


def rerun_lost_eval_shard(cfg: Config, config: Path, capsys) -> None:
    # One prediction shard lost: collect names it and fails; the eval array on Slurm redoes
    # that shard only; collect then succeeds.
    [row] = json.loads((cfg.path(f"{cfg.run_dir}/eval") / "results.json").read_text())["results"]
    folder = cfg.path(f"{cfg.run_dir}/eval") / "predictions" / row["model"] / row["benchmark"]
    kept, lost = sorted(folder.glob("predictions-*-of-*.jsonl"))
    kept_mtime, lost_before = kept.stat().st_mtime_ns, lost.read_text()
    lost.unlink()
    assert launcher("collect", config) == 1
    out = capsys.readouterr().out
    assert "(eval array task 1)" in out, out
    assert launcher("eval", config, "--array") == 0
    out = capsys.readouterr().out
    rerun = re.search(r"eval: slurm array, job ids (\d+)_0 ", out)
    assert rerun, out
    assert "eval summary: 1 task(s) run, 1 skipped as complete" in out, out
    # The lost shard is back, the same (greedy decoding); the other was not rewritten.
    assert lost.read_text() == lost_before and kept.stat().st_mtime_ns == kept_mtime
    assert launcher("collect", config) == 0
    assert json.loads((folder.parents[2] / "results.json").read_text())["results"][0]["complete"]
