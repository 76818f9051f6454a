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

Modules: hostile_jobs.py (the launcher, deadlines, what a broken job looks
like in the logs), hostile_messages.py (the job's daemons and methods, THE
RULE's guard, random values, request makers, regression seeds); this file
holds the client's threads, discovery and the test.
"""

import argparse
import collections
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time

import grpc
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
HOSTILE_THREADS = 3
PHASE1_END = 0.75        # main hostile phase until this fraction of the steps
MAX_START_FRACTION = 0.35  # the hostile client must start before this
READ_DEADLINE_S = 3.0

from hostile_jobs import (BAD_LAUNCHER, Launcher, TestFailure, check,  # noqa: E402
                          compare_models, log, scan_logs, scan_self_check,
                          wait_for)
from hostile_messages import (MAX_BLOB, ROLE_SERVER, BF16, F32, UNSET,  # noqa: E402
                              Daemon, JobInfo, Method, Rand, accepted,
                              code_name, decodable_prefix, guard, make_request,
                              push_poisoned, send_regression_seeds)


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
