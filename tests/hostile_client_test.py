#!/usr/bin/python3
"""Hostile clients: random and malformed requests to every RPC of every daemon.

The same small job runs twice with lmps_local: once plainly, once while a
hostile client (Debian's python3-grpcio; it learns every service and method
of every daemon through server reflection, grpc.reflection.v1alpha, like
reflection_client_test.py) hammers the scheduler, every parameter-server
node (primaries and backups) and every worker's WorkerPeer service. The job
has every service: dp 1 x pp 2 (workers serve WorkerPeer), 2 shards with
layout.shard_backups = 1 in SYNC (backups serve Replicate).

For every method of every daemon the client sends, with seeded randomness:
  - random bytes as the request (or as each message of a stream);
  - truncated or garbled encodings (bit flips, inserted or repeated bytes,
    cut at a random byte) of a message the daemon must refuse;
  - messages with random field values: huge and negative sizes, steps,
    ranks and offsets, wrong shard ids and partition versions, unknown
    tensors and chunks, NaN and Inf floats, empty and enormous strings and
    payloads (up to 2 MiB, under every daemon's message-size cap), invalid
    enum values;
  - for streaming methods, streams that are half-closed early, cancelled
    mid-way, or run into a tiny deadline; server streams cancelled after
    0 or 1 message; grpc.health.v1 Check/Watch and the reflection stream
    itself get garbage too.

THE RULE (what the client never sends). Without authentication every
daemon obeys any well-formed control call (docs/security.md), so a hostile
request must be one the protocol says the daemon refuses, or a pure read.
Before anything is sent, the client decodes its bytes with the method's
request type (Debian's python3-protobuf is the daemons' C++ runtime); if
they decode, the message must pass guard() below, else it is withheld
(counted). For a client stream EVERY prefix of the decodable messages must
pass: a daemon that meets an undecodable message mid-stream processes the
messages before it as if the client had half-closed (seen). Per method:
  Scheduler.GetStatus, GetAssignment (any node id, real ones too),
  ParameterServer.Pull, GradNorm, GetTensorInfo, Health, reflection:
      reads; anything goes (waits end at a deadline of at most 3 s).
  Scheduler.Register: the role is not SERVER or WORKER, or the address is
      empty (servers always, workers of this pp = 2 job too), or it is a
      rejoin naming a rank < 0 or >= 1000 (InvalidArgument before any
      state changes).
  Scheduler.Heartbeat: the node id is never a node of the job (nor
      anything shaped like "server-N", "backup-N", "worker-N").
  ParameterServer.Push (and pushes inside Replicate): the stream has mixed
      headers, or a wrong partition_version, or dp/pp/tp rank outside the
      layout, or a step < 0 (acknowledged as an old duplicate, changing
      nothing) or > train.steps (never reached), or a slice with an
      invalid dtype (unset is F32, as in the daemons), a (tensor, chunk)
      the target shard does not hold, a payload that is not whole
      elements, or a NaN/Inf element. (guard_self_check() pins the
      dtypes: a hole there once let a legitimate push through.)
  ParameterServer.Apply (and inside Replicate): global_sum_squares NaN,
      Inf or negative, or a step already applied (below a version read
      from that shard's primary before the call: answered idempotently),
      or a step > train.steps.
  ParameterServer.StopAt (and inside Replicate): step < 1, or below a
      version read before the call ("past the requested stop step").
  ParameterServer.Replicate: additionally an unset or mixed op, a shard id
      that is not the receiver's, or a snapshot covering fewer elements
      than the receiving shard holds (RestoreFrom refuses it). The
      `primary` field is always a garbage id.
  WorkerPeer.Send: the sender of every message is not a worker of the job
      (a worker's mailbox takes transfers only from the job's workers,
      PeerMailbox::SetSenders: before, such garbage filled it until the
      job's own activations were refused, "peer mailbox full").
The client starts only once the job is RUNNING with every node registered,
so a Register could never take a slot anyway. The answers are checked
too: an OK to Register, Heartbeat or StopAt, a Push that accepted chunks, a
Send that stored elements, a Replicate snapshot or stop_at answered OK all
fail the test (the daemon accepted what it must refuse).

Regression seeds (REGRESSION_SEEDS) are requests that once crashed a
daemon; they are sent once as the attack begins. One is a KNOWN BUG not
fixed yet (server/replication.cc, see the comment there): until it is
fixed this test FAILS with "backup-N was killed by signal 6"; the random
part finds it too, now and then. --no_regression_seeds leaves them out.

Assertions: both runs exit 0; the final model.safetensors are bit-identical
(every tensor's bytes); no daemon crashed, was restarted, took over, was
fenced or detached its backup (launcher output and every log); every method
of every daemon was called; every daemon kind (scheduler, primary, backup,
worker) answered lmps calls with something other than UNAVAILABLE; every
daemon still answers once the main hostile phase ends; the hostile phase
overlapped most of the job.

Seeded: --seed=N (or LMPS_HOSTILE_SEED=N; under Bazel --test_arg=--seed=N)
replays the same requests (not their timing); the seed is printed first.
--trace=FILE writes every request sent (to find the one that hurt).

Usage: hostile_client_test.py --bin_dir=DIR (holding launcher/lmps_local
and the daemons).
"""

import argparse
import collections
import json
import math
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import grpc
from google.protobuf import descriptor
from google.protobuf import descriptor_pool

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reflection_client_test as rct  # noqa: E402  (compile_protos, Reflection)

STEPS = 150
JOB = """name: "hostile"
model { n_layer: 2 n_head: 2 n_embd: 32 block_size: 16 }
train { steps: %d batch_size: 8 micro_batches: 2 eval_interval: 50
        checkpoint_interval: 50 debug_slow_worker_rank: 0
        debug_slow_worker_delay_ms: 60 }
max_chunk_bytes: 4096
layout { pp: 2 num_shards: 2 shard_backups: 1 }
""" % STEPS
LAUNCHER_FLAGS = ["--restart_workers=0", "--restart_job=0",
                  "--restart_scheduler=0", "--timeout_s=240"]
HOSTILE_THREADS = 3
PHASE1_END = 0.75        # main hostile phase until this fraction of the steps
MAX_START_FRACTION = 0.35  # the hostile client must start before this
MAX_BLOB = 2 << 20       # enormous strings/bytes; every daemon accepts 64 MiB
READ_DEADLINE_S = 3.0

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

ROLE_SERVER, ROLE_WORKER = 2, 3


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


# --- what the client knows about the job -------------------------------------------


class Daemon:
    def __init__(self, label, kind, address, shard=-1):
        self.label = label      # "scheduler", "server-0", "backup-1", "worker-0"
        self.kind = kind        # "scheduler", "primary", "backup", "worker"
        self.address = address
        self.shard = shard
        self.channel = None
        self.methods = []       # Method


class Method:
    def __init__(self, service, name, req_cls, resp_cls, client_streaming,
                 server_streaming):
        self.service = service
        self.name = name
        self.path = "/%s/%s" % (service, name)
        self.req_cls = req_cls
        self.resp_cls = resp_cls
        self.client_streaming = client_streaming
        self.server_streaming = server_streaming


class JobInfo:
    def __init__(self, status):
        spec = status.spec
        self.steps = spec.train.steps
        self.dp, self.pp, self.tp = spec.layout.dp, spec.layout.pp, spec.layout.tp
        self.num_shards = spec.layout.num_shards
        self.partition_version = status.partition.version
        self.chunks = [(c.tensor, c.index, c.begin, c.end, c.shard)
                       for c in status.partition.chunks]
        self.chunks_by_shard = collections.defaultdict(list)
        for c in self.chunks:
            self.chunks_by_shard[c[4]].append(c)
        self.held = {k: {(c[0], c[1]) for c in v}
                     for k, v in self.chunks_by_shard.items()}
        self.shard_elements = {k: sum(c[3] - c[2] for c in v)
                               for k, v in self.chunks_by_shard.items()}
        self.tensors = sorted({c[0] for c in self.chunks})
        self.node_ids = {n.node_id for n in status.nodes}
        self._mu = threading.Lock()
        self._version = collections.defaultdict(int)  # shard -> lower bound

    def version_lb(self, shard):
        with self._mu:
            return self._version[shard]

    def saw_version(self, shard, v):
        with self._mu:
            self._version[shard] = max(self._version[shard], v)

    def progress(self):
        with self._mu:
            return min(self._version[k] for k in range(self.num_shards))


NODE_ID_SHAPE = re.compile(r"^(server|backup|worker|scheduler)-?\d*$")


def is_real_id(info, s):
    return s in info.node_ids or bool(NODE_ID_SHAPE.match(s))


# --- the guard: THE RULE of the top comment, on decoded messages -------------------


F32, BF16 = 1, 2
UNSET = 0  # DTYPE_UNSPECIFIED: the daemons read it as F32 (server/tensor_codec.h)
DTYPE_SIZE = {UNSET: 4, F32: 4, BF16: 2}


def non_finite(dtype, data):
    if dtype != BF16:
        n = len(data) // 4
        return any(not math.isfinite(x) for x in struct.unpack("<%df" % n, data[:4 * n]))
    n = len(data) // 2
    for (h,) in struct.iter_unpack("<H", data[:2 * n]):
        if (h & 0x7F80) == 0x7F80:
            return True
    return False


def push_poisoned(info, shard, msgs):
    """True when ParameterShard::Push must refuse (or ignore) this stream."""
    if not msgs:
        return True
    h = msgs[0]
    key = lambda m: (m.dp_rank, m.step, m.partition_version, m.pp_rank, m.tp_rank)
    if any(key(m) != key(h) for m in msgs):
        return True
    if h.partition_version != info.partition_version:
        return True
    if not (0 <= h.dp_rank < info.dp and 0 <= h.pp_rank < info.pp and
            0 <= h.tp_rank < info.tp):
        return True
    if h.step < 0 or h.step > info.steps:
        return True
    for m in msgs:
        for s in m.slices:
            size = DTYPE_SIZE.get(s.dtype, 0)
            if size == 0 or (s.tensor, s.chunk) not in info.held.get(shard, ()):
                return True
            if len(s.data) % size != 0 or non_finite(s.dtype, s.data):
                return True
    return False


def apply_poisoned(info, shard, step, gss):
    return (not math.isfinite(gss) or gss < 0 or step < info.version_lb(shard)
            or step > info.steps)


def stop_poisoned(info, shard, step):
    return step < 1 or step < info.version_lb(shard)


def replicate_poisoned(info, shard, msgs):
    if not msgs:
        return True
    op = msgs[0].WhichOneof("op")
    if op is None or any(m.WhichOneof("op") != op for m in msgs):
        return True
    if any(m.shard != shard for m in msgs):
        return True
    if any(is_real_id(info, m.primary) for m in msgs):
        return False  # the rule: `primary` is always garbage
    if op == "push":
        return push_poisoned(info, shard, [m.push for m in msgs])
    if op == "apply":
        a = msgs[0].apply
        return apply_poisoned(info, shard, a.step, a.global_sum_squares)
    if op == "stop_at":
        return stop_poisoned(info, shard, msgs[0].stop_at.step)
    covered = sum(len(m.snapshot.params) // 4 for m in msgs)
    return covered < info.shard_elements.get(shard, 0)


def guard(info, daemon, method, msgs):
    """THE RULE for one decoded request (a list: the stream, or one message)."""
    name = method.service + "/" + method.name
    if name == "lmps.Scheduler/Register":
        m = msgs[0]
        return (m.role not in (ROLE_SERVER, ROLE_WORKER) or m.address == "" or
                (m.rejoin and not 0 <= m.requested_rank < 1000))
    if name == "lmps.Scheduler/Heartbeat":
        return not is_real_id(info, msgs[0].node_id)
    if name == "lmps.ParameterServer/Push":
        return all(push_poisoned(info, daemon.shard, msgs[:i + 1])
                   for i in range(len(msgs)))
    if name == "lmps.ParameterServer/Apply":
        return apply_poisoned(info, daemon.shard, msgs[0].step,
                              msgs[0].global_sum_squares)
    if name == "lmps.ParameterServer/StopAt":
        return stop_poisoned(info, daemon.shard, msgs[0].step)
    if name == "lmps.ParameterServer/Replicate":
        return all(replicate_poisoned(info, daemon.shard, msgs[:i + 1])
                   for i in range(len(msgs)))
    if name == "lmps.WorkerPeer/Send":
        return all(not is_real_id(info, m.sender) for m in msgs)
    if name.startswith("lmps.") and name.split("/")[1] not in (
            "GetStatus", "GetAssignment", "Pull", "GradNorm", "GetTensorInfo"):
        # A method this test does not know yet: send it nothing decodable.
        return False
    return True


# The C++-backed Python runtime warns when a top-level end-group tag ends a
# parse early; the guard then judges the part it decoded.
warnings.filterwarnings("ignore", message="Unexpected end-group tag")


def accepted(method, msgs, reply):
    """For an OK answer: "ACCEPTED ..." when the daemon accepted a request
    THE RULE says it must refuse (a daemon bug, or a hole in the rule)."""
    name = method.service + "/" + method.name
    if name in ("lmps.Scheduler/Register", "lmps.Scheduler/Heartbeat",
                "lmps.ParameterServer/StopAt"):
        return "ACCEPTED"
    if name not in ("lmps.ParameterServer/Push", "lmps.ParameterServer/Replicate",
                    "lmps.WorkerPeer/Send"):
        return None
    try:
        r = method.resp_cls.FromString(reply)
    except Exception:  # noqa: BLE001
        return "ACCEPTED (unreadable answer)"
    if name == "lmps.WorkerPeer/Send" and r.elements > 0:
        return "ACCEPTED (%d elements stored)" % r.elements
    if name == "lmps.ParameterServer/Push" and r.chunks_accepted > 0:
        return "ACCEPTED (%d chunks)" % r.chunks_accepted
    if name == "lmps.ParameterServer/Replicate" and msgs:
        op = msgs[0].WhichOneof("op")
        if op in ("stop_at", "snapshot") or r.push.chunks_accepted > 0:
            return "ACCEPTED (%s)" % op
    return None


def decodable_prefix(req_cls, blobs):
    """The messages the daemon would decode before the first broken one."""
    out = []
    for b in blobs:
        try:
            out.append(req_cls.FromString(b))
        except Exception:  # noqa: BLE001 (DecodeError and friends)
            break
    return out


# --- random values -----------------------------------------------------------------

I64 = [0, 1, -1, 2, 7, -7, 2**63 - 1, -2**63, 2**63 - 2, 2**62, 2**31 - 1, -2**31,
       2**32, 2**28, 2**28 - 1, 2**40, 10**12, 4096, 65536]
I32 = [0, 1, -1, 2, 3, -3, 2**31 - 1, -2**31, 2**31 - 2, 255, 65535, 4096, 1000]
U64 = [0, 1, 2**64 - 1, 2**63, 2**32 - 1, 12345]
FLOATS = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e38, -1e38,
          1e-45, 3.4e38, 1.0, -1.0]
DOUBLES = FLOATS + [1e308, -1e308, 5e-324, 1.7976931348623157e308]
WEIRD = ["", " ", "\x00", "../../../../etc/passwd", "%s%s%n%x", "'; DROP TABLE",
         "\u202e\u0000\uffff", "lmps.probe", "*", "wte.weight\x00", "héllo wörld"]


class Rand:
    def __init__(self, seed, info):
        self.r = random.Random(seed)
        self.info = info
        self.budget = 0  # bytes of enormous values left for this request

    def enormous(self):
        """A size for an enormous string or payload, or 0 past the budget."""
        n = self.r.randint(256 << 10, MAX_BLOB)
        if n > self.budget:
            return 0
        self.budget -= n
        return n

    def chance(self, p):
        return self.r.random() < p

    def i64(self):
        r = self.r.random()
        if r < 0.5:
            return self.r.choice(I64)
        if r < 0.8:
            return self.r.randint(-1000, 1000)
        return self.r.randint(-2**63, 2**63 - 1)

    def i32(self):
        r = self.r.random()
        if r < 0.5:
            return self.r.choice(I32)
        if r < 0.8:
            return self.r.randint(-100, 100)
        return self.r.randint(-2**31, 2**31 - 1)

    def u64(self):
        return self.r.choice(U64) if self.chance(0.6) else self.r.getrandbits(64)

    def f32(self):
        return self.r.choice(FLOATS) if self.chance(0.6) else self.r.uniform(-1e6, 1e6)

    def f64(self):
        return self.r.choice(DOUBLES) if self.chance(0.6) else self.r.uniform(-1e9, 1e9)

    def blob_len(self):
        r = self.r.random()
        if r < 0.02 and self.budget > 0:
            return self.enormous()
        if r < 0.3:
            return 0 if self.chance(0.3) else self.r.randint(1, 8)
        return self.r.randint(1, 4096)

    def text(self):
        r = self.r.random()
        if r < 0.25:
            return self.r.choice(WEIRD)
        if r < 0.45 and self.info.tensors:
            return self.r.choice(self.info.tensors)
        if r < 0.47 and self.budget > 0:
            return "x" * self.enormous()
        n = self.r.randint(1, 40)
        if self.chance(0.3):
            return "".join(chr(self.r.choice([self.r.randint(0x20, 0x7e),
                                               self.r.randint(0xa0, 0xd7ff),
                                               self.r.randint(0xe000, 0x10ffff)]))
                           for _ in range(n))
        return "".join(chr(self.r.randint(0x21, 0x7e)) for _ in range(n))

    def garbage_id(self):
        while True:
            s = self.text()
            if not is_real_id(self.info, s) and len(s) < 4096:
                return s

    def raw(self, n=None):
        n = self.blob_len() if n is None else n
        return self.r.getrandbits(8 * n).to_bytes(n, "little") if n else b""

    def floats(self, n, dtype=F32, poison=None):
        """n elements of dtype; poison: None (random), True (>= 1 NaN/Inf)."""
        if dtype == BF16:
            vals = [self.r.getrandbits(16) & 0x3fff for _ in range(n)]
            if poison and n:
                vals[self.r.randrange(n)] = self.r.choice([0x7fc0, 0x7f80, 0xff80])
            return struct.pack("<%dH" % n, *vals)
        vals = [self.r.uniform(-1, 1) for _ in range(n)]
        if poison is None and self.chance(0.3) and n:
            poison = True
        if poison and n:
            for _ in range(self.r.randint(1, 3)):
                vals[self.r.randrange(n)] = self.r.choice(
                    [float("nan"), float("inf"), float("-inf")])
        return struct.pack("<%df" % n, *vals)

    def garble(self, blob):
        b = bytearray(blob)
        for _ in range(self.r.randint(1, 3)):
            what = self.r.randrange(5)
            if what == 0 and b:      # truncate
                del b[self.r.randrange(len(b)):]
            elif what == 1 and b:    # flip bits
                for _ in range(self.r.randint(1, 8)):
                    i = self.r.randrange(len(b))
                    b[i] ^= 1 << self.r.randrange(8)
            elif what == 2:          # insert garbage
                i = self.r.randint(0, len(b))
                b[i:i] = self.raw(self.r.randint(1, 16))
            elif what == 3 and b:    # repeat a segment
                i = self.r.randrange(len(b))
                j = min(len(b), i + self.r.randint(1, 64))
                b[j:j] = b[i:j]
            else:                    # a huge length prefix / varint
                i = self.r.randint(0, len(b))
                b[i:i] = bytes([self.r.choice([0x0a, 0x12, 0x1a, 0x2a]),
                                0xff, 0xff, 0xff, 0xff, 0x0f])
        return bytes(b)


def fill_random(rnd, msg, depth=0):
    """Random values in random fields of any message (by its descriptor)."""
    FD = descriptor.FieldDescriptor
    fields = list(msg.DESCRIPTOR.fields)
    done_oneofs = set()
    for fd in fields:
        if fd.containing_oneof is not None:
            if fd.containing_oneof.name in done_oneofs or not rnd.chance(0.4):
                continue
            done_oneofs.add(fd.containing_oneof.name)
        elif not rnd.chance(0.7):
            continue
        repeated = fd.label == FD.LABEL_REPEATED
        count = (rnd.r.choice([0, 1, 2, 3, 10, 200]) if repeated else 1)
        for _ in range(count):
            try:
                if fd.cpp_type == FD.CPPTYPE_MESSAGE:
                    if depth > 3:
                        break
                    field = getattr(msg, fd.name)
                    sub = field.add() if repeated else field
                    fill_random(rnd, sub, depth + 1)
                    if not repeated:
                        sub.SetInParent()
                    continue
                value = random_scalar(rnd, fd)
                if repeated:
                    getattr(msg, fd.name).append(value)
                else:
                    setattr(msg, fd.name, value)
            except (ValueError, TypeError):
                pass  # e.g. a value the Python runtime refuses: skip it
    return msg


def random_scalar(rnd, fd):
    FD = descriptor.FieldDescriptor
    t = fd.cpp_type
    if t == FD.CPPTYPE_INT64:
        return rnd.i64()
    if t == FD.CPPTYPE_INT32:
        return rnd.i32()
    if t == FD.CPPTYPE_UINT64:
        return rnd.u64()
    if t == FD.CPPTYPE_UINT32:
        return rnd.u64() & 0xffffffff
    if t == FD.CPPTYPE_DOUBLE:
        return rnd.f64()
    if t == FD.CPPTYPE_FLOAT:
        return rnd.f32()
    if t == FD.CPPTYPE_BOOL:
        return rnd.chance(0.5)
    if t == FD.CPPTYPE_ENUM:
        values = [v.number for v in fd.enum_type.values]
        return rnd.r.choice(values) if rnd.chance(0.6) else rnd.r.choice(
            [-1, 99, 2**31 - 1, -2**31, max(values) + 1])
    if fd.type == FD.TYPE_BYTES:
        return rnd.raw()
    return rnd.text()


# --- request makers: deeper than random fields, then made safe by the rule ---------


def pick_chunk(rnd, info, shard):
    r = rnd.r.random()
    if r < 0.7 and info.chunks_by_shard.get(shard):
        return rnd.r.choice(info.chunks_by_shard[shard])
    if r < 0.85 and info.chunks:
        return rnd.r.choice(info.chunks)  # maybe another shard's
    return (rnd.text()[:64], rnd.i32(), 0, rnd.r.randint(0, 2048), -1)


def make_slice(rnd, info, shard, s, poison=None):
    tensor, index, begin, end, _ = pick_chunk(rnd, info, shard)
    s.tensor = tensor
    s.chunk = index if rnd.chance(0.85) else rnd.i32()
    s.dtype = rnd.r.choice([F32, F32, F32, BF16, 0, 3, 7])
    n = end - begin
    r = rnd.r.random()
    if r < 0.6:
        s.offset = 0
        s.data = rnd.floats(n, s.dtype if s.dtype in (F32, BF16) else F32, poison)
    elif r < 0.8:
        s.offset = rnd.i64()
        s.data = rnd.floats(rnd.r.randint(0, 64), F32, poison)
    else:
        s.offset = rnd.r.randint(0, max(0, n))
        s.data = rnd.raw(rnd.r.choice([1, 3, 5, 4 * max(1, n) + 1, rnd.blob_len()]))


def make_push(rnd, info, shard, push_cls):
    head = {
        "worker_id": rnd.garbage_id() if rnd.chance(0.8) else "",
        "dp_rank": rnd.r.choice([0, 0, 0, rnd.i32()]),
        "step": rnd.r.choice([info.version_lb(shard), info.version_lb(shard) + 1,
                              -1, info.steps + 1, rnd.i64()]),
        "partition_version": rnd.r.choice([info.partition_version] * 3 + [
            info.partition_version ^ 1, 0, rnd.u64()]),
        "pp_rank": rnd.r.choice([0, 1, rnd.i32()]),
        "tp_rank": rnd.r.choice([0, 0, rnd.i32()]),
    }
    msgs = []
    for _ in range(rnd.r.choice([1, 1, 2, 3, 6])):
        m = push_cls()
        for k, v in head.items():
            setattr(m, k, v)
        if rnd.chance(0.08):
            m.step = rnd.i64()  # mixed headers
        for _ in range(rnd.r.choice([0, 1, 1, 2, 3])):
            make_slice(rnd, info, shard, m.slices.add())
        msgs.append(m)
    if not all(push_poisoned(info, shard, msgs[:i + 1]) for i in range(len(msgs))):
        force_push_poison(rnd, info, shard, msgs)
    return msgs


def force_push_poison(rnd, info, shard, msgs):
    """Makes the first message (so every prefix) one Push must refuse."""
    how = rnd.r.randrange(5)
    if how == 0:
        flip = 1 << rnd.r.randrange(64)
        for m in msgs:
            m.partition_version = info.partition_version ^ flip
    elif how == 1:
        bad = rnd.r.choice([info.dp + rnd.r.randint(0, 1000), -1 - rnd.r.randint(0, 5)])
        for m in msgs:
            m.dp_rank = bad
    elif how == 2:
        bad = rnd.r.choice([info.steps + 1 + rnd.r.randint(0, 10**6), 2**63 - 1,
                            -1 - rnd.r.randint(0, 10**6)])
        for m in msgs:
            m.step = bad
    elif how == 3:
        bad = rnd.r.choice([info.pp, 99, -1])
        for m in msgs:
            m.pp_rank = bad
    else:
        s = msgs[0].slices.add()
        make_slice(rnd, info, shard, s, poison=True)
        if not non_finite(s.dtype, s.data) and s.dtype in DTYPE_SIZE:
            s.data = rnd.floats(max(1, len(s.data) // 4), F32, poison=True)
            s.dtype = F32
        if s.dtype not in DTYPE_SIZE or not non_finite(s.dtype, s.data):
            s.dtype = 9  # invalid dtype: refused
    assert all(push_poisoned(info, shard, msgs[:i + 1]) for i in range(len(msgs)))


def make_replicate(rnd, info, shard, cls):
    op = rnd.r.choice(["push", "apply", "stop_at", "snapshot", "snapshot", None, "mixed"])
    n = 1 if op in ("apply", "stop_at") else rnd.r.choice([1, 2, 3, 5])
    target = shard if rnd.chance(0.8) else rnd.r.choice([shard + 1, -1, rnd.i32()])
    msgs = []
    push_cls = type(cls().push)
    pushes = make_push(rnd, info, shard, push_cls) if op == "push" else []
    for i in range(max(n, len(pushes))):
        m = cls()
        m.shard = target
        m.primary = rnd.garbage_id()
        if "epoch" in m.DESCRIPTOR.fields_by_name and rnd.chance(0.8):
            m.epoch = rnd.i64()  # any epoch: the operation itself is refused
        o = op if op != "mixed" else rnd.r.choice(
            ["push", "apply", "stop_at", "snapshot"])
        if o == "push":
            m.push.CopyFrom(pushes[i] if i < len(pushes)
                            else make_push(rnd, info, shard, push_cls)[0])
        elif o == "apply":
            m.apply.step = rnd.r.choice([info.version_lb(shard) - 1, -1, info.steps + 1,
                                         rnd.i64(), info.version_lb(shard)])
            m.apply.global_sum_squares = rnd.f64()
        elif o == "stop_at":
            lb = info.version_lb(shard)
            m.stop_at.step = rnd.r.choice([0, -5, lb - 1, lb, info.steps + 5, rnd.i64()])
        elif o == "snapshot":
            s = m.snapshot
            s.version = rnd.r.choice([info.version_lb(shard), rnd.i64()])
            tensor, index, begin, end, _ = pick_chunk(rnd, info, shard)
            s.tensor, s.chunk = tensor, index
            s.offset = rnd.r.choice([0, 0, rnd.i64(), 2**63 - 1, 2**63 - 2,
                                     -1, max(0, end - begin - 1)])
            k = rnd.r.choice([0, 1, 4, max(1, (end - begin) // 2)])
            s.params = rnd.floats(k)
            for _ in range(rnd.r.choice([0, 2, 2, 1, 5])):
                s.state.append(rnd.floats(k if rnd.chance(0.8) else k + 1))
            if rnd.chance(0.5):
                for _ in range(rnd.r.randint(0, 4)):
                    s.applied_steps.append(rnd.i64())
                    s.applied_sum_squares.append(rnd.f64())
            s.last_grad_norm = rnd.f64()
        msgs.append(m)
    def ok():
        return all(replicate_poisoned(info, shard, msgs[:i + 1])
                   for i in range(len(msgs)))
    if not ok():
        first = msgs[0].WhichOneof("op")
        if first == "apply":
            msgs[0].apply.global_sum_squares = rnd.r.choice(
                [float("nan"), float("-inf"), -1.0])
        elif first == "stop_at":
            msgs[0].stop_at.step = rnd.r.choice([0, -1, -2**63])
    if not ok():
        bad = rnd.r.choice([shard + 1000, -1 - shard, 2**31 - 1])
        for m in msgs:
            m.shard = bad
    return msgs


def make_request(rnd, info, daemon, method):
    """One hostile request as a list of messages (one for unary requests)."""
    name = method.service + "/" + method.name
    cls = method.req_cls
    k = daemon.shard
    if name == "lmps.ParameterServer/Push":
        return make_push(rnd, info, k, cls)
    if name == "lmps.ParameterServer/Replicate":
        return make_replicate(rnd, info, k, cls)
    count = rnd.r.choice([1, 1, 2, 4]) if method.client_streaming else 1
    msgs = []
    for _ in range(count):
        m = fill_random(rnd, cls())
        if name == "lmps.Scheduler/Register":
            how = rnd.r.randrange(3)
            if how == 0:
                m.role = rnd.r.choice([0, 1, 4, 99, -1])
            elif how == 1:
                m.role = rnd.r.choice([ROLE_SERVER, ROLE_WORKER])
                m.address = ""
            else:
                m.role = rnd.r.choice([ROLE_SERVER, ROLE_WORKER])
                m.address = m.address or "127.0.0.1:1"
                m.rejoin = True
                m.requested_rank = rnd.r.choice([-1, -2**31, 1000, 2**31 - 1])
        elif name == "lmps.Scheduler/Heartbeat":
            m.node_id = rnd.garbage_id()
        elif name == "lmps.Scheduler/GetAssignment" and rnd.chance(0.3):
            m.node_id = rnd.r.choice(sorted(info.node_ids))
        elif name == "lmps.ParameterServer/Apply":
            lb = info.version_lb(k)
            m.step = rnd.r.choice(
                [lb - 1, lb - 50, -1, info.steps + 1, lb, lb + 1, m.step])
            if not apply_poisoned(info, k, m.step, m.global_sum_squares):
                m.global_sum_squares = rnd.r.choice([float("nan"), float("inf"), -1e-9])
        elif name == "lmps.ParameterServer/StopAt":
            lb = info.version_lb(k)
            m.step = rnd.r.choice([0, -1, lb - 1, lb - 1, lb, lb + 2, m.step])
            if not stop_poisoned(info, k, m.step):
                m.step = rnd.r.choice([0, -1, lb - 1 if lb >= 2 else 0, -2**63])
        elif name in ("lmps.ParameterServer/Pull", "lmps.ParameterServer/GradNorm"):
            lb = info.version_lb(k)
            m.step = rnd.r.choice([lb, lb + 1, lb - 1, 0, lb + 1000, m.step])
            if name.endswith("Pull"):
                if rnd.chance(0.5):
                    m.partition_version = info.partition_version
                if rnd.chance(0.3):
                    del m.tensors[:]
                    m.tensors.extend(
                        rnd.r.sample(info.tensors, min(3, len(info.tensors))))
        elif name == "lmps.WorkerPeer/Send":
            m.sender = rnd.garbage_id()
            if rnd.chance(0.5):
                m.kind = rnd.r.choice([1, 2, 3])
                m.total_elements = rnd.r.choice([0, 4, 256, 2**28, 2**28 + 1,
                                                 -1, rnd.i64()])
                m.offset = rnd.r.choice([0, 0, -1, 2**63 - 1, m.total_elements])
                m.data = rnd.floats(rnd.r.choice([0, 1, 4, 64]))
        msgs.append(m)
    return msgs


# --- regression seeds -------------------------------------------------------------
#
# Requests that once crashed a daemon, sent once to every daemon of their kind
# as the hostile phase starts (the random client finds them only now and
# then). Each obeys THE RULE.
#
# KNOWN BUG, NOT FIXED HERE (server/replication.cc belongs to the replication
# work; this test fails until it is fixed): ReplicatedShard::RestoreFrom
# bounds a snapshot message with `s.offset() + n > size`, which overflows
# (signed, undefined) for an offset near INT64_MAX, so the check passes and
# memcpy writes far outside the chunk. One Replicate message to a backup
# kills it (seen: SIGABRT "double free or corruption (out)"; SIGSEGV is as
# likely): {shard: its shard, epoch: any >= the backup's, primary: garbage,
# snapshot {version: 1, tensor/chunk: a chunk of that shard, offset:
# 2^63 - 1, params: 4 bytes, state: two 4-byte buffers (AdamW)}}. The
# snapshot covers one element of the shard's 17088, so a correct backup
# refuses it. Fix: `s.offset() > size - n` (n <= size first). The launcher
# then prints "backup-N was killed by signal 6; its shard's other node
# serves on ..." and the test fails on that line.


def snapshot_offset_overflow(info, daemon, method):
    m = method.req_cls()
    m.shard = daemon.shard
    m.primary = "hostile-client"
    if "epoch" in m.DESCRIPTOR.fields_by_name:
        m.epoch = 2**62
    tensor, index, _, _, _ = info.chunks_by_shard[daemon.shard][0]
    s = m.snapshot
    s.version = 1
    s.tensor, s.chunk = tensor, index
    s.offset = 2**63 - 1
    s.params = struct.pack("<f", 1.0)
    s.state.append(struct.pack("<f", 0.0))
    s.state.append(struct.pack("<f", 0.0))
    return [m]


REGRESSION_SEEDS = [
    ("backup", "lmps.ParameterServer/Replicate", snapshot_offset_overflow,
     "KNOWN BUG server/replication.cc RestoreFrom: snapshot offset 2^63-1 "
     "overflows the bounds check (see the comment above REGRESSION_SEEDS)"),
]


def send_regression_seeds(info, daemons, stats):
    """Sends every seed once; returns what was sent, for the verdict."""
    sent = []
    for kind, name, make, why in REGRESSION_SEEDS:
        for d in daemons:
            for m in d.methods:
                if d.kind != kind or m.service + "/" + m.name != name:
                    continue
                msgs = make(info, d, m)
                check(guard(info, d, m, msgs), "regression seed breaks the rule: " + why)
                blobs = [x.SerializeToString() for x in msgs]
                try:
                    if m.client_streaming:
                        d.channel.stream_unary(m.path)(iter(blobs), timeout=5)
                    else:
                        d.channel.unary_unary(m.path)(blobs[0], timeout=5)
                    code = "OK"
                except grpc.RpcError as e:
                    code = code_name(e)
                stats.add(d, m, code)
                sent.append("%s %s -> %s: %s" % (d.label, m.path, code, why))
                log("regression seed: %s" % sent[-1])
    return sent


# --- the hostile client ------------------------------------------------------------


class Stats:
    def __init__(self):
        self.mu = threading.Lock()
        self.codes = collections.defaultdict(collections.Counter)  # (label, path)
        self.withheld = collections.Counter()
        self.kinds = {}
        self.secs = collections.Counter()

    def add(self, daemon, method, code):
        with self.mu:
            self.codes[(daemon.label, method.path)][code] += 1
            self.kinds[daemon.label] = daemon.kind

    def timing(self, daemon, method, what, secs):
        with self.mu:
            self.secs[(daemon.label, method.path, what)] += secs

    def hold(self, daemon, method):
        with self.mu:
            self.withheld[(daemon.label, method.path)] += 1

    def total(self):
        with self.mu:
            return sum(sum(c.values()) for c in self.codes.values())


def code_name(e):
    try:
        c = e.code()
        return c.name if c is not None else "UNKNOWN"
    except Exception:  # noqa: BLE001
        return type(e).__name__


class Hostile:
    def __init__(self, seed, info, daemons, stats):
        self.seed = seed
        self.info = info
        self.daemons = daemons
        self.stats = stats
        self.stop = threading.Event()
        self.pairs = [(d, m) for d in daemons for m in d.methods]
        self.threads = []
        self.trace = None  # fn(daemon, method, blobs, decoded): --trace

    def start(self, n):
        self.stop.clear()
        self.threads = [threading.Thread(target=self.loop, args=(t, n), daemon=True)
                        for t in range(n)]
        for t in self.threads:
            t.start()

    def halt(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
        check(all(not t.is_alive() for t in self.threads),
              "a hostile client thread is stuck (a call ignored its deadline)")

    def loop(self, t, n):
        rnd = Rand(self.seed * 1000 + t + 7919 * getattr(self, "phase", 0), self.info)
        k = t
        while not self.stop.is_set():
            daemon, method = self.pairs[k % len(self.pairs)]
            k += n
            try:
                self.attack(rnd, daemon, method)
            except TestFailure:
                raise
            except Exception as e:  # noqa: BLE001: a client-side bug must not hide
                self.stats.add(daemon, method, "CLIENT_ERROR " + type(e).__name__)
                log("client error on %s %s: %r" % (daemon.label, method.path, e))

    def encode(self, rnd, daemon, method):
        """The request's wire messages, made safe by the rule (None: withheld)."""
        style = rnd.r.random()
        for _ in range(8):
            rnd.budget = 2 * MAX_BLOB
            if style < 0.2:  # random bytes
                n = rnd.r.choice([1, 1, 2, 3]) if method.client_streaming else 1
                blobs = [rnd.raw() for _ in range(n)]
            else:
                msgs = make_request(rnd, self.info, daemon, method)
                blobs = [m.SerializeToString() for m in msgs]
                if style < 0.5:  # garbled encodings
                    blobs = [rnd.garble(b) if rnd.chance(0.7) else b for b in blobs]
            decoded = decodable_prefix(method.req_cls, blobs)
            if not decoded or guard(self.info, daemon, method, decoded):
                return blobs, decoded
            self.stats.hold(daemon, method)
        return None, None

    def attack(self, rnd, daemon, method):
        t0 = time.monotonic()
        blobs, decoded = self.encode(rnd, daemon, method)
        self.stats.timing(daemon, method, "encode", time.monotonic() - t0)
        if blobs is None:
            return
        if self.trace is not None:
            self.trace(daemon, method, blobs, decoded)
        ch = daemon.channel
        timeout = READ_DEADLINE_S if rnd.chance(0.9) else rnd.r.choice([0.001, 0.02, 0.2])
        if method.name == "Watch":
            timeout = min(timeout, 0.3)  # health Watch streams until cancelled
        mode = rnd.r.random()
        try:
            if not method.client_streaming and not method.server_streaming:
                reply = ch.unary_unary(method.path)(blobs[0], timeout=timeout)
                code = accepted(method, decoded, reply) or "OK"
            elif not method.client_streaming:
                it = ch.unary_stream(method.path)(blobs[0], timeout=timeout)
                want = rnd.r.choice([0, 1, None])
                got = 0
                if want != 0:
                    for _ in it:
                        got += 1
                        if want is not None and got >= want:
                            break
                if want is None:
                    code = "OK"
                else:
                    it.cancel()
                    code = "CANCELLED(client, after %d)" % got
            else:
                code, reply = self.stream_call(rnd, ch, method, blobs, timeout, mode)
                if code == "OK" and not method.server_streaming:
                    # What the daemon processed: at most what was sent.
                    sent = decoded[:len(blobs)]
                    code = accepted(method, sent, reply) or code
        except grpc.RpcError as e:
            code = code_name(e)
        self.stats.add(daemon, method, code)
        self.stats.timing(daemon, method, "call", time.monotonic() - t0)
        if code == "UNAVAILABLE":
            time.sleep(0.01)  # a daemon not serving (yet, or any more)

    def stream_call(self, rnd, ch, method, blobs, timeout, mode):
        """Client streams: cancelled mid-way, half-closed early, or whole."""
        release = threading.Event()
        cancel = mode < 0.3
        cut = rnd.r.randint(0, len(blobs)) if cancel else len(blobs)
        if 0.3 <= mode < 0.45:
            blobs = blobs[:rnd.r.randint(0, len(blobs))]  # a prefix: guarded too

        def requests():
            for i, b in enumerate(blobs):
                if i == cut:
                    release.wait(2)  # the call is cancelled meanwhile
                    return
                yield b
        if method.server_streaming:
            call = ch.stream_stream(method.path)(requests(), timeout=timeout)
            try:
                if cancel:
                    time.sleep(rnd.r.uniform(0, 0.02))
                    call.cancel()
                    return "CANCELLED(client, mid-stream)", None
                for i, _ in enumerate(call):
                    if i > 50:
                        call.cancel()
                        return "CANCELLED(client, after 50)", None
                return "OK", None
            finally:
                release.set()
        fut = ch.stream_unary(method.path).future(requests(), timeout=timeout)
        try:
            if cancel:
                time.sleep(rnd.r.uniform(0, 0.02))
                if fut.cancel():
                    return "CANCELLED(client, mid-stream)", None
            return "OK", fut.result()
        except grpc.FutureCancelledError:
            return "CANCELLED(client, mid-stream)", None
        finally:
            release.set()


class Tracer:
    """--trace: one line per request (time, daemon, method, what was decoded)."""

    def __init__(self, path):
        self.mu = threading.Lock()
        self.f = open(path, "w")

    def __call__(self, daemon, method, blobs, decoded):
        what = "; ".join(str(m).replace("\n", " ")[:2000] for m in decoded)
        with self.mu:
            self.f.write("%.3f %s %s %d blobs (%s bytes): %s\n" % (
                time.time(), daemon.label, method.path, len(blobs),
                ",".join(str(len(b)) for b in blobs), what))
            self.f.flush()


# --- discovery ---------------------------------------------------------------------


def channel(address):
    return grpc.insecure_channel(address, options=[
        ("grpc.max_send_message_length", 80 << 20),
        ("grpc.max_receive_message_length", 80 << 20),
        ("grpc.enable_retries", 0),
    ])


def discover_methods(daemon, refl_pb2, health_pb2):
    """Every service and method of a daemon through reflection."""
    refl = rct.Reflection(daemon.channel, refl_pb2)
    services = refl.list_services()
    pool = descriptor_pool.DescriptorPool()
    for service in services:
        if service.startswith("grpc."):
            continue  # described below from the compiled protos
        refl.load_symbol(service, pool)
        sd = pool.FindServiceByName(service)
        for md in sd.methods:
            daemon.methods.append(Method(
                service, md.name, rct.message_class(pool, md.input_type.full_name),
                rct.message_class(pool, md.output_type.full_name),
                md.client_streaming, md.server_streaming))
    # Health is not described by reflection (docs/operations.md); reflection describes
    # itself, but the compiled copy is the same.
    for mod, service in [(health_pb2, "grpc.health.v1.Health"),
                         (refl_pb2, "grpc.reflection.v1alpha.ServerReflection")]:
        if service not in services:
            continue
        sd = mod.DESCRIPTOR.services_by_name[service.split(".")[-1]]
        for md in sd.methods:
            daemon.methods.append(Method(
                service, md.name, getattr(mod, md.input_type.name),
                getattr(mod, md.output_type.name), md.client_streaming,
                md.server_streaming))
    return services, pool


def discover(sched_addr, launcher, refl_pb2, health_pb2):
    sched = Daemon("scheduler", "scheduler", sched_addr)
    sched.channel = channel(sched_addr)
    services, pool = discover_methods(sched, refl_pb2, health_pb2)
    check("lmps.Scheduler" in services, "scheduler services: %s" % services)
    status_cls = rct.message_class(pool, "lmps.JobStatus")
    get_status = sched.channel.unary_unary(
        "/lmps.Scheduler/GetStatus",
        request_serializer=lambda _: b"", response_deserializer=status_cls.FromString)
    RUNNING = pool.FindEnumTypeByName("lmps.JobState").values_by_name["RUNNING"].number

    def assembled():
        st = get_status(None, timeout=2)
        if st.state != RUNNING:
            return None
        want = st.expected_servers + st.expected_workers
        live = [n for n in st.nodes if n.alive and n.address]
        return st if len(live) == want else None

    status = wait_for("the job to be RUNNING with every node registered (GetStatus)",
                      assembled, 60, launcher)
    info = JobInfo(status)
    daemons = [sched]
    for n in sorted(status.nodes, key=lambda n: n.node_id):
        if n.role == ROLE_SERVER:
            kind = "backup" if n.backup else "primary"
            d = Daemon(n.node_id, kind, n.address, n.shard)
        else:
            d = Daemon(n.node_id, "worker", n.address)
        d.channel = channel(n.address)
        daemons.append(d)
    for d in daemons[1:]:
        svc, _ = discover_methods(d, refl_pb2, health_pb2)
        want = "lmps.WorkerPeer" if d.kind == "worker" else "lmps.ParameterServer"
        check(want in svc, "%s at %s does not list %s: %s"
              % (d.label, d.address, want, svc))
    guard_self_check(info, rct.message_class(pool, "lmps.PushRequest"))
    return info, daemons, get_status, pool


def guard_self_check(info, push_cls):
    """The guard must see a well-formed push of a whole chunk as one a shard
    obeys (so it is withheld) in every dtype the daemons decode, unset
    included (server/tensor_codec.h: DTYPE_UNSPECIFIED is F32), and as
    poisoned with an invalid dtype or a NaN. Judging unset as invalid once
    let the client send a legitimate push that changed the parameters."""
    tensor, index, begin, end, shard = info.chunks[0]
    def push(dtype, data):
        m = push_cls(dp_rank=0, step=1, partition_version=info.partition_version)
        m.slices.add(tensor=tensor, chunk=index, offset=0, dtype=dtype, data=data)
        return [m]
    n = end - begin
    for dtype, size in [(UNSET, 4), (F32, 4), (BF16, 2)]:  # what the daemons decode
        check(not push_poisoned(info, shard, push(dtype, bytes(size * n))),
              "guard: a finite dtype-%d push of %s chunk %d counts as refused"
              % (dtype, tensor, index))
        nan = struct.pack("<f", float("nan")) if size == 4 else b"\xc0\x7f"
        check(push_poisoned(info, shard, push(dtype, nan + bytes(size * (n - 1)))),
              "guard: a dtype-%d push with a NaN counts as obeyed" % dtype)
    check(push_poisoned(info, shard, push(3, bytes(4 * n))),
          "guard: a push with dtype 3 counts as obeyed")


def version_monitor(info, daemons, pool, stop):
    """Keeps info's per-shard version lower bounds fresh: reads the primary's
    version, and the backup's only when the primary does not answer (a backup
    answers once it serves)."""
    resp_cls = rct.message_class(pool, "lmps.TensorInfoResponse")
    req_cls = rct.message_class(pool, "lmps.TensorInfoRequest")
    nodes = collections.defaultdict(list)  # shard -> [(call, request)], primary first
    for d in sorted(daemons, key=lambda d: d.kind != "primary"):
        if d.kind in ("primary", "backup"):
            tensor = info.chunks_by_shard[d.shard][0][0]
            nodes[d.shard].append((d.channel.unary_unary(
                "/lmps.ParameterServer/GetTensorInfo",
                request_serializer=req_cls.SerializeToString,
                response_deserializer=resp_cls.FromString), req_cls(tensor=tensor)))
    while not stop.is_set():
        for shard, calls in nodes.items():
            for call, req in calls:
                try:
                    info.saw_version(shard, call(req, timeout=2).version)
                    break
                except grpc.RpcError:
                    pass
        stop.wait(0.1)


def liveness(daemons, health_pb2):
    """Every daemon that still runs answers a health check with SERVING.

    A daemon whose port refuses connections has exited: a crash shows in the
    launcher's output (BAD_LAUNCHER) and fails the test there, while a
    worker that finished its last step exits normally (the progress read
    that ended phase 1 may lag the job by a few steps). So only a daemon
    that accepts the connection but does not answer, or answers anything but
    SERVING, is a problem here. Returns (problems, exited labels)."""
    problems, exited = [], []
    for d in daemons:
        call = d.channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString)
        try:
            st = call(health_pb2.HealthCheckRequest(), timeout=5).status
            if st != health_pb2.HealthCheckResponse.SERVING:
                problems.append("%s health %s" % (d.label, st))
        except grpc.RpcError as e:
            if (e.code() == grpc.StatusCode.UNAVAILABLE
                    and "Connection refused" in (e.details() or "")):
                exited.append(d.label)
            else:
                problems.append("%s health: %s %s" % (d.label, e.code(), e.details()))
    return problems, exited


# --- the test ----------------------------------------------------------------------


def report(stats):
    log("calls per daemon and method (status codes seen):")
    for (label, path), codes in sorted(stats.codes.items()):
        held = stats.withheld.get((label, path), 0)
        log("  %-10s %-52s %5d  %s%s" % (
            label, path, sum(codes.values()),
            ", ".join("%s %d" % kv for kv in sorted(codes.items())),
            "  (withheld by the rule: %d)" % held if held else ""))
        log("      encode %.2f s, call %.2f s" % (stats.secs[(label, path, "encode")],
                                                  stats.secs[(label, path, "call")]))


def body(args, tmp, seed):
    refl_pb2, health_pb2 = rct.compile_protos(os.path.join(tmp, "stubs"))
    job = os.path.join(tmp, "job.textproto")
    with open(job, "w") as f:
        f.write(JOB)

    # 1. The job alone.
    t0 = time.monotonic()
    plain = Launcher(args.bin_dir, os.path.join(tmp, "plain"), job)
    try:
        rc = plain.wait(300)
    finally:
        plain.kill()
    log("plain run: exit %s in %.1f s" % (rc, time.monotonic() - t0))
    check(rc == 0, "the plain run failed (exit %s):\n%s" % (rc, plain.output()[-3000:]))

    # 2. The same job with the hostile client.
    t0 = time.monotonic()
    run_dir = os.path.join(tmp, "hostile")
    job_b = Launcher(args.bin_dir, run_dir, job)
    stats = Stats()
    stop_monitor = threading.Event()
    hostile = None
    try:
        port_file = os.path.join(run_dir, "scheduler.port")
        port = wait_for("the scheduler's port file %s" % port_file,
                        lambda: open(port_file).read().strip()
                        if os.path.exists(port_file) else "", 60, job_b)
        info, daemons, get_status, pool = discover(
            "127.0.0.1:" + port, job_b, refl_pb2, health_pb2)
        log("daemons: %s" % ", ".join("%s (%s) at %s" % (d.label, d.kind, d.address)
                                      for d in daemons))
        for d in daemons:
            log("  %s: %s" % (d.label, " ".join(sorted({m.path for m in d.methods}))))
        monitor = threading.Thread(target=version_monitor,
                                   args=(info, daemons, pool, stop_monitor), daemon=True)
        monitor.start()
        time.sleep(0.3)  # one round of version reads (a lower bound of 0 is also safe)
        start_step = info.progress()
        log("hostile phase 1 starts at step %d of %d, %d threads, %.1f s after launch"
            % (start_step, info.steps, HOSTILE_THREADS, time.monotonic() - t0))
        seeds_sent = [] if args.no_regression_seeds else send_regression_seeds(
            info, daemons, stats)
        hostile = Hostile(seed, info, daemons, stats)
        if args.trace:
            hostile.trace = Tracer(args.trace)
        hostile.phase = 1
        hostile.start(HOSTILE_THREADS)
        wait_for("the job to reach step %d of %d under attack (or end)"
                 % (int(PHASE1_END * info.steps), info.steps),
                 lambda: info.progress() >= PHASE1_END * info.steps or
                 job_b.poll() is not None, 240)
        hostile.halt()
        end_step = info.progress()
        log("hostile phase 1 ends at step %d: %d calls" % (end_step, stats.total()))
        problems = []
        if job_b.poll() is None and end_step < info.steps:
            problems, exited = liveness(daemons, health_pb2)
            log("liveness after phase 1: %s%s" % (
                problems or "every running daemon SERVING",
                "; exited (checked by the launcher's output): %s" % exited if exited else ""))
        # Phase 2: until the end, through the daemons' shutdown.
        hostile.phase = 2
        hostile.start(2)
        wait_for("the job's daemons to exit (launcher: 'lmps: checkpoints in')",
                 lambda: job_b.poll() is not None or
                 "lmps: checkpoints in" in job_b.output(), 240)
        hostile.halt()
        rc = job_b.wait(300)
        stop_monitor.set()
    finally:
        stop_monitor.set()
        if hostile is not None:
            hostile.stop.set()
        job_b.kill()
    log("hostile run: exit %s in %.1f s, %d hostile calls" % (
        rc, time.monotonic() - t0, stats.total()))
    report(stats)

    # 3. Verdicts.
    out = job_b.output()
    failures = []
    if rc != 0:
        failures.append("the hostile run failed (exit %s):\n%s" % (rc, out[-3000:]))
    bad_lines = [l for l in out.splitlines() if any(b in l for b in BAD_LAUNCHER)]
    if bad_lines:
        failures.append("launcher reports crashes or restarts:\n  "
                        + "\n  ".join(bad_lines))
    bad_logs = scan_logs(run_dir)
    if bad_logs:
        failures.append("daemon logs:\n  " + "\n  ".join(bad_logs[:40]))
    if problems:
        failures.append("daemons not answering after phase 1: %s" % problems)
    if rc == 0:
        diff = compare_models(os.path.join(tmp, "plain", "model.safetensors"),
                              os.path.join(run_dir, "model.safetensors"))
        if diff:
            failures.append("final parameters differ from the plain run: " + diff)
        else:
            log("final parameters: bit-identical to the plain run")
    if start_step > MAX_START_FRACTION * info.steps or end_step < PHASE1_END * info.steps:
        failures.append("the hostile phase covered steps %d-%d of %d only"
                        % (start_step, end_step, info.steps))
    wrongly_accepted = {k: c for k, c in stats.codes.items()
                        if any(x.startswith("ACCEPTED") for x in c)}
    if wrongly_accepted:
        failures.append("daemons accepted requests they must refuse: %s"
                        % sorted(wrongly_accepted))
    client_errors = {k: c for k, c in stats.codes.items()
                     if any(x.startswith("CLIENT_ERROR") for x in c)}
    if client_errors:
        failures.append("bugs of this test's own client (see the log above): %s"
                        % sorted(client_errors))
    uncalled = [(d.label, m.path) for d in daemons for m in d.methods
                if not stats.codes.get((d.label, m.path))]
    if uncalled:
        failures.append("never called: %s" % uncalled)
    for kind in ("scheduler", "primary", "backup", "worker"):
        answered = collections.Counter()
        for (label, path), codes in stats.codes.items():
            if stats.kinds.get(label) == kind and path.startswith("/lmps."):
                for c, n in codes.items():
                    if c not in ("UNAVAILABLE",) and not c.startswith("CANCELLED(client"):
                        answered[c] += n
        if not answered:
            failures.append("no %s answered an lmps call with anything but UNAVAILABLE"
                            % kind)
        else:
            log("%s answers: %s" % (kind, dict(answered)))
    if failures:
        if seeds_sent:
            failures.append("regression seeds sent as the attack began (a crash right "
                            "after one is that known bug):\n  " + "\n  ".join(seeds_sent))
        raise TestFailure("seed %d:\n" % seed + "\n".join(failures))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin_dir", required=True)
    parser.add_argument("--seed", type=int,
                        default=int(os.environ.get("LMPS_HOSTILE_SEED", "0")) or None)
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument("--trace", default="",
                        help="write every request sent to this file (debugging)")
    parser.add_argument("--no_regression_seeds", action="store_true",
                        help="skip REGRESSION_SEEDS (known bugs): only random requests")
    args = parser.parse_args()
    seed = args.seed if args.seed else random.SystemRandom().randint(1, 2**31 - 1)
    log("seed %d (replay: --seed=%d or LMPS_HOSTILE_SEED=%d)" % (seed, seed, seed))

    def on_signal(signo, _frame):
        raise SystemExit(128 + signo)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    base = os.environ.get("TEST_TMPDIR")
    tmp = tempfile.mkdtemp(prefix="hostile_client_test.", dir=base)
    try:
        scan_self_check(tmp)
        body(args, tmp, seed)
    except TestFailure as e:
        print("FAIL: %s" % e, file=sys.stderr, flush=True)
        keep = os.environ.get("TEST_UNDECLARED_OUTPUTS_DIR")
        if keep:  # Bazel keeps these (outputs.zip); the sandbox goes away
            for name in ("plain.out", "hostile.out", "hostile/logs", "plain/logs"):
                src = os.path.join(tmp, name)
                dst = os.path.join(keep, name.replace("/", "_"))
                if os.path.isdir(src):
                    shutil.copytree(src, dst, dirs_exist_ok=True)
                elif os.path.exists(src):
                    shutil.copy(src, dst)
            print("(launcher output and daemon logs in %s)" % keep, file=sys.stderr)
        else:
            print("(run directories in %s)" % tmp, file=sys.stderr, flush=True)
        return 1
    finally:
        if not base and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print("PASS", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
