"""Faults for real: `kill -9` of `main.py --mode train`, damaged checkpoints, a non-finite loss.

One uninterrupted run of the (shortened) demo config with an EMA teacher and a checkpoint after
every step is the reference; the other runs start from it or are compared with it.
"""
import contextlib
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import run_config
from allspark_jax import errors
from allspark_jax import checkpoints
from allspark_jax import nonfinite

MAIN = os.path.join(run_config.ROOT, "main.py")
DEMO = "configs/demo.py"
FAULT_OVERRIDES = {"train.teacher": "ema", "train.epochs": 3, "checkpoint_every_steps": 1,
                   "log_every_steps": 1}
STEPS = 12  # 3 epochs of 4 steps; evaluations at 4, 8, 12
SEED = 14
KILLS = 5  # restarts after a kill; the run then ends by itself
LINE_TIMEOUT = 300  # seconds a run may go without printing the line a test waits for


class MainProcess:
    """`main.py` in a subprocess whose output lines are read as they come (a reader thread).

    `--verbose`: the absl log lines that the tests wait for ("Writing checkpoint", "Resumed from
    step") go to the console too, not only to the workdir's log file."""

    def __init__(self, workdir, *args, env=None, **overrides):
        self.proc = subprocess.Popen(
            [sys.executable, MAIN, "--verbose", "--config", DEMO, "--workdir", str(workdir), *args,
             *run_config.cli_flags(**{**FAULT_OVERRIDES, **overrides})],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=run_config.ROOT,
            env=env or run_config.subprocess_env())
        self.log, self._lines, self._ended = [], queue.Queue(), False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, pattern: str, timeout: float = LINE_TIMEOUT):
        """The match of the first new line matching `pattern`, or None when the output ends first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n"
                                     + self.output()[-5000:]) from None
            if line is None:
                self._ended = True
                return None
            self.log.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)

    def _read_queued(self, timeout: float | None) -> str:
        """Moves the reader's lines into the log until the queue is empty (after waiting up to
        `timeout` seconds for each line; None: not at all) or the process's output ended."""
        while not self._ended:
            try:
                line = self._lines.get(timeout=timeout) if timeout else self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._ended = True
            else:
                self.log.append(line)
        return self.output()

    def drain(self) -> str:
        """The output so far: the lines read without waiting for more."""
        return self._read_queued(None)

    def finish(self, timeout: float = LINE_TIMEOUT) -> tuple[int, str]:
        """(exit status, whole output) once the process ends by itself."""
        self.wait_for(r"(?!)", timeout)  # reads to the end
        return self.proc.wait(timeout=60), self.output()

    def output(self) -> str:
        return "".join(self.log)

    def rest_of_output(self) -> str:
        """The whole output of a process that has ended (the lines not read yet included)."""
        return self._read_queued(10)


def restore(workdir, spec="latest"):
    config = run_config.tiny_config(**{k.replace(".", "__"): v for k, v in FAULT_OVERRIDES.items()})
    ck = checkpoints.Checkpointer(workdir, read_only=True)
    return ck.restore(spec, checkpoints.restore_template(config))


def assert_bitwise_equal(a, b):
    la, lb = (jax.tree_util.tree_leaves_with_path(jax.tree.map(np.asarray, s)) for s in (a, b))
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert x.tobytes() == y.tobytes(), f"{jax.tree_util.keystr(path)} differs"


def complete_steps(folder) -> list[int]:
    """The committed checkpoints in `folder`: orbax writes `<step>.orbax-checkpoint-tmp-*` and renames
    it to `<step>` once every process has written its part (a log line of the run comes before
    that; the write goes on in the background)."""
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def writing(folder, step: int) -> bool:
    """Whether `step`'s checkpoint in `folder` is being written (its temporary directory exists)."""
    prefix = f"{step}.orbax-checkpoint-tmp"
    return os.path.isdir(folder) and any(n.startswith(prefix) for n in os.listdir(folder))


POLL_S = 0.005


def wait_until(condition, what: str, procs, timeout: float = LINE_TIMEOUT):
    """Polls `condition()` until it holds. Fails, naming `what` and showing the output, when one of
    `procs` (MainProcess) ends first or when `timeout` s pass (only a failing test waits that long)."""
    deadline = time.monotonic() + timeout
    while not condition():
        ended = [p for p in procs if p.proc.poll() is not None]
        if (ended or time.monotonic() > deadline) and not condition():
            why = (f"a process ended (exit status {ended[0].proc.returncode})" if ended
                   else f"not within {timeout} s")
            raise AssertionError(f"waiting for {what}: {why}:\n"
                                 + "\n".join(p.drain()[-5000:] for p in procs))
        time.sleep(POLL_S)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (checkpoints/11, checkpoints/12 and the best one are left)."""
    workdir = tmp_path_factory.mktemp("reference")
    rc, out = MainProcess(workdir).finish()
    assert rc == 0, out[-5000:]
    return workdir


def kill_plan(rng) -> list[str]:
    """The kinds of the KILLS kills, drawn before the runs so that how far a run gets before its
    kill (a host's speed) cannot change them. Both writes come among the first three kills, which
    each end at most 3 steps past the newest checkpoint (a step kill a few more, during its sleep of
    at most 0.3 s): a write needs a step still to write, and only a finished run (all 12 steps
    done) turns a kill into a startup kill."""
    return rng.sample(["write", "write", "step"], 3) + rng.sample(["step", "startup"], 2)


def test_kill_9_at_random_moments_then_resume_ends_bitwise_equal(reference, tmp_path):
    rng = random.Random(SEED)
    workdir = tmp_path / "killed"
    kills, cut_writes, t0 = [], 0, time.monotonic()
    for planned in kill_plan(rng):
        done = max(complete_steps(workdir / checkpoints.LATEST_DIR)
                   + complete_steps(workdir / checkpoints.BEST_DIR) + [0])
        kind = "startup" if done == STEPS else planned
        target = min(done + rng.randint(1, 3), STEPS)
        run = MainProcess(workdir)
        if kind == "startup":  # during the restore and compilation
            assert run.wait_for(r"steps/epoch \d+") is not None, run.output()[-5000:]
            time.sleep(rng.uniform(0.0, 1.0))
        elif kind == "write":  # as a checkpoint is being written
            folder = rng.choice([checkpoints.LATEST_DIR, checkpoints.BEST_DIR])
            if target != 4:  # the best is written after an evaluation (4, 8, 12) that improved
                folder = checkpoints.LATEST_DIR
            match = run.wait_for(rf"Writing checkpoint \S*/{folder}/{target}$")
            assert match is not None, run.output()[-5000:]
            # The line comes before orbax starts writing: kill once the write is on disk, and
            # before it is committed (the next poll could come after the commit on a fast host)
            wait_until(lambda: writing(workdir / folder, target)
                       or target in complete_steps(workdir / folder),
                       f"checkpoint {folder}/{target} on disk", [run])
        else:  # at a random moment after a step
            assert run.wait_for(rf"\[{target}\] train/epoch=") is not None, run.output()[-5000:]
            time.sleep(rng.uniform(0.0, 0.3))
        run.kill()
        if kind == "write":
            cut_writes += any(".orbax-checkpoint-tmp" in n
                              for n in os.listdir(workdir / folder))
        kills.append((kind, target))
        print(f"kill {len(kills)}: {kind} at step {target} ({time.monotonic() - t0:.0f} s)")
    rc, out = MainProcess(workdir).finish()
    assert rc == 0, out[-5000:]
    assert len(kills) == KILLS and sum(kind == "write" for kind, _ in kills) >= 2, kills
    assert cut_writes >= 1, f"no kill interrupted a checkpoint write: {kills}"
    state, meta, step = restore(workdir)
    ref_state, ref_meta, ref_step = restore(reference)
    assert step == ref_step == STEPS
    assert_bitwise_equal(state, ref_state)


def damage_step(workdir, step: int, how: str) -> list[str]:
    """Truncates or deletes the largest (array data) file of every copy of `step`."""
    damaged = []
    for folder in (checkpoints.LATEST_DIR, checkpoints.BEST_DIR):
        state_dir = os.path.join(workdir, folder, str(step), "state")
        if not os.path.isdir(state_dir):
            continue
        files = [os.path.join(d, n) for d, _, names in os.walk(state_dir) for n in names]
        target = max(files, key=os.path.getsize)
        if how == "truncate":
            with open(target, "r+b") as f:
                f.truncate(os.path.getsize(target) // 2)
        else:
            os.remove(target)
        damaged.append(os.path.join(workdir, folder, str(step)))
    return damaged


def test_resume_skips_a_truncated_newest_checkpoint_and_ends_bitwise_equal(reference, tmp_path):
    workdir = tmp_path / "truncated"
    shutil.copytree(reference, workdir)
    damaged = damage_step(workdir, STEPS, "truncate")
    rc, out = MainProcess(workdir).finish()
    assert rc == 0, out[-5000:]
    for path in damaged:
        assert re.search(rf"Skipping checkpoint {re.escape(path)}, which cannot be restored: "
                         r"\w+: \S", out), out[-5000:]
        assert os.path.isdir(path + ".unreadable")  # set aside, kept for inspection
    assert f"Resumed from step {STEPS - 1}" in out
    state, _, step = restore(workdir)
    ref_state, _, _ = restore(reference)
    assert step == STEPS
    assert_bitwise_equal(state, ref_state)


def test_eval_latest_skips_a_newest_checkpoint_with_a_deleted_file(reference, tmp_path):
    workdir = tmp_path / "deleted"
    shutil.copytree(reference, workdir)
    damaged = damage_step(workdir, STEPS, "delete")
    rc, out = MainProcess(workdir, "--mode", "eval", "--checkpoint", "latest").finish()
    assert rc == 0, out[-5000:]
    for path in damaged:
        assert re.search(rf"Skipping checkpoint {re.escape(path)}, which cannot be restored: "
                         r"\w+: \S", out), out[-5000:]
        assert os.path.isdir(path)  # evaluation changes nothing
    assert f"(step {STEPS - 1})" in out  # the table's title names the step evaluated


@pytest.mark.parametrize("poison,message", [
    ("params", r"non-finite loss at step 12: loss=nan, loss_x=nan, loss_u=nan"),
    ("opt_state", r"non-finite values in ema_params, opt_state, params of the train state after "
                  r"step 12"),
], ids=["nan-params", "inf-momentum"])
def test_non_finite_values_stop_the_run_without_a_checkpoint(reference, tmp_path, poison, message):
    """Step 11's checkpoint gets a NaN weight (the next loss is NaN) or an infinite momentum (the
    next loss is finite, the next state is not); the run resumed from it stops at step 12."""
    workdir = tmp_path / poison
    shutil.copytree(reference, workdir)
    for folder in (checkpoints.LATEST_DIR, checkpoints.BEST_DIR):
        shutil.rmtree(workdir / folder / str(STEPS), ignore_errors=True)
    state, meta, step = restore(workdir, STEPS - 1)
    leaves, treedef = jax.tree.flatten(getattr(state, poison))
    i = next(i for i, x in enumerate(leaves) if x.dtype == np.float32 and x.ndim)
    leaves[i] = np.full(leaves[i].shape, np.nan if poison == "params" else np.inf, np.float32)
    state = state.replace(**{poison: jax.tree.unflatten(treedef, leaves)})
    shutil.rmtree(workdir / checkpoints.LATEST_DIR / str(STEPS - 1))
    ck = checkpoints.Checkpointer(workdir)
    ck.save(step, state, meta)
    ck.wait()
    ck.close()
    rc, out = MainProcess(workdir).finish()
    assert rc == 1, out[-5000:]
    assert re.search(r"error: " + message + r"\. Training stopped \(train.stop_on_nan\) without "
                     r"checkpointing this state; the newest checkpoint is step 11", out), out[-5000:]
    assert complete_steps(workdir / checkpoints.LATEST_DIR) == [STEPS - 1]
    assert STEPS not in complete_steps(workdir / checkpoints.BEST_DIR)


def test_loss_watch_names_the_first_non_finite_step():
    watch = nonfinite.LossWatch(True)
    for step, loss in [(1, 1.0), (2, np.inf), (3, np.nan)]:
        watch.add(step, {"loss": jax.numpy.float32(loss), "loss_x": jax.numpy.float32(0.5),
                         "loss_u": jax.numpy.float32(loss)})
    with pytest.raises(errors.NonFiniteError,
                       match=r"non-finite loss at step 2: loss=inf, loss_x=0.5, loss_u=inf"):
        watch.check()
    watch.check()  # the checked steps are gone
    disabled = nonfinite.LossWatch(False)
    disabled.add(1, {"loss": jax.numpy.float32(np.nan)})
    disabled.check()


def test_nonfinite_parts_names_the_state_fields():
    from allspark_jax.state import TrainState
    ok = np.ones((2, 3), np.float32)
    state = TrainState(step=np.int32(3), params={"w": ok}, batch_stats={"m": ok},
                       memory={"q": ok, "ptr": np.zeros(2, np.int32)}, opt_state=({"w": ok},),
                       ema_params=None, ema_batch_stats=None, rng=np.zeros(2, np.uint32))
    assert nonfinite.nonfinite_parts(state) == []
    bad = ok.copy()
    bad[1, 2] = np.nan
    assert nonfinite.nonfinite_parts(state.replace(memory={"q": bad, "ptr": np.zeros(2, np.int32)},
                                                   opt_state=({"w": -np.inf * ok},))) == [
        "memory", "opt_state"]


HEARTBEAT_S = 10
# Two processes compete for the cores of a small host (each compiles every program): a loaded 2-core
# CI host needs longer than LINE_TIMEOUT for a run; only a failing test waits that long.
TWO_PROCESS_TIMEOUT = 2 * LINE_TIMEOUT


def two_processes(workdir, port, heartbeat_s=None):
    """Processes 0 and 1 of a run on 127.0.0.1 (one CPU device each); `heartbeat_s`: JAX's heartbeat
    timeout (None: the default, which no process of a healthy run comes near on a loaded host)."""
    procs = []
    overrides = {"train.epochs": 1}  # 4 steps, the memory not yet read: one train step to compile
    if heartbeat_s is not None:
        overrides["distributed.heartbeat_timeout_seconds"] = heartbeat_s
    for pid in (0, 1):
        env = {**run_config.subprocess_env(), "ALLSPARK_COORDINATOR": f"127.0.0.1:{port}",
               "ALLSPARK_NUM_PROCESSES": "2", "ALLSPARK_PROCESS_ID": str(pid)}
        procs.append(MainProcess(workdir, env=env, **overrides))
    return procs


@contextlib.contextmanager
def reaped(procs):
    """Kills what is still running of `procs` on the way out (a failed test leaves nothing); after a
    failure, prints the whole output of each (pytest shows it with the failure)."""
    try:
        yield procs
    except BaseException:
        for p in procs:
            if p.proc.poll() is None:
                p.kill()
        for i, p in enumerate(procs):
            print(f"===== process {i} (exit status {p.proc.returncode}) =====\n"
                  + p.rest_of_output())
        raise
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.kill()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_process_stops_the_other_and_both_resume(tmp_path):
    """Process 1 dies once the run's first checkpoint is committed on disk (orbax renamed it after
    both processes wrote their parts; a log line of step 1 or 2 can come while the write still goes
    on): process 0's next collective fails at once (or, when it waits elsewhere, JAX's heartbeat
    check ends it). A dead coordinator (process 0) ends process 1 through the same JAX check,
    within a second when tried by hand; not run here, to keep the test short. Restarted, both
    processes resume from the same checkpoint and end with exit status 0."""
    workdir = tmp_path / "two"
    victim = 1
    with reaped(two_processes(workdir, free_port(), HEARTBEAT_S)) as procs:
        wait_until(lambda: complete_steps(workdir / checkpoints.LATEST_DIR),
                   "a committed checkpoint", procs, TWO_PROCESS_TIMEOUT)
        procs[victim].kill()
        killed = time.monotonic()
        rc, out = procs[1 - victim].finish(timeout=HEARTBEAT_S + 120)
        waited = time.monotonic() - killed
        assert rc != 0, out[-5000:]
        assert waited < HEARTBEAT_S + 50, (victim, waited)
        assert re.search(rf"error: process {1 - victim} of 2 stopped: .*\nWhen another process of "
                         r"the run dies|Terminating process because the JAX distributed service "
                         r"detected fatal errors. This most likely indicates that another task "
                         r"died", out), out[-5000:]
    with reaped(two_processes(workdir, free_port())) as procs:
        results = [p.finish(TWO_PROCESS_TIMEOUT) for p in procs]
        resumed = [re.search(r"Resumed from step ([1-4]) ", out) for _, out in results]
        for (rc, out), match in zip(results, resumed):
            assert rc == 0, out[-5000:]
            assert match, out[-5000:]
        assert resumed[0][1] == resumed[1][1], [m[0] for m in resumed]
