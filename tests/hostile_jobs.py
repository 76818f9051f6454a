"""The job side of the hostile client test (hostile_client_test.py): the
lmps_local launcher wrapper, waits with deadlines, and what a broken job
looks like in the launcher's output and the daemons' logs (a crash, a
restart, a replication reaction), plus the comparison of two exported
models. Helpers only; the test is hostile_client_test.py.
"""

import json
import math
import os
import re
import signal
import struct
import subprocess
import time

import grpc

LAUNCHER_FLAGS = ["--restart_workers=0", "--restart_job=0",
                  "--restart_scheduler=0", "--timeout_s=240"]

# Launcher lines and log lines that mean a daemon crashed, was restarted,
# or replication reacted to something (none may appear).
BAD_LAUNCHER = [
    "was killed by signal", "exited with status", "restarting",
    "starting a replacement", "serves on", "spare worker takes over",
    "lmps: error",
]
BAD_LOG = [
    "took over as the primary", "fenced off", "detached:", "diverged on",
    "cannot take over", "acknowledging nothing", "serving without the backup",
    "still serving alone", "holds its primary's snapshot",
    "terminate called", "Segmentation fault", "double free or corruption",
    "corrupted size", "malloc(): ", "free(): ",
    "AddressSanitizer", "Check failed", "assertion failed", "core dumped",
    "*** SIG", "the job failed",
]


class TestFailure(Exception):
    pass


def log(msg):
    now = time.time()
    print("hostile_client_test %s.%03d: %s" % (
        time.strftime("%H:%M:%S", time.localtime(now)), int(now * 1000) % 1000, msg),
        flush=True)


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def wait_for(what, fn, timeout, launcher=None, interval=0.1):
    """Polls fn until truthy; the error names `what` and the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        if launcher is not None and launcher.poll() is not None:
            raise TestFailure("lmps_local exited (%s) while waiting for %s"
                              % (launcher.returncode, what))
        try:
            value = fn()
            if value:
                return value
            last = value
        except grpc.RpcError as e:
            last = "%s: %s" % (e.code(), e.details())
        except OSError as e:
            last = str(e)
        if time.monotonic() > deadline:
            raise TestFailure("timed out after %ss waiting for %s (last: %r)"
                              % (timeout, what, last))
        time.sleep(interval)


# --- jobs ---------------------------------------------------------------------------


class Launcher:
    """lmps_local in its own process group, output to run_dir/launcher.out."""

    def __init__(self, bin_dir, run_dir, job_file):
        self.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        self.out_path = os.path.join(run_dir, "..", os.path.basename(run_dir) + ".out")
        out = open(self.out_path, "wb")
        self.proc = subprocess.Popen(
            [os.path.join(bin_dir, "launcher/lmps_local"), "--job=" + job_file,
             "--run_dir=" + run_dir, "--quiet"] + LAUNCHER_FLAGS,
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        out.close()
        self.started = time.monotonic()

    def poll(self):
        return self.proc.poll()

    @property
    def returncode(self):
        return self.proc.returncode

    def wait(self, timeout):
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TestFailure("lmps_local did not finish within %ss" % timeout)
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()

    def output(self):
        with open(self.out_path, errors="replace") as f:
            return f.read()


def read_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        b, e = meta["data_offsets"]
        out[name] = (meta["dtype"], tuple(meta["shape"]), data[b:e])
    return out


def compare_models(a_path, b_path):
    """'' when every tensor is bit-identical, else what differs."""
    a, b = read_safetensors(a_path), read_safetensors(b_path)
    if sorted(a) != sorted(b):
        return "tensor names differ: %s vs %s" % (sorted(a), sorted(b))
    diffs = []
    for name in sorted(a):
        da, sa, xa = a[name]
        db, sb, xb = b[name]
        if (da, sa) != (db, sb):
            diffs.append("%s: %s%s vs %s%s" % (name, da, sa, db, sb))
        elif xa != xb:
            worst = 0.0
            if da == "F32":
                fa = struct.unpack("<%df" % (len(xa) // 4), xa)
                fb = struct.unpack("<%df" % (len(xb) // 4), xb)
                for x, y in zip(fa, fb):
                    d = abs(x - y)
                    if not d <= worst:
                        worst = d if not math.isnan(d) else float("inf")
            diffs.append("%s (max |diff| %g)" % (name, worst))
    return "; ".join(diffs)


LOG_TIME = re.compile(r"^\[[^\]]+\] (\d\d):(\d\d):(\d\d\.\d+) ")


def log_time(line):
    """Seconds of the day of a daemon's log line, or None."""
    m = LOG_TIME.match(line)
    return None if m is None else (
        int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3)))


def exit_time(path):
    """When a server logged that the job finished and it exits, or None."""
    with open(path, errors="replace") as f:
        for line in f:
            if "job finished at version" in line:
                return log_time(line)
    return None


def scan_logs(run_dir):
    """Bad lines in the daemons' logs and restart/attempt log files."""
    found = []
    logs = os.path.join(run_dir, "logs")
    for name in sorted(os.listdir(logs)):
        if ".restart" in name or ".attempt" in name:
            found.append("%s exists (a daemon was restarted)" % name)
        # The job's end: the backup exits once it learns the job finished,
        # its primary a heartbeat later. A hostile call the primary forwards
        # in between finds no backup, and the primary logs that its backup
        # failed: the job's shutdown order, not a hostile effect (every step
        # is applied by then; the final parameters are compared below). A
        # call after the primary's own end is refused before it is
        # forwarded (ReplicatedShard::Shutdown). The scheduler relays such a
        # report too; its lines carry no time, so there the job's end is its
        # own "-> FINISHED" line.
        backup_gone = None
        job_finished = False
        if name.startswith("server-"):
            backup_log = os.path.join(logs, name.replace("server-", "backup-", 1))
            if os.path.exists(backup_log):
                backup_gone = exit_time(backup_log)
        with open(os.path.join(logs, name), errors="replace") as f:
            for line in f:
                t = log_time(line)
                if (backup_gone is not None and t is not None and
                        t >= backup_gone and "backup" in line):
                    continue
                if name == "scheduler.log":
                    if "job state " in line and "-> FINISHED" in line:
                        job_finished = True
                    if job_finished and "backup" in line:
                        continue
                for bad in BAD_LOG:
                    if bad in line:
                        found.append("%s: %s" % (name, line.strip()[:400]))
                        break
    return found


def scan_self_check(tmp):
    """scan_logs must flag a backup failure before the job's end and skip it
    after: in the primary's log from the backup's exit on, in the
    scheduler's relay of it from its "-> FINISHED" line on (seed 1660855889:
    the backup had exited, a hostile push reached the primary, the
    scheduler relayed the primary's report)."""
    failed = ("server-0 (127.0.0.1:1): shard 0: backup at 127.0.0.1:2 failed: "
              "unreachable; acknowledging nothing until the scheduler allows "
              "serving without it (epoch 1)")
    logs = os.path.join(tmp, "scan_self_check", "logs")
    os.makedirs(logs)
    def scan(files):
        for name in os.listdir(logs):
            os.remove(os.path.join(logs, name))
        for name, lines in files.items():
            with open(os.path.join(logs, name), "w") as f:
                f.write("".join(line + "\n" for line in lines))
        return scan_logs(os.path.dirname(logs))
    finished = "[scheduler] job state RUNNING -> FINISHED: every worker reported done"
    exited = "[server-0] 10:00:01.000 job finished at version 150; exiting"
    check(len(scan({"scheduler.log": ["[scheduler] " + failed, finished]})) == 1,
          "scan_logs: a relayed backup failure before FINISHED is not flagged")
    check(not scan({"scheduler.log": [finished, "[scheduler] " + failed]}),
          "scan_logs: a relayed backup failure after FINISHED is flagged")
    check(len(scan({"server-0.log": ["[server-0] 10:00:00.500 " + failed],
                    "backup-0.log": [exited]})) == 1,
          "scan_logs: a backup failure before the backup's exit is not flagged")
    check(not scan({"server-0.log": ["[server-0] 10:00:01.500 " + failed],
                    "backup-0.log": [exited]}),
          "scan_logs: a backup failure after the backup's exit is flagged")


