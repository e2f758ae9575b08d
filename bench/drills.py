"""Fault drills with real processes, bounded in time (issue 19).

    .venv/bin/python bench/drills.py --drill all --seed 0      # writes bench/results/drills.json

kills      A tiny `tracerl train` (TINY_LEARNING of tests/conftest.py, a checkpoint and a prune at every
           step) is SIGKILLed N times (default 10), each kill followed by a restart of the same run:
           `tracerl train --auto-resume OVERRIDES` or `tracerl train --resume RUN` (alternately). Kill
           moments are drawn from the seed: `early` (a random moment before the attempt's first checkpoint,
           so the restart starts the run again), `random` (a random moment within one measured step after
           the attempt's first checkpoint), `write` (targeted: a random moment inside a checkpoint write, from
           inotify seeing `.step_*.tmp` appear) and `prune` (targeted: as soon as inotify sees
           `.pruning-step_*` appear). Just before each SIGKILL the checkpoint directory is listed: the kill's
           phase is `write` (a `.step_*.tmp`/`.old` of this attempt exists), `prune` (a `.pruning-*` exists),
           `setup` (the attempt has not logged a row yet) or `step` (rollout / update / evaluation). The run
           must end with the metrics.jsonl and eval.jsonl rows (timing keys `*_s` left out), the trees files
           and the final weights and optimizer state of an uninterrupted run, bit for bit.
final      One kill right after the final checkpoint is in place (inside the final prune), then a resume:
           the run must still end as the uninterrupted one (eval.jsonl included).
diskfull   The same run with its run directory on a small tmpfs, in a private mount namespace (`unshare
           --mount`, mapped to root when not root). Once the step-3 prune is over the trainer is stopped
           (SIGSTOP), a filler file takes all free space but half a checkpoint (`ckpt` variant: the
           next checkpoint write fails) or all of it (`full`: whatever writes next fails), and the trainer
           continues. Expected: exit code != 0, one `error:` line naming the full disk, no traceback, the
           last checkpoint verifies, no debris; after the filler is removed, `--resume` finishes the run
           as the uninterrupted one.
retriever  A tiny real-QA training whose search tool is `tracerl serve-retriever` over HTTP; the server
           is SIGKILLed mid-rollout. Expected: bounded retries, one `error:` line, exit != 0, and, with
           the server back, `--resume` finishes the run.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import hashlib
import json
import os
import platform
import random
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = os.environ.get("TRACERL_DRILL_SRC", str(REPO / "src"))  # a drill's pinned copy (pin_source), else src/
sys.path.insert(0, SRC)
DATA = REPO.parent / "shared" / "data" / "real_qa"
OUT = REPO / "bench" / "results" / "drills.json"

ENV = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1",
       "TRACERL_CACHE": str(Path(os.environ.get("TRACERL_CACHE", REPO / ".cache" / "test-models")).resolve())}


def pin_source(work: Path) -> Path:
    """Run every process of the drills on a copy of src/ made now: the runs compared are then runs of one
    code, even while src/ is being edited."""
    dest = work / "src"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(REPO / "src", dest, ignore=shutil.ignore_patterns("__pycache__"))
    ENV["PYTHONPATH"] = ENV["TRACERL_DRILL_SRC"] = str(dest)
    return dest


def tiny_overrides(steps: int) -> list[str]:
    """tests/conftest.py's TINY_LEARNING with a checkpoint and a prune at every step."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY_LEARNING

    return [*TINY_LEARNING, "trainer.checkpoint_every=1", "trainer.keep_checkpoints=1", f"trainer.steps={steps}",
            "trainer.tensorboard=false", "run.threads=1"]


# ------------------------------------------------------------------------------ inotify (Linux)

IN_MODIFY, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x2, 0x40, 0x80, 0x100, 0x200
_MASK = IN_MODIFY | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class Inotify:
    """Directory events without polling: (key, name, mask) for every entry created, moved or removed."""

    def __init__(self):
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.keys: dict[int, str] = {}

    def add(self, path: Path, key: str) -> None:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(str(path)), _MASK)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        self.keys[wd] = key

    def read(self, timeout: float) -> list[tuple[str | None, str, int]]:
        if not select.select([self.fd], [], [], timeout)[0]:
            return []
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        out, i = [], 0
        while i + 16 <= len(data):
            wd, mask, _, n = struct.unpack_from("iIII", data, i)
            out.append((self.keys.get(wd), data[i + 16:i + 16 + n].rstrip(b"\0").decode(), mask))
            i += 16 + n
        return out

    def close(self) -> None:
        os.close(self.fd)


def _is_write(name: str) -> bool:
    return name.startswith(".step_") and name.endswith((".tmp", ".old"))


def _is_prune(name: str) -> bool:
    return name.startswith(".pruning-")


class Attempt:
    """One `tracerl train` process and what happened in its run directory while it ran (inotify)."""

    def __init__(self, args: list[str], run_dir: Path, log_dir: Path, index: int, on_event=None):
        self.run_dir, self.index, self.on_event = run_dir, index, on_event
        self.ckpt_dir = run_dir / "checkpoints"
        self.ino = Inotify()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.ino.add(run_dir, "run")
        self.fresh: set[str] = set()  # checkpoint-dir entries this attempt created, still there
        self.at_launch = self._entries()  # (name, inode): what a kill of this attempt must not blame on it
        self.write_events: list[str] = []  # top-level entries of the checkpoint being written, as they change
        self.writes: list[int] = []  # events seen inside each finished write
        self.current_write: str | None = None
        self.events: list[tuple[float, str, str]] = []  # (t since launch, kind, name)
        self.logged = False  # the attempt appended a metrics or eval row
        self.count = {"tmp": 0, "ckpt": 0, "prune": 0}
        if self.ckpt_dir.is_dir():
            self.ino.add(self.ckpt_dir, "ckpt")
        self._lock = threading.Lock()
        self.kill_info: dict | None = None
        self._stop = False
        self.stdout_path, self.stderr_path = log_dir / f"attempt{index}.out", log_dir / f"attempt{index}.err"
        self.t0 = time.monotonic()
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "tracerl.cli", "train", *args], stdout=out,
                                         stderr=err, env=ENV, cwd=REPO)
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _watch(self) -> None:
        while not self._stop:
            for key, name, mask in self.ino.read(0.05):
                self._event(key, name, mask)

    def _entries(self) -> set[tuple[str, int]]:
        try:
            with os.scandir(self.ckpt_dir) as it:
                return {(e.name, e.inode()) for e in it}
        except OSError:
            return set()

    def _event(self, key, name: str, mask: int) -> None:
        t = self.now()
        if key is not None and key.startswith("tmp:"):  # inside a checkpoint directory being written
            if key != f"tmp:{self.current_write}" or not mask & (IN_CREATE | IN_MODIFY | IN_MOVED_TO):
                return  # an earlier write's directory (e.g. being pruned now)
            self.write_events.append(name)
            if self.on_event is not None:
                self.on_event(self, name, mask, inside=True)
            return
        if key == "run":
            if name == "checkpoints" and mask & (IN_CREATE | IN_MOVED_TO):
                try:
                    self.ino.add(self.ckpt_dir, "ckpt")
                    for p in self.ckpt_dir.iterdir():  # what was made before the watch was in place
                        self._ckpt_event(p.name, IN_CREATE, t)
                except OSError:
                    pass
            elif name in ("metrics.jsonl", "eval.jsonl") and mask & IN_MODIFY:
                self.logged = True
            return
        if key == "ckpt":
            self._ckpt_event(name, mask, t)

    def _ckpt_event(self, name: str, mask: int, t: float) -> None:
        with self._lock:
            if mask & (IN_CREATE | IN_MOVED_TO):
                if name in self.fresh:
                    return
                self.fresh.add(name)
                kind = "tmp" if _is_write(name) and name.endswith(".tmp") else "prune" if _is_prune(name) else \
                    "ckpt" if name.startswith("step_") else None
                if kind:
                    self.count[kind] += 1
                    self.events.append((t, kind, name))
                if kind == "tmp":
                    self.write_events, self.current_write = [], name
                    try:
                        self.ino.add(self.ckpt_dir / name, f"tmp:{name}")
                    except OSError:
                        pass
                elif kind == "ckpt":
                    self.writes.append(len(self.write_events))
            elif mask & (IN_DELETE | IN_MOVED_FROM):
                self.fresh.discard(name)
                if name == self.current_write:
                    self.current_write = None
                if _is_prune(name):
                    self.events.append((t, "pruned", name))
        if self.on_event is not None:
            self.on_event(self, name, mask, inside=False)

    def phase(self) -> tuple[str, list[str]]:
        """What the trainer is doing, from a listing of the checkpoint directory made just now: entries
        that were there (same name, same inode) when the attempt started are a previous kill's debris."""
        entries = self._entries()
        names = sorted(n for n, _ in entries)
        mine = [n for n, ino in entries if (n, ino) not in self.at_launch]
        if any(_is_write(n) for n in mine):
            return "write", names
        if any(_is_prune(n) for n in mine):
            return "prune", names
        return ("step" if self.logged else "setup"), names

    def kill(self, mode: str) -> bool:
        """SIGKILL the trainer (once); records its phase, from a listing made just before."""
        with self._lock:
            if self.kill_info is not None or self.proc.poll() is not None:
                return False
            self.kill_info = {}
        phase, names = self.phase()
        t = self.now()
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            self.kill_info = None
            return False
        self.kill_info.update(mode=mode, phase=phase, t=round(t, 3), listing=names)
        if phase == "write":
            self.kill_info["write_events_seen"] = list(self.write_events)
        return True

    def wait(self, timeout: float) -> int | None:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
            self.timed_out = True
        self._stop = True
        self.thread.join()
        self.ino.close()
        return rc

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")


# ------------------------------------------------------------------------------ comparing runs


def _rows(path: Path) -> list[dict]:
    from tracerl.runlog import read_jsonl

    if not path.is_file():
        return []
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in read_jsonl(path)]


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def compare_runs(ref: Path, run: Path) -> dict:
    """What must be identical between an uninterrupted run and an interrupted one."""
    from tracerl.checkpoint import latest_checkpoint

    out: dict = {}
    for name in ("metrics.jsonl", "eval.jsonl"):
        a, b = _rows(ref / name), _rows(run / name)
        out[name] = a == b
        if a != b:
            out[f"{name} diff"] = {"rows": [len(a), len(b)], "steps": [[r.get("step") for r in a],
                                                                       [r.get("step") for r in b]]}
            for ra, rb in zip(a, b):
                keys = sorted(k for k in set(ra) | set(rb) if ra.get(k) != rb.get(k))
                if keys:
                    out[f"{name} diff"]["first"] = {"step": ra.get("step"),
                                                    "keys": {k: [ra.get(k), rb.get(k)] for k in keys[:8]}}
                    break
    trees = lambda d: {p.name: _sha(p) for p in sorted((d / "trees").glob("*.jsonl"))}
    out["trees"] = trees(ref) == trees(run)
    ca, cb = latest_checkpoint(ref / "checkpoints"), latest_checkpoint(run / "checkpoints")
    out["final checkpoint"] = [ca.name if ca else None, cb.name if cb else None]
    for rel in ("model/model.safetensors", "optimizer.safetensors"):
        out[rel] = bool(ca and cb and _sha(ca / rel) == _sha(cb / rel))
    out["checkpoints left"] = sorted(os.listdir(run / "checkpoints")) if (run / "checkpoints").is_dir() else []
    out["identical"] = all(out[k] for k in ("metrics.jsonl", "eval.jsonl", "trees", "model/model.safetensors",
                                            "optimizer.safetensors")) and out["final checkpoint"][0] == \
        out["final checkpoint"][1]
    return out


def debris(run: Path) -> list[str]:
    """Temporaries a write or prune left anywhere under the run directory."""
    return sorted(str(p.relative_to(run)) for p in run.rglob(".*")
                  if p.name.endswith((".tmp", ".old")) or p.name.startswith(".pruning-"))


# ------------------------------------------------------------------------------ drill: kills


def baseline(work: Path, overrides: list[str]) -> dict:
    """The uninterrupted run, with its checkpoint timeline (to place the kills)."""
    run = work / "uninterrupted"
    shutil.rmtree(run, ignore_errors=True)
    t = time.monotonic()
    a = Attempt([*overrides, f"run.dir={run}"], run, work, index=0)
    rc = a.wait(600)
    wall = time.monotonic() - t
    if rc != 0:
        raise RuntimeError(f"the uninterrupted run failed (rc {rc}): {a.stderr()[-2000:]}")
    ev = a.events
    done = [t for t, k, _ in ev if k == "ckpt"]
    tmp = {n.removeprefix(".").removesuffix(".tmp"): t for t, k, n in ev if k == "tmp"}
    writes = [t - tmp[n] for t, k, n in ev if k == "ckpt" and n in tmp]
    starts = {n: t for t, k, n in ev if k == "prune"}
    prunes = [t - starts[n] for t, k, n in ev if k == "pruned" and n in starts]
    return {"run": str(run), "wall_s": round(wall, 2), "first_checkpoint_s": round(done[0], 3),
            "step_s": round(statistics.median(b - a for a, b in zip(done, done[1:])), 3),
            "write_s": round(statistics.median(writes), 4) if writes else None,
            "prune_s": round(statistics.median(prunes), 5) if prunes else None, "checkpoints": len(done),
            "events_per_write": int(statistics.median(a.writes)) if a.writes else 1}


def kill_plan(n: int, seed: int) -> list[str]:
    """`early` first, then random and targeted kills in a seeded order (at least one write and one prune)."""
    if n <= 0:
        return []
    rest = n - 1
    targeted = max(1, rest * 2 // 9) if rest >= 2 else 0
    modes = ["write"] * targeted + ["prune"] * targeted
    modes += ["random"] * (rest - len(modes))
    random.Random(seed).shuffle(modes)
    return ["early", *modes] if n >= 4 else (["random", "write", "prune"][:n])


def run_with_kills(work: Path, name: str, overrides: list[str], plan: list[str], base: dict, seed: int,
                   random_write: bool = True) -> dict:
    """Kill the run once per plan entry, restarting it after each kill; then let it finish."""
    rng = random.Random(seed)
    run = work / name
    shutil.rmtree(run, ignore_errors=True)
    kills, attempts, t_start = [], [], time.monotonic()
    steps = int(next(o for o in reversed(overrides) if o.startswith("trainer.steps=")).split("=")[1])
    from tracerl.checkpoint import latest_checkpoint

    for i, mode in enumerate([*plan, None]):
        ckpt = latest_checkpoint(run / "checkpoints") if (run / "checkpoints").is_dir() else None
        use_resume = ckpt is not None and i % 2 == 1
        args = ["--resume", str(run)] if use_resume else ["--auto-resume", *overrides, f"run.dir={run}"]
        target = {}

        if mode == "write":  # after the k-th change inside the attempt's second write (the first completes)
            target["event"] = rng.randint(0, max(base["events_per_write"] - 1, 0)) if random_write else 0

        def on_event(att: Attempt, ev_name: str, mask: int, inside: bool, mode=mode, target=target) -> None:
            if mode == "write" and att.count["tmp"] >= 2:
                if inside and len(att.write_events) > target["event"] or \
                        not inside and target["event"] == 0 and mask & IN_CREATE and ev_name.endswith(".tmp"):
                    att.kill(mode)
            elif mode in ("prune", "final") and not inside and mask & IN_MOVED_TO and _is_prune(ev_name):
                if mode == "prune" or ev_name == f".pruning-step_{steps - 1:06d}":
                    att.kill(mode)

        a = Attempt(args, run, work, index=100 + i, on_event=on_event)
        if mode == "early":
            target["delay"] = rng.uniform(0.2, 0.95) * base["first_checkpoint_s"]
            while a.proc.poll() is None and a.now() < target["delay"]:
                time.sleep(0.005)
            a.kill(mode)
        elif mode == "random":
            while a.proc.poll() is None and a.count["ckpt"] == 0:
                time.sleep(0.002)
            target["delay"] = rng.uniform(0, base["step_s"])
            time.sleep(target["delay"])
            a.kill(mode)
        rc = a.wait(600)
        att = {"args": "--resume" if use_resume else "--auto-resume", "from": ckpt.name if ckpt else None,
               "rc": rc, "wall_s": round(a.now(), 2), "resumed": "resumed from" in a.stdout()}
        if a.kill_info:
            info = {**a.kill_info, **{k: round(v, 4) for k, v in target.items()},
                    "debris_after": [n for n in (os.listdir(run / "checkpoints") if (run / "checkpoints").is_dir()
                                                 else []) if _is_write(n) or _is_prune(n)]}
            kills.append(info)
            att["kill"] = info
        elif mode is not None:
            att["missed"] = f"{mode}: the process ended (rc {rc}) before the kill"
            att["stderr"] = a.stderr()[-1500:]
        attempts.append(att)
        if mode is not None and not a.kill_info:
            break  # the run ended on its own (finished or failed): no further kills are possible
    phases: dict[str, int] = {}
    for k in kills:
        phases[k["phase"]] = phases.get(k["phase"], 0) + 1
    final_rc = attempts[-1]["rc"]
    cmp = compare_runs(Path(base["run"]), run)
    reasons = []
    if len(kills) != len(plan):
        reasons.append(f"{len(kills)} of {len(plan)} kills happened")
    if final_rc != 0:
        reasons.append(f"the last restart exited {final_rc}")
    if not cmp["identical"]:
        reasons.append("differs from the uninterrupted run: " + ", ".join(
            k for k in ("metrics.jsonl", "eval.jsonl", "trees", "model/model.safetensors", "optimizer.safetensors")
            if not cmp[k]))
    if cmp["checkpoints left"] != [f"step_{steps:06d}"]:
        reasons.append(f"checkpoints left: {cmp['checkpoints left']}")
    return {"kills": len(kills), "plan": plan, "phases": phases, "attempts": attempts, "compare": cmp,
            "wall_s": round(time.monotonic() - t_start, 1), "pass": not reasons, "reasons": reasons}


def drill_kills(work: Path, n: int, seed: int, steps: int, base: dict | None = None, random_write: bool = True) -> dict:
    overrides = tiny_overrides(steps)
    base = base or baseline(work, overrides)
    res = run_with_kills(work, "killed", overrides, kill_plan(n, seed), base, seed, random_write)
    return {"baseline": base, **res}


def drill_final(work: Path, seed: int, steps: int, base: dict) -> dict:
    """A kill inside the prune that follows the final checkpoint, then a restart."""
    return run_with_kills(work, "killed_final", tiny_overrides(steps), ["final"], base, seed)


# ------------------------------------------------------------------------------ drill: disk full


def _one_error_line(stderr: str) -> dict:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error")]
    return {"error_lines": errors, "stderr_lines": len(lines), "traceback": "Traceback" in stderr}


PAGE = os.sysconf("SC_PAGE_SIZE")


def diskfull_inner(work: Path, variant: str, steps: int, base_run: str | None, size_kib: int) -> dict:
    """Runs inside a private mount namespace: mount, train, fill, resume, unmount."""
    from tracerl.checkpoint import latest_checkpoint, verify_checkpoint

    disk = work / f"disk_{variant}"
    disk.mkdir(parents=True, exist_ok=True)
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(disk)],
                       capture_output=True, text=True)
    if m.returncode:
        return {"skip": f"cannot mount a tmpfs: {m.stderr.strip()}"}
    try:
        run, filler = disk / "run", disk / "filler"
        overrides = tiny_overrides(steps)
        state = {"filled": None}

        def on_event(att: Attempt, name: str, mask: int, inside: bool) -> None:
            # a checkpoint (step 3 or later) is in place and the one before it is gone: stop, fill, continue
            if state["filled"] is not None or not (mask & IN_DELETE and _is_prune(name)) \
                    or name < ".pruning-step_000002":
                return
            if variant == "rows":  # only once the next metrics row needs a page of its own
                size = (run / "metrics.jsonl").stat().st_size
                rows = max(len(_rows(run / "metrics.jsonl")), 1)
                if size % PAGE + 1.1 * size / rows <= PAGE:
                    return
            os.kill(att.proc.pid, signal.SIGSTOP)
            st = os.statvfs(disk)
            free = st.f_bavail * st.f_frsize
            ckpt = sum(p.stat().st_size for p in (run / "checkpoints").rglob("*") if p.is_file())
            leave = ckpt // 2 if variant == "ckpt" else 0
            state["filled"] = {"after": name.removeprefix(".pruning-"), "free_before": free, "checkpoint_bytes": ckpt,
                               "left_free": leave, "metrics_bytes": (run / "metrics.jsonl").stat().st_size,
                               "at_s": round(att.now(), 3)}
            with open(filler, "wb") as f:
                try:
                    f.write(b"\0" * max(free - leave, 0))
                    f.flush()
                except OSError:
                    pass
            st = os.statvfs(disk)
            state["filled"]["free_after_fill"] = st.f_bavail * st.f_frsize
            os.kill(att.proc.pid, signal.SIGCONT)

        t = time.monotonic()
        a = Attempt([*overrides, f"run.dir={run}"], run, work, index=500 + (variant == "full"), on_event=on_event)
        rc = a.wait(600)
        err = a.stderr()
        ckpts = sorted(p.name for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").is_dir() else []
        last = latest_checkpoint(run / "checkpoints")
        res = {"variant": variant, "tmpfs_kib": size_kib, "fill": state["filled"], "rc": rc,
               "wall_s": round(time.monotonic() - t, 2), **_one_error_line(err),
               "checkpoints": ckpts, "last": last.name if last else None,
               "last_verifies": bool(last) and verify_checkpoint(last) is None, "debris": debris(run),
               "metrics_rows": len(_rows(run / "metrics.jsonl")),
               "metrics_partial_tail": not (run / "metrics.jsonl").read_bytes().endswith(b"\n"),
               "stderr_tail": err[-600:]}
        filler.unlink(missing_ok=True)
        t = time.monotonic()
        r = Attempt(["--resume", str(run)], run, work, index=510 + (variant == "full"))
        res["resume_rc"] = r.wait(600)
        res["resume_wall_s"] = round(time.monotonic() - t, 2)
        res["resume_stderr_tail"] = r.stderr()[-600:] if res["resume_rc"] else ""
        if base_run:
            res["compare"] = compare_runs(Path(base_run), run)
        reasons = []
        if state["filled"] is None:
            reasons.append("the disk was never filled (the run ended first?)")
        if rc in (0, None) or rc < 0:
            reasons.append(f"exit code {rc}")
        if len(res["error_lines"]) != 1 or "no space left" not in res["error_lines"][0].lower():
            reasons.append(f"expected one error line naming the full disk, got {res['error_lines']}")
        if res["traceback"]:
            reasons.append("a traceback was printed")
        if not res["last_verifies"]:
            reasons.append(f"the last checkpoint {res['last']} does not verify")
        if res["debris"]:
            reasons.append(f"debris left: {res['debris']}")
        if res["resume_rc"] != 0:
            reasons.append(f"--resume exited {res['resume_rc']}")
        if base_run and not res["compare"]["identical"]:
            reasons.append("the resumed run differs from the uninterrupted one")
        res.update(passed=not reasons, reasons=reasons)
        return res
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def namespace_prefix() -> list[str] | None:
    """`unshare` into a mount namespace of our own (mapped to root when we are not root); None if impossible."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return None
    prefix = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    return prefix if probe.returncode == 0 else None


def drill_diskfull(work: Path, steps: int, base: dict | None, variants=("ckpt", "full", "rows"),
                   size_kib: int = 8192) -> dict:
    prefix = namespace_prefix()
    if prefix is None:
        return {"skip": "cannot make a private mount namespace (unshare --mount, or --user --map-root-user) "
                        "to mount a tmpfs in", "pass": None}
    out = {"runs": []}
    t = time.monotonic()
    for variant in variants:
        p = subprocess.run([*prefix, sys.executable, str(Path(__file__).resolve()), "--inner-diskfull", variant,
                            "--work", str(work), "--steps", str(steps), "--base-run", base["run"] if base else "",
                            "--tmpfs-kib", str(size_kib)],
                           capture_output=True, text=True, env=ENV, timeout=900)
        try:
            res = json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            res = {"variant": variant, "passed": False, "reasons": [f"inner drill failed: {p.stderr[-1500:]}"]}
        out["runs"].append(res)
    out["wall_s"] = round(time.monotonic() - t, 1)
    if all("skip" in r for r in out["runs"]):
        out.update(skip=out["runs"][0]["skip"], **{"pass": None})
    else:
        out["pass"] = all(r.get("passed") for r in out["runs"] if "skip" not in r)
    return out


# ------------------------------------------------------------------------------ main


def summary(name: str, res: dict) -> str:
    if res.get("skip"):
        return f"[{name}] SKIPPED: {res['skip']}"
    verdict = "PASS" if res.get("pass") else "FAIL"
    lines = [f"[{name}] {verdict} in {res.get('wall_s')} s"]
    if "phases" in res:
        lines.append(f"  kills {res['kills']} / plan {res['plan']}; phases {res['phases']}")
        c = res["compare"]
        lines.append("  identical to the uninterrupted run: " + ", ".join(
            f"{k} {'yes' if c[k] else 'NO'}" for k in ("metrics.jsonl", "eval.jsonl", "trees",
                                                       "model/model.safetensors", "optimizer.safetensors")))
    for r in res.get("runs", []):
        if "stopped_after_s" in r:
            lines.append(f"  server {r['mode']}ed during the {r['during']}: trainer rc {r['rc']} after "
                         f"{r['stopped_after_s']} s, {r['error_lines']}, traceback {r['traceback']}, last {r['last']} "
                         f"verifies {r['last_verifies']}; resume rc {r['resume']['rc']}, "
                         f"identical {r['compare']['identical']}")
            continue
        if "skip" in r:
            lines.append(f"  {r.get('variant')}: skipped: {r['skip']}")
            continue
        lines.append(f"  {r.get('variant')}: rc {r.get('rc')}, {r.get('error_lines')}, traceback {r.get('traceback')}, "
                     f"last {r.get('last')} verifies {r.get('last_verifies')}, debris {r.get('debris')}, "
                     f"resume rc {r.get('resume_rc')}, identical "
                     f"{r.get('compare', {}).get('identical')}; {'ok' if r.get('passed') else r.get('reasons')}")
    for reason in res.get("reasons", []):
        lines.append(f"  reason: {reason}")
    return "\n".join(lines)


def _git(*args: str) -> str:
    p = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO)
    return p.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--drill", choices=["kills", "final", "diskfull", "retriever", "all"], default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--variants", nargs="+", choices=["ckpt", "full", "rows"], default=["ckpt", "full", "rows"],
                   help="diskfull: what fills (see the module doc)")
    p.add_argument("--work", help="scratch directory (default: a new temporary one, removed at the end)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--inner-diskfull", help=argparse.SUPPRESS)
    p.add_argument("--base-run", help=argparse.SUPPRESS)
    p.add_argument("--tmpfs-kib", type=int, default=8192, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inner_diskfull:
        print(json.dumps(diskfull_inner(Path(args.work), args.inner_diskfull, args.steps, args.base_run or None,
                                        args.tmpfs_kib)))
        return 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tracerl-drills-"))
    work.mkdir(parents=True, exist_ok=True)
    pin_source(work)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(), "cpus": os.cpu_count(),
              "seed": args.seed, "steps": args.steps, "git_head": _git("rev-parse", "--short", "HEAD"),
              "src_uncommitted_files": len(_git("status", "--porcelain", "src").splitlines()),
              "command": "python bench/drills.py " + " ".join(sys.argv[1:] if argv is None else argv), "drills": {}}
    wanted = ["kills", "final", "diskfull", "retriever"] if args.drill == "all" else [args.drill]
    try:
        base = None
        if {"kills", "final", "diskfull"} & set(wanted):
            base = baseline(work, tiny_overrides(args.steps))
            result["baseline"] = base
        for name in wanted:
            if name == "kills":
                res = drill_kills(work, args.kills, args.seed, args.steps, base)
                res.pop("baseline", None)
            elif name == "final":
                res = drill_final(work, args.seed, args.steps, base)
            elif name == "diskfull":
                res = drill_diskfull(work, args.steps, base, tuple(args.variants))
            else:
                res = drill_retriever(work, args.seed)
            result["drills"][name] = res
            print(summary(name, res), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0 if all(r.get("pass") in (True, None) for r in result["drills"].values()) else 1


# ------------------------------------------------------------------------------ drill: retriever

QA_FILE = "hotpotqa_train_hipporag100.jsonl"  # a train file: the corpus of the server and the questions


def qa_overrides() -> list[str]:
    """A tiny real-QA run whose policy searches at every step: TINY_LEARNING's model and loop on one real-QA
    train file, 64-token turns at T = 0.7 and a small learning rate (so the SFT'd search format survives)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY_LEARNING

    return [*(a for a in TINY_LEARNING if not a.startswith("env.options.")), "env.name=real_qa",
            f"env.options.data_root={DATA}", f"env.options.train_files={QA_FILE}", "env.options.validation_size=8",
            "rollout.max_turn_tokens=64", "rollout.temperature=0.7", "trainer.lr=1e-5", "algo.entropy_coef=0",
            "sft.steps=200"]


class Server:
    """`tracerl serve-retriever --verbose` in its own process; `requests` holds the time of each request."""

    def __init__(self, corpus: Path, port: int, log: Path):
        self.log = open(log, "a")
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "tracerl.cli", "serve-retriever", "--corpus",
                                      str(corpus), "--port", str(port), "--verbose"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
        self.requests: list[float] = []
        self.url = None
        line = self.proc.stdout.readline()  # "serving N documents from F at http://127.0.0.1:PORT/retrieve ..."
        self.log.write(line)
        if " at http://" not in line:
            raise RuntimeError(f"the retrieval server did not start: {line}{self.proc.stderr.read()[-1500:]}")
        self.url = line.split(" at ", 1)[1].split("/retrieve")[0]
        self.port = int(self.url.rsplit(":", 1)[1])
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.write(line)
            if '"POST ' in line:
                self.requests.append(time.monotonic())

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.flush()


def drill_retriever(work: Path, seed: int, steps: int = 6, kill_after: int = 2,
                    modes: tuple[str, ...] = ("kill", "hang")) -> dict:
    """The server is SIGKILLed (`kill`) or SIGSTOPped (`hang`) during the rollout of step kill_after + 1 (its
    first request after checkpoint kill_after); once the trainer has stopped, the server is back (restarted
    at the same address, or SIGCONT) and `--resume` finishes the run."""
    from tracerl.checkpoint import latest_checkpoint, verify_checkpoint

    corpus = DATA / QA_FILE
    if not corpus.is_file():
        return {"skip": f"no real-QA data at {corpus}", "pass": None}
    t_start = time.monotonic()
    common = qa_overrides()
    p = subprocess.run([sys.executable, "-c", "import sys; from tracerl.config import load_config; "
                        "from tracerl.setup import warm_start; print(warm_start(load_config(None, sys.argv[1:]), "
                        "log=lambda *a, **k: None))", *common], capture_output=True, text=True, env=ENV, cwd=REPO,
                       timeout=900)
    if p.returncode:
        return {"pass": False, "reasons": [f"the SFT warm start failed: {p.stderr[-1500:]}"]}
    sft_dir = p.stdout.strip().splitlines()[-1]
    server = Server(corpus, 0, work / "server.log")
    timeout, retries, backoff = 2.0, 2, 0.5  # backoff: RetrievalClient's default
    overrides = [*common, "model.preset=path", f"model.path={sft_dir}", "trainer.checkpoint_every=1",
                 "trainer.keep_checkpoints=1", f"trainer.steps={steps}", "trainer.tensorboard=false", "run.threads=1",
                 f"env.options.retriever_url={server.url}", f"env.options.retriever_timeout={timeout:g}",
                 f"env.options.retriever_retries={retries}"]
    res: dict = {"sft_dir": sft_dir, "warm_start_s": round(time.monotonic() - t_start, 1), "url": server.url,
                 "client": {"timeout_s": timeout, "retries": retries, "backoff_s": backoff,
                            "bound_per_request_s": (retries + 1) * timeout + backoff * (2 ** retries - 1)},
                 "runs": []}
    reasons = []
    try:
        ref = work / "qa_uninterrupted"
        shutil.rmtree(ref, ignore_errors=True)
        a = Attempt([*overrides, f"run.dir={ref}"], ref, work, index=700)
        n0 = len(server.requests)
        res["uninterrupted"] = {"rc": a.wait(600), "wall_s": round(a.now(), 2), "requests": len(server.requests) - n0}
        if res["uninterrupted"]["rc"] != 0:
            raise RuntimeError(f"the uninterrupted real-QA run failed: {a.stderr()[-1500:]}")
        res["tool_calls_per_step"] = [r.get("tool_calls", 0) for r in json_rows(ref / "metrics.jsonl")]
        for i, mode in enumerate(modes):
            run = work / f"qa_{mode}"
            shutil.rmtree(run, ignore_errors=True)
            a = Attempt([*overrides, f"run.dir={run}"], run, work, index=710 + i)
            while a.proc.poll() is None and a.count["ckpt"] < kill_after:
                time.sleep(0.002)
            seen = len(server.requests)
            while a.proc.poll() is None and len(server.requests) == seen:  # the next step's rollout has begun
                time.sleep(0.001)
            phase, _ = a.phase()
            if mode == "kill":
                server.kill()
            else:
                os.kill(server.proc.pid, signal.SIGSTOP)
            t_kill = time.monotonic()
            rc = a.wait(300)
            stop_s = time.monotonic() - t_kill
            err = a.stderr()
            last = latest_checkpoint(run / "checkpoints")
            k = {"mode": mode, "at_s": round(t_kill - a.t0, 2), "during": f"rollout of step {kill_after + 1}",
                 "trainer_phase": phase, "rc": rc, "stopped_after_s": round(stop_s, 2), **_one_error_line(err),
                 "last": last.name if last else None,
                 "last_verifies": bool(last) and verify_checkpoint(last) is None, "debris": debris(run),
                 "stderr_tail": err[-600:]}
            res["runs"].append(k)
            why = []
            if rc in (0, None) or rc < 0:
                why.append(f"the trainer exited {rc} once the server was {mode}ed")
            if len(k["error_lines"]) != 1 or "retriev" not in k["error_lines"][0]:
                why.append(f"expected one error line naming the retrieval server, got {k['error_lines']}")
            if k["traceback"]:
                why.append("a traceback was printed")
            if stop_s > res["client"]["bound_per_request_s"] + 20:
                why.append(f"the trainer took {stop_s:.1f} s to stop")
            if not k["last_verifies"] or k["debris"] or k["last"] != f"step_{kill_after:06d}":
                why.append(f"last checkpoint {k['last']} verifies {k['last_verifies']}, debris {k['debris']}")
            if mode == "kill":
                server = Server(corpus, server.port, work / "server.log")  # back, at the same address
            else:
                os.kill(server.proc.pid, signal.SIGCONT)
            r = Attempt(["--resume", str(run)], run, work, index=720 + i)
            k["resume"] = {"rc": r.wait(600), "wall_s": round(r.now(), 2), "resumed": "resumed from" in r.stdout(),
                           "stderr_tail": r.stderr()[-600:]}
            if k["resume"]["rc"] != 0:
                why.append(f"--resume exited {k['resume']['rc']}")
            k["compare"] = compare_runs(ref, run)
            if not k["compare"]["identical"]:
                why.append("the resumed run differs from the uninterrupted one")
            k["passed"], k["reasons"] = not why, why
            reasons += [f"{mode}: {w}" for w in why]
    except (RuntimeError, OSError) as e:
        reasons.append(str(e)[-1500:])
    finally:
        if server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
    res.update(wall_s=round(time.monotonic() - t_start, 1), reasons=reasons, **{"pass": not reasons})
    return res


def json_rows(path: Path) -> list[dict]:
    from tracerl.runlog import read_jsonl

    return read_jsonl(path) if path.is_file() else []


if __name__ == "__main__":
    sys.exit(main())
