"""Sweeps: each job's result.json, the sweep summary, the Optuna search and the submitit launcher."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from console_scripts import ROOT, run_script
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf, open_dict
from safetensors.torch import load_file

from kullm.cli import JobFailed
from kullm.training.result import read_result
from kullm.training.sweep import SweepSummary, summarize, summary_line, write_summary


def fake_job(sweep: Path, name: str, overrides: list[str], result: dict | None) -> Path:
    folder = sweep / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    if result is not None:
        (folder / "result.json").write_text(json.dumps({"overrides": overrides, **result}))
    return folder


def test_summary_ranks_finished_jobs_by_val_loss_and_lists_failures_with_their_error(tmp_path):
    common = ["experiment=smoke"]
    fake_job(tmp_path, "0", [*common, "optim.lr=1e-3"], {"job": 0, "status": "finished", "val_loss": 2.5, "steps": 4})
    fake_job(tmp_path, "1", [*common, "optim.lr=2e-3"], {"job": 1, "status": "failed", "error": "kullm-train: boom"})
    fake_job(tmp_path, "2", [*common, "optim.lr=3e-3"], {"job": 2, "status": "finished", "val_loss": 1.25})
    fake_job(tmp_path, "10", [*common, "optim.lr=4e-3"], None)  # killed before it wrote anything
    fake_job(tmp_path, "3", [*common, "optim.lr=5e-3"], {"job": 3, "status": "finished", "val_loss": None})
    rows = summarize(tmp_path)
    assert [(r["job"], r["status"]) for r in rows] == [
        (2, "finished"),
        (0, "finished"),
        (3, "finished"),
        (1, "failed"),
        ("10", "no result (killed?)"),
    ]
    assert rows[0]["overrides"] == "optim.lr=3e-3" and rows[0]["common"] == "experiment=smoke"
    csv_path, md_path = write_summary(tmp_path, rows)
    with open(csv_path) as f:
        table = list(csv.DictReader(f))
    assert [r["rank"] for r in table] == ["1", "2", "3", "4", "5"]
    assert table[0]["val_loss"] == "1.25" and table[3]["error"] == "kullm-train: boom" and table[4]["val_loss"] == ""
    md = md_path.read_text()
    assert "Best: job 2 (`optim.lr=3e-3`), val/loss 1.2500." in md
    assert "- job 1 (`optim.lr=2e-3`): kullm-train: boom" in md
    assert summary_line(md_path, rows) == (
        f"kullm: sweep summary {md_path} (5 jobs, 2 not finished); best: job 2 (optim.lr=3e-3) val/loss 1.2500"
    )


def test_a_failed_job_records_its_error_on_one_line_without_secrets(tmp_path):
    folder = tmp_path / "sweep" / "4"
    hydra_cfg = OmegaConf.create(
        {"hydra": {"job": {"num": 4}, "mode": "MULTIRUN", "sweep": {"dir": str(tmp_path / "sweep")}}}
    )
    from hydra.types import RunMode

    hydra_cfg.hydra.mode = RunMode.MULTIRUN
    config = OmegaConf.merge(hydra_cfg, {"output_dir": str(folder), "judge": {"api_key": "sk-SECRET123"}})
    callback = SweepSummary()
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("- optim.lr=1e-3\n")
    (folder / "result.json").write_text('{"status": "finished"}')  # left by an earlier attempt in this folder
    callback.on_job_start(config)
    assert not (folder / "result.json").exists()
    error = JobFailed("kullm-train: the judge refused key sk-SECRET123 and token hf_TOK\n  (HTTP 401)")
    overrides = ["optim.lr=1e-3", "+hf_token=hf_TOK"]
    ret = JobReturn(overrides=overrides, hydra_cfg=hydra_cfg, status=JobStatus.FAILED, _return_value=error)
    callback.on_job_end(config, ret)
    result = read_result(folder)
    assert result["status"] == "failed" and result["job"] == 4
    assert result["overrides"] == ["optim.lr=1e-3", "+hf_token=<redacted>"]
    assert result["error"] == "kullm-train: the judge refused key <redacted> and token <redacted> (HTTP 401)"
    ret = JobReturn(overrides=[], hydra_cfg=hydra_cfg, status=JobStatus.FAILED, _return_value=KeyError("x"))
    callback.on_job_end(config, ret)
    assert read_result(folder)["error"] == "KeyError: 'x'"
    assert (tmp_path / "sweep" / "sweep_summary.md").is_file()  # refreshed after each job of a multirun


SHORT = [
    "experiment=smoke", "logger=csv", "callbacks.samples.num=0", "trainer.max_steps=2", "val_every_n_steps=2",
]  # fmt: skip


def kullm_train(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kullm.train", *args], capture_output=True, text=True, timeout=timeout)


def summary_rows(sweep: Path) -> list[dict]:
    with open(sweep / "sweep_summary.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_optuna_search_names_the_best_trial_and_continues_its_stored_study(tmp_path):
    optuna = pytest.importorskip("optuna")
    sweep = tmp_path / "optuna"
    common = ["-m", *SHORT, "hparams_search=lora_optuna", f"hydra.sweep.dir={sweep}",
              f"data.cache_dir={tmp_path}/cache", "+notes.api_key=sk-SWEEPSECRET"]  # fmt: skip
    res = run_script("kullm-train", *common, "hydra.sweeper.n_trials=4", cwd=tmp_path, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    study = optuna.load_study(study_name="lora", storage=f"sqlite:///{sweep}/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    rows = summary_rows(sweep)
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows)
    best = study.best_trial
    assert rows[0]["job"] == str(best.number) and float(rows[0]["val_loss"]) == pytest.approx(best.value)
    assert f"best: job {best.number} (" in res.stdout
    for name, value in best.params.items():  # the summary names the trial's parameters
        assert f"{name}=" in rows[0]["overrides"]
        assert str(value) in rows[0]["overrides"] or f"{name}={value}" in rows[0]["overrides"]
    for row in rows:  # each job's val/loss is the one its run logged, and what Optuna was told
        logged = csv.DictReader(open(sweep / row["job"] / "csv" / "metrics.csv"))
        last = [float(r["val/loss"]) for r in logged if r.get("val/loss")][-1]
        assert float(row["val_loss"]) == pytest.approx(last)
        assert study.trials[int(row["job"])].value == pytest.approx(last)

    # the same command with a larger budget continues the stored study: two more trials, in new folders
    before = {j: (sweep / j / "result.json").read_text() for j in "0123"}
    res = run_script("kullm-train", *common, "hydra.sweeper.n_trials=6", cwd=tmp_path, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    study = optuna.load_study(study_name="lora", storage=f"sqlite:///{sweep}/optuna.db")
    assert len(study.trials) == 6
    assert not [t.params for t in study.trials[4:] if t.params in [u.params for u in study.trials[:4]]]
    assert {j: (sweep / j / "result.json").read_text() for j in "0123"} == before
    assert sorted(r["job"] for r in summary_rows(sweep)) == ["0", "1", "2", "3", "4", "5"]
    leaks = [p for p in sweep.rglob("*") if p.is_file() and b"sk-SWEEPSECRET" in p.read_bytes()]
    assert leaks == []


def test_hydra_finds_the_resumable_optuna_sweeper():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    from kullm.cli import expose_hydra_plugins
    from kullm.config import CONF_DIR

    expose_hydra_plugins()
    found = {f"{p.__module__}.{p.__name__}" for p in Plugins.instance().discover(Sweeper)}
    target = "hydra_plugins.kullm_sweeper.resumable_optuna.ResumableOptunaSweeper"
    assert target in found and f"_target_: {target}" in (CONF_DIR / "hparams_search" / "lora_optuna.yaml").read_text()


@pytest.mark.slow
def test_a_grid_sweep_rewrites_its_summary_after_each_job_so_a_sweep_that_stops_early_has_one(tmp_path):
    """The sweep folder is named by run_name (hydra.sweep.dir interpolates it). Job 1 fails, so the sweep ends in
    an error and Hydra skips on_multirun_end: only the summary rewritten after each job is left."""
    res = run_script("kullm-train", "-m", *SHORT, "run_name=grid", "lora.r=4,0", f"data.cache_dir={tmp_path}/cache",
                     cwd=tmp_path)  # fmt: skip
    assert res.returncode == 1, res.stderr[-3000:]
    assert "InterpolationKeyError" not in res.stderr and "on_job_end" not in res.stderr
    rows = summary_rows(tmp_path / "outputs" / "multirun" / "grid")
    assert [(r["job"], r["status"], r["overrides"]) for r in rows] == [
        ("0", "finished", "lora.r=4"),
        ("1", "failed", "lora.r=0"),
    ]
    assert rows[0]["val_loss"] and rows[1]["error"] == "kullm-train: lora.r=0: must be at least 1"


def one_trial(cache: Path) -> list[str]:
    """README's Optuna command, cut to one short trial."""
    return ["-m", *SHORT, "trainer.max_steps=1", "val_every_n_steps=1", "hparams_search=lora_optuna",
            "hydra.sweeper.n_trials=1", f"data.cache_dir={cache}"]  # fmt: skip


def assert_one_trial_done(tmp_path: Path, res: subprocess.CompletedProcess) -> None:
    optuna = pytest.importorskip("optuna")
    assert res.returncode == 0, res.stderr[-3000:]
    study = optuna.load_study(study_name="lora", storage=f"sqlite:///{tmp_path}/outputs/optuna/lora/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    assert "kullm: sweep summary " in res.stdout and "best: job 0 (optim.lr=" in res.stdout


def test_the_optuna_search_runs_from_another_folder_after_an_editable_install(tmp_path):
    """A key override (trainer.max_steps=…) makes kullm-train compose the config before Hydra starts, which is when
    Hydra scans its plugins: an editable install's import hook hides kullm's sweeper from that scan."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    res = run_script("kullm-train", *one_trial(tmp_path / "cache"), cwd=tmp_path)
    assert "Unknown plugin class" not in res.stderr
    assert_one_trial_done(tmp_path, res)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_optuna_search_runs_from_an_installed_wheel(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    src, wheels, site = tmp_path / "src", tmp_path / "wheels", tmp_path / "site"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "outputs", "build", "gpu_wheels", "*.egg-info",
                                                              "__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], check=True,
                   timeout=300)  # fmt: skip
    (wheel,) = wheels.glob("kullm-*.whl")
    assert "hydra_plugins/kullm_sweeper/resumable_optuna.py" in zipfile.ZipFile(wheel).namelist()
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # the wheel's kullm and plugin come first, as in a venv
    args = one_trial(tmp_path / "cache")  # the wheel's own data/sample (kullm/assets/data)
    res = subprocess.run([str(site / "bin" / "kullm-train"), *args], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert_one_trial_done(work, res)
    config = OmegaConf.load(work / "outputs" / "optuna" / "lora" / "0" / ".hydra" / "hydra.yaml")
    assert config.hydra.runtime.config_sources[1].path == str(site / "kullm" / "conf")  # the wheel's, not ours


STAND_IN = """
import hydra

from kullm.cli import expose_hydra_plugins
from kullm.config import CONF_DIR


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def objective(cfg) -> float:  # kullm-train's config and search, with a stand-in for training
    return float(cfg.optim.lr)


expose_hydra_plugins()
objective()
"""


def test_a_continued_optuna_study_proposes_new_points_and_a_fresh_one_repeats_its_seed(tmp_path):
    optuna = pytest.importorskip("optuna")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    (tmp_path / "search.py").write_text(STAND_IN)

    def search(study: str, n_trials: int) -> list[dict]:
        args = ["-m", "hparams_search=lora_optuna", f"hydra.sweeper.study_name={study}",
                f"hydra.sweeper.n_trials={n_trials}", "~hydra.callbacks.summary"]  # fmt: skip (no Lightning import)
        res = subprocess.run([sys.executable, "search.py", *args], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        storage = f"sqlite:///{tmp_path}/outputs/optuna/{study}/optuna.db"
        return [t.params for t in optuna.load_study(study_name=study, storage=storage).trials]

    first = search("a", 2)
    continued = search("a", 4)  # the same command with a larger budget: two more trials
    assert len(continued) == 4 and continued[:2] == first
    assert [p for p in continued[2:] if p in first] == []  # not trial 0 and 1 again
    assert len({p["optim.lr"] for p in continued}) == 4
    assert search("b", 2) == first  # seed 42 still gives a new study the same points


def test_a_search_in_which_no_trial_returns_a_val_loss_ends_in_one_line_saying_why(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    (tmp_path / "search.py").write_text(STAND_IN.replace("return float(cfg.optim.lr)", "return None"))
    args = ["-m", "hparams_search=lora_optuna", "hydra.sweeper.n_trials=2", "~hydra.callbacks.summary"]
    res = subprocess.run([sys.executable, "search.py", *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.splitlines()[-1] == (
        "kullm-train: no trial of study 'lora' returned a val/loss to minimise (each failed, or ran no validation: "
        "it needs data.val_set_size > 0); see each trial's log in the sweep folder"
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_submitit_local_runs_each_job_in_its_own_process(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "kullm.train", "-m", "hydra/launcher=submitit_local", *SHORT, "optim.lr=1e-3,2e-3",
           f"hydra.sweep.dir={sweep}", f"data.cache_dir={tmp_path}/cache"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=500)
    assert proc.returncode == 0, err[-3000:]
    results = {j: read_result(sweep / j) for j in ("0", "1")}
    pids = {r["pid"] for r in results.values()}
    assert len(pids) == 2 and proc.pid not in pids  # two jobs, two processes, neither the launching one
    assert all(r["status"] == "finished" for r in results.values())
    assert (sweep / ".submitit").is_dir()  # submitit's own job records: the plugin really ran them
    rows = summary_rows(sweep)
    assert sorted(r["overrides"] for r in rows) == ["optim.lr=0.001", "optim.lr=0.002"]
    assert float(rows[0]["val_loss"]) <= float(rows[1]["val_loss"])
    assert f"best: job {rows[0]['job']} ({rows[0]['overrides']})" in out


def test_the_slurm_preset_sizes_the_sbatch_job_from_the_trainer(tmp_path):
    """The real submitit SLURM launcher writes its sbatch script; a stand-in ``sbatch`` keeps it and refuses."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    refuse = f'#!/bin/sh\ncp "$1" {tmp_path}/job.sh\necho "sbatch: refused in a test" >&2\nexit 1\n'
    (bin_dir / "sbatch").write_text(refuse)
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "kullm.train", "-m", "hydra/launcher=slurm", "experiment=smoke",
           "trainer.devices=4", "trainer.num_nodes=2", "hydra.launcher.partition=a100",
           "hydra.launcher.account=kullm-lab", "hydra.launcher.mem_gb=480", "hydra.launcher.timeout_min=600",
           f"hydra.sweep.dir={tmp_path}/sweep"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode != 0 and "sbatch: refused in a test" in res.stderr + res.stdout
    script = (tmp_path / "job.sh").read_text()
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=a100", "--account=kullm-lab",
                 "--mem=480GB", "--time=600", "--signal=USR2@120", "--cpus-per-task=8"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script, line  # (submitit asks for SIGUSR2 before the time limit)


def interrupt(cmd: list[str], run: Path, sig: signal.Signals, **popen) -> tuple[str, int]:
    """Start ``cmd``, send ``sig`` once its first ``last.ckpt`` exists; check the exit status and return the
    "interrupted by" line and the step it names."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    wait_for(run / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err[-3000:]
    line = next(x for x in err.splitlines() if x.startswith(f"kullm-train: interrupted by {sig.name}"))
    return line, int(line.split(" at step ")[1].split(";")[0])


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"


RESUMABLE = [
    "experiment=smoke",
    "logger=wandb",
    "callbacks.samples.num=0",
    "trainer.max_steps=24",
    "callbacks.checkpoint.every_n_train_steps=1",
    "lora.lora_dropout=0.1",
    "seed=7",
]  # fmt: skip  (dropout draws from the RNG: its state must come back too)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_mid_epoch_then_the_same_command_ends_with_the_uninterrupted_adapter(tmp_path):
    """run_name= is a stable folder: the same command again resumes its last checkpoint and its W&B run."""
    # (a loaded machine starts W&B's service slowly: give it more than its default 90 s)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_INIT_TIMEOUT": "300", "PYTHONUNBUFFERED": "1"}
    common = [sys.executable, "-m", "kullm.train", *RESUMABLE, f"data.cache_dir={tmp_path}/cache"]
    straight = subprocess.run([*common, "run_name=straight"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=400)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = tmp_path / "outputs" / "train" / "resumed"
    command = [*common, "run_name=resumed"]
    line, step = interrupt(command, run, signal.SIGTERM, cwd=tmp_path, env=env)
    assert 0 < step < 10, line  # inside the first epoch (10 optimizer steps)
    assert "run the same command again: run_name=resumed" in line
    assert read_result(run)["status"] == "interrupted" and not (run / "adapter").exists()

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    said = next(x for x in (again.stdout + again.stderr).splitlines() if "resuming from this run folder's" in x)
    assert said.endswith("outputs/train/resumed/checkpoints/last.ckpt")
    want = load_file(tmp_path / "outputs" / "train" / "straight" / "adapter" / "adapter_model.safetensors")
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert read_result(run)["status"] == "finished" and read_result(run)["steps"] == 24
    # one W&B run over both attempts: the id stored in the folder, used by each attempt's (offline) run
    run_id = (run / "wandb_run_id").read_text().strip()
    attempts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(p.name.endswith(f"-{run_id}") for p in attempts)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_slurm_pre_timeout_signal_saves_last_and_requeues_the_job(tmp_path):
    """Under SLURM (Lightning's SLURM environment, auto_requeue), SIGUSR1 saves `last` and runs scontrol requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.calls\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0", "SLURM_JOB_NAME": "kullm"}  # fmt: skip
    env = {**os.environ, **slurm, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    env.pop("SLURM_ARRAY_JOB_ID", None)
    run = tmp_path / "outputs" / "train" / "job"
    cmd = [sys.executable, "-m", "kullm.train", *RESUMABLE, "logger=csv", "run_name=job",
           f"data.cache_dir={tmp_path}/cache"]  # fmt: skip
    line, step = interrupt(cmd, run, signal.SIGUSR1, cwd=tmp_path, env=env)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    progress = last["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert last["global_step"] == step and progress["ready"] == progress["completed"] + 1 == 2 * step
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n"
    assert read_result(run)["status"] == "interrupted"


def test_wandb_runs_are_named_after_the_experiment_and_overrides_and_grouped_per_sweep():
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from kullm.config import CONF_DIR
    from kullm.training.loggers import run_label

    overrides = ["experiment=smoke", "optim.lr=1e-3", "lora.r=8", "data.cache_dir=/tmp/c", "+judge.api_key=sk-NOPE",
                 "hydra.sweep.dir=/tmp/sweeps/lr-grid", "output_dir=/tmp/x"]  # fmt: skip

    def label(*extra: str, mode: RunMode = RunMode.RUN) -> tuple:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", [*overrides, *extra], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.mode = mode
        HydraConfig.instance().set_config(cfg)
        return run_label(cfg)

    try:
        assert label() == ("smoke optim.lr=1e-3 lora.r=8 +judge.api_key=<redacted>", None)
        assert label(mode=RunMode.MULTIRUN) == ("smoke optim.lr=1e-3 lora.r=8 +judge.api_key=<redacted>", "lr-grid")
        assert label("run_name=mine", mode=RunMode.MULTIRUN) == ("mine", "lr-grid")
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_run_shows_one_progress_bar_over_all_steps_and_logs_its_summary_lines(tmp_path):
    run = tmp_path / "run"
    res = kullm_train("experiment=smoke", "logger=csv", "callbacks.samples.num=0", "trainer.max_steps=4",
                      f"hydra.run.dir={run}", f"data.cache_dir={tmp_path}/cache")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    screen = (res.stdout + res.stderr).replace("\r", "\n")
    bars = [x for x in screen.splitlines() if x.startswith("train (optimizer steps):")]
    assert bars and "4/4 [" in bars[-1] and "loss=" in bars[-1] and "lr=" in bars[-1] and "tok/s=" in bars[-1]
    assert not any(x.startswith("Epoch ") for x in screen.splitlines())  # no per-epoch bar
    for noise in ("kernels-community", "is_gradient_checkpointing", "Tip: For seamless"):
        assert noise not in screen
    log = (run / "train.log").read_text()
    for line in ("kullm-train: effective batch 8 = micro-batch 4", "kullm-train: training ",
                 f"kullm-train: output dir {run}", f"kullm-train: adapter saved to {run / 'adapter'}"):  # fmt: skip
        assert line in log, line
