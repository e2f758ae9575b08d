"""torchrun + FSDP2 on CPU (gloo, 2 ranks), launched for real: the update equals one process's, a run
survives a killed rank through `--max-restarts` + `--auto-resume` and ends exactly where an uninterrupted
run ends, and a lost rank stops the others with one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_LEARNING, TINY_RUN, assert_learned
from tracerl.distributed import Single, by_index, by_name, decoder_layers, lost_peer
from tracerl.runlog import read_jsonl
from tracerl.train import reduce_metrics

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
RUN = [*TINY_LEARNING, "trainer.tensorboard=false", "run.threads=1", "trainer.steps=6", "trainer.checkpoint_every=2",
       "trainer.eval_every=0", "trainer.keep_checkpoints=3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def _train(run_dir: Path, *extra: str, restarts: int = 0) -> subprocess.Popen:
    cmd = [*TORCHRUN, f"--max-restarts={restarts}", "-m", "tracerl.cli", "train", *extra, *RUN, f"run.dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _worker(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """The training process of `rank` under a torchrun launcher."""
    deadline = time.time() + 60
    while time.time() < deadline:
        for p in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if p.environ().get("RANK") == str(rank) and "tracerl.cli" in " ".join(p.cmdline()):
                    return p
            except psutil.Error:
                continue
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} worker appeared")


def _wait_for(path: Path, launcher: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert launcher.poll() is None, f"the run ended before {path} appeared:\n{launcher.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_s") and k != "time"} for r in rows]


def test_one_update_on_two_ranks_equals_the_single_process_update(tmp_path):
    script = REPO / "tests" / "dist" / "update_equals_single.py"
    out = subprocess.run([*TORCHRUN, str(script), str(tmp_path), *TINY_RUN], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=300)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert out.returncode == 0 and len(rows) == 7, out.stdout[-2000:] + out.stderr[-4000:]
    for r in rows:
        assert r["ok"] and r["max_weight_diff"] <= 1e-6 and r["max_grad_diff"] <= 1e-6, r
        assert abs(r["loss_1"] - r["loss_n"]) <= 1e-6 and r["grad_norm_1"] > 0, r
    by_case = {r["case"]: r for r in rows}
    assert by_case["chains-rows-token-mean"]["rank_leaves"] == [8, 4]  # unequal shares: idle passes ran
    assert by_case["one-prompt-idle-rank"]["rank_leaves"] == [4, 0]
    assert by_case["chains-rows-seq-mean-kl-2-epochs"]["weights_moved_from_ref"] > 0
    assert by_case["chains-rows-all-token-distill"]["distill_weight"] == 1.0  # the teacher KL was on
    # the distillation and credit terms changed the loss of the same batch (each really ran)
    plain = by_case["chains-rows-plain"]["loss_1"]
    assert abs(by_case["chains-rows-all-token-distill"]["loss_1"] - plain) > 1e-4
    assert abs(by_case["chains-rows-flowtracer"]["loss_1"] - plain) > 1e-4


@pytest.mark.slow
def test_a_killed_rank_restarts_and_the_run_ends_as_an_uninterrupted_one(tmp_path):
    whole = subprocess.run([*TORCHRUN, "-m", "tracerl.cli", "train", *RUN, f"run.dir={tmp_path / 'whole'}"], cwd=REPO,
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-3000:]

    run = _train(tmp_path / "killed", "--auto-resume", restarts=1)
    _wait_for(tmp_path / "killed" / "checkpoints" / "step_000002" / "trainer_state.json", run)
    victim = _worker(run, 1)
    victim.send_signal(signal.SIGKILL)
    log, _ = run.communicate(timeout=300)
    assert run.returncode == 0, log[-4000:]
    assert "exitcode: -9" in log and "resumed from" in log, log[-4000:]  # torchrun saw the kill; the group resumed

    a, b = tmp_path / "whole", tmp_path / "killed"
    assert_learned(a)
    assert _comparable(read_jsonl(a / "metrics.jsonl")) == _comparable(read_jsonl(b / "metrics.jsonl"))
    wa = load_file(str(a / "checkpoints" / "step_000006" / "model" / "model.safetensors"))
    wb = load_file(str(b / "checkpoints" / "step_000006" / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    state = json.loads((b / "checkpoints" / "step_000006" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 6

    # the checkpoint layout is the one-process layout: the 2-rank run continues in one process
    one = subprocess.run([sys.executable, "-m", "tracerl.cli", "train", "--resume", str(a), "trainer.steps=7"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(a / "metrics.jsonl")] == list(range(1, 8))
    assert json.loads((a / "checkpoints" / "step_000007" / "trainer_state.json").read_text())["world_size"] == 1


def test_a_killed_rank_ends_the_others_within_a_minute(tmp_path):
    run = _train(tmp_path / "r")
    _wait_for(tmp_path / "r" / "checkpoints" / "step_000002" / "trainer_state.json", run)
    victim, survivor = _worker(run, 1), _worker(run, 0)
    t0 = time.time()
    victim.send_signal(signal.SIGKILL)
    log, _ = run.communicate(timeout=120)
    elapsed = time.time() - t0
    assert run.returncode != 0 and elapsed < 60, (elapsed, log[-3000:])
    assert not survivor.is_running() or survivor.status() == psutil.STATUS_ZOMBIE
    assert "rank      : 1" in log and "SIGKILL" in log, log[-3000:]  # torchrun names the dead rank
    assert (tmp_path / "r" / "checkpoints" / "step_000002" / "trainer_state.json").is_file()  # the good one stays


def test_a_hung_rank_stops_the_others_with_one_line_after_the_timeout(tmp_path):
    run = _train(tmp_path / "r", "run.dist_timeout_s=8")
    _wait_for(tmp_path / "r" / "checkpoints" / "step_000002" / "trainer_state.json", run)
    victim = _worker(run, 1)
    t0 = time.time()
    victim.send_signal(signal.SIGSTOP)
    try:
        deadline, seen = time.time() + 60, ""
        while "error (rank 0)" not in seen and time.time() < deadline:
            line = run.stdout.readline()
            if not line:
                break
            seen += line
        elapsed = time.time() - t0
    finally:
        victim.send_signal(signal.SIGKILL)
        rest, _ = run.communicate(timeout=120)
    err = [ln for ln in (seen + rest).splitlines() if ln.startswith("error (rank 0)")]
    assert err and 8 <= elapsed < 60, (elapsed, (seen + rest)[-3000:])  # after the timeout, not before
    assert "failed (another rank died, hung for more than run.dist_timeout_s=8 s" in err[0]
    assert "Traceback" not in seen  # rank 0's one line, no traceback before it


@pytest.mark.slow
@pytest.mark.parametrize("method", [["rollout.allocator=trace", "algo.advantage=tree_grpo"], ["rollout.allocator=dapo"]])
def test_allocators_that_plan_across_prompts_make_one_plan_on_two_ranks(tmp_path, method):
    """TRACE (a pool, Stage 1 / Stage 2 from the shared predictor) and DAPO (refills) on a warm start that
    solves some questions: every step, the ranks' plans are compared (a mismatch stops the run)."""
    sys.path.insert(0, str(REPO / "tests" / "golden"))
    from update_golden import BASE  # a warm start with mixed outcomes

    cmd = [*TORCHRUN, "-m", "tracerl.cli", "train", *BASE, *method, "rollout.prompts_per_step=3", "predictor.warmup=1",
           "trainer.steps=3", "trainer.eval_every=0", "trainer.eval_size=4", "trainer.tensorboard=false",
           "run.threads=1", f"run.dir={tmp_path / 'r'}"]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert len(rows) == 3 and any(0 < r["reward_mean"] < 1 for r in rows)  # outcomes to allocate on
    if "rollout.allocator=trace" in method:
        assert rows[-1]["predictor_warm"] == 1.0 and all(r["continuations"] > 0 for r in rows)
        assert all(r["pool_size"] == 6 for r in rows)  # ceil(2 · 3): the pool, once, not per rank


# ---------------------------------------------------------------- in-process pieces


def test_single_process_world_is_the_identity():
    w = Single()
    assert w.size == 1 and w.is_main and w.share([1, 2, 3]) == [1, 2, 3]
    assert float(w.sum(2.5)) == 2.5 and float(w.max(torch.tensor(3))) == 3.0 and w.gather({"a": 1}) == [{"a": 1}]
    assert w.lost(RuntimeError("Timed out")) is None


def test_optimizer_state_renames_between_indices_and_names_and_back():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    named = by_name(model, sd)
    assert set(named["state"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    back = by_index(model, named)
    assert back["param_groups"][0]["params"] == sd["param_groups"][0]["params"]
    assert all(torch.equal(back["state"][i]["exp_avg"], sd["state"][i]["exp_avg"]) for i in sd["state"])


def test_decoder_layers_are_the_largest_module_list(tiny_policy):
    model = tiny_policy.model
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers


def test_communication_failures_become_one_line_errors():
    e = lost_peer(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 8000ms\nmore"), 0, 2, 8)
    assert e is not None and "\n" not in str(e) and "rank 0" in str(e) and "dist_timeout_s=8" in str(e)
    assert lost_peer(RuntimeError("shape mismatch"), 0, 2, 8) is None
    assert lost_peer(ValueError("timed out"), 0, 2, 8) is None


def test_metrics_add_counts_take_the_slowest_time_and_weight_means_by_leaves():
    out = reduce_metrics([{"gen_tokens": 10, "leaves": 3, "em": 1.0, "rollout_s": 2.0, "grad_norm": 0.5},
                          {"gen_tokens": 5, "leaves": 1, "em": 0.0, "rollout_s": 3.0, "grad_norm": 0.5}])
    assert out == {"gen_tokens": 15.0, "leaves": 4.0, "em": 0.75, "rollout_s": 3.0, "grad_norm": 0.5}


