#!/usr/bin/python3
"""A gRPC client lmps did not write, talking to the real daemons.

Debian's python3-grpcio ships neither grpc_reflection nor grpc_health, so this
client compiles the reflection (v1alpha, the version the C++ server of
Debian's gRPC serves) and health protos from /usr/share/grpc-proto with
grpc_tools.protoc at run time, and learns lmps's own API only through server
reflection:

 1. a scheduler (job: dp 1, num_shards 1) and one shard start on
    127.0.0.1:0; the scheduler's reflection lists lmps.Scheduler,
    grpc.health.v1.Health and the reflection service itself;
 2. the file descriptor of lmps.Scheduler comes from reflection; the message
    classes are built from it (descriptor_pool + message_factory) and
    GetStatus is called dynamically: the job is ASSEMBLING and lists the
    shard (role SERVER, its address);
 3. grpc.health.v1 Check: the scheduler is SERVING; the shard is NOT_SERVING
    while the job lacks its worker, and its ParameterServer answers
    UNAVAILABLE; the shard's reflection lists lmps.ParameterServer;
 4. a worker starts: the job assembles, the shard turns SERVING, GetStatus
    says RUNNING with both nodes, GetAssignment for the worker gives dp rank
    0 and the shard's address, and GetTensorInfo {"tensor": "wte.weight"} on
    the shard reports shape [256, C] with its chunks;
 5. SIGTERM stops every daemon; the shard exits 0 (documented clean
    shutdown).

Every process started here is stopped and reaped on every exit path.
Usage: reflection_client_test.py --bin_dir=DIR (a directory holding
server/scheduler/lmps_scheduler, server/lmps_server, worker/lmps_worker).
"""

import argparse
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import json_format
from google.protobuf import message_factory

GRPC_PROTO = "/usr/share/grpc-proto"
DEADLINE_S = 5


class TestFailure(Exception):
    pass


def log(msg):
    print("reflection_client_test: " + msg, flush=True)


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


# --- compiled stubs for reflection and health ------------------------------------


def compile_protos(out_dir):
    """protoc the two gRPC protos into out_dir and import them.

    Copied to top-level names so the generated modules do not live in a
    package called `grpc` (which would shadow grpcio itself).
    """
    from grpc_tools import protoc

    src = os.path.join(out_dir, "src")
    os.makedirs(src)
    for rel, name in [
        ("grpc/reflection/v1alpha/reflection.proto", "lmpstest_reflection.proto"),
        ("grpc/health/v1/health.proto", "lmpstest_health.proto"),
    ]:
        path = os.path.join(GRPC_PROTO, rel)
        check(os.path.exists(path), "%s not found (Debian package grpc-proto)" % path)
        shutil.copy(path, os.path.join(src, name))
        rc = protoc.main(["protoc", "-I" + src, "--python_out=" + out_dir, name])
        check(rc == 0, "grpc_tools.protoc failed on %s" % name)
    sys.path.insert(0, out_dir)
    import lmpstest_health_pb2
    import lmpstest_reflection_pb2

    return lmpstest_reflection_pb2, lmpstest_health_pb2


# --- a reflection client -------------------------------------------------------------


class Reflection:
    METHOD = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"

    def __init__(self, channel, pb2):
        self._pb2 = pb2
        self._call = channel.stream_stream(
            self.METHOD,
            request_serializer=pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=pb2.ServerReflectionResponse.FromString,
        )

    def _ask(self, **kwargs):
        req = self._pb2.ServerReflectionRequest(host="", **kwargs)
        responses = list(self._call(iter([req]), timeout=DEADLINE_S))
        check(len(responses) == 1, "reflection: %d responses" % len(responses))
        resp = responses[0]
        if resp.WhichOneof("message_response") == "error_response":
            raise LookupError(
                "reflection error %d: %s"
                % (resp.error_response.error_code, resp.error_response.error_message)
            )
        return resp

    def list_services(self):
        resp = self._ask(list_services="")
        return sorted(s.name for s in resp.list_services_response.service)

    def files_containing(self, symbol):
        resp = self._ask(file_containing_symbol=symbol)
        return list(resp.file_descriptor_response.file_descriptor_proto)

    def file_by_name(self, name):
        resp = self._ask(file_by_filename=name)
        return list(resp.file_descriptor_response.file_descriptor_proto)

    def load_symbol(self, symbol, pool):
        """Adds the file defining `symbol` and its dependencies to `pool`."""
        pending = {}
        for raw in self.files_containing(symbol):
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            pending[fd.name] = fd
        added = set()

        def add(name):
            if name in added:
                return
            try:
                pool.FindFileByName(name)
                added.add(name)
                return
            except KeyError:
                pass
            if name not in pending:
                for raw in self.file_by_name(name):
                    fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
                    pending.setdefault(fd.name, fd)
            fd = pending[name]
            for dep in fd.dependency:
                add(dep)
            pool.Add(fd)
            added.add(name)

        for name in list(pending):
            add(name)
        return pending


def message_class(pool, full_name):
    desc = pool.FindMessageTypeByName(full_name)
    get = getattr(message_factory, "GetMessageClass", None)
    if get is not None:
        return get(desc)
    return message_factory.MessageFactory(pool).GetPrototype(desc)


class DynamicStub:
    """Calls unary methods of a service known only from its descriptor."""

    def __init__(self, channel, pool, service_name):
        self._channel = channel
        self._pool = pool
        self.service = pool.FindServiceByName(service_name)

    def method(self, name):
        m = self.service.methods_by_name[name]
        check(
            not m.client_streaming and not m.server_streaming,
            "%s is streaming" % m.full_name,
        )
        req_cls = message_class(self._pool, m.input_type.full_name)
        resp_cls = message_class(self._pool, m.output_type.full_name)
        call = self._channel.unary_unary(
            "/%s/%s" % (self.service.full_name, m.name),
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )

        def invoke(fields=None, timeout=DEADLINE_S):
            req = req_cls()
            json_format.ParseDict(fields or {}, req)
            return call(req, timeout=timeout)

        return invoke


def enum_value(pool, enum_name, value_name):
    return pool.FindEnumTypeByName(enum_name).values_by_name[value_name].number


# --- processes -------------------------------------------------------------------------


class Procs:
    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.procs = {}

    def start(self, name, argv):
        out = open(os.path.join(self.log_dir, name + ".log"), "wb")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
        out.close()
        self.procs[name] = p
        return p

    def alive(self, name):
        p = self.procs[name]
        if p.poll() is not None:
            raise TestFailure("%s exited early with %s:\n%s"
                              % (name, p.returncode, self.tail(name)))

    def tail(self, name, n=15):
        try:
            with open(os.path.join(self.log_dir, name + ".log"), errors="replace") as f:
                return "".join("    " + l for l in f.readlines()[-n:])
        except OSError:
            return ""

    def stop(self, name, timeout=10):
        """SIGTERM, wait, SIGKILL; returns the exit status (None if killed)."""
        p = self.procs.get(name)
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                return None
        return p.returncode

    def stop_all(self, timeout=5):
        """SIGTERM to every live child at once, then SIGKILL after `timeout`."""
        live = [p for p in self.procs.values() if p.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in live:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def wait_for(what, fn, timeout, procs=(), pm=None, interval=0.1):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        for name in procs:
            pm.alive(name)
        try:
            value = fn()
            if value:
                return value
            last = value
        except grpc.RpcError as e:
            last = "%s: %s" % (e.code(), e.details())
        if time.monotonic() > deadline:
            raise TestFailure("timed out after %ss waiting for %s (last: %r)"
                              % (timeout, what, last))
        time.sleep(interval)


# --- the test ----------------------------------------------------------------------------


def run(args, tmp):
    refl_pb2, health_pb2 = compile_protos(os.path.join(tmp, "stubs"))
    logs = os.path.join(tmp, "logs")
    os.makedirs(logs)
    pm = Procs(logs)
    try:
        body(args, tmp, pm, refl_pb2, health_pb2)
    except BaseException:
        for name in pm.procs:
            sys.stderr.write("---- %s.log\n%s" % (name, pm.tail(name)))
        raise
    finally:
        pm.stop_all()


def health_check(channel, health_pb2, service=""):
    call = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    resp = call(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE_S)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def body(args, tmp, pm, refl_pb2, health_pb2):
    b = args.bin_dir
    scheduler_bin = os.path.join(b, "server/scheduler/lmps_scheduler")
    server_bin = os.path.join(b, "server/lmps_server")
    worker_bin = os.path.join(b, "worker/lmps_worker")
    for f in (scheduler_bin, server_bin, worker_bin):
        check(os.access(f, os.X_OK), "binary not found: %s" % f)

    job = os.path.join(tmp, "job.textproto")
    with open(job, "w") as f:
        f.write(
            'name: "reflection-test"\n'
            "model { n_layer: 1 n_head: 2 n_embd: 32 block_size: 16 }\n"
            "train { steps: 1000000 batch_size: 4 eval_interval: 1000000 "
            "checkpoint_interval: 1000000 }\n"
            "layout { dp: 1 num_shards: 1 }\n"
        )
    port_file = os.path.join(tmp, "scheduler.port")
    pm.start("scheduler", [scheduler_bin, "--job=" + job, "--listen=127.0.0.1:0",
                           "--port_file=" + port_file, "--lease_s=5",
                           "--assemble_timeout_s=60"])
    port = wait_for("the scheduler's port file",
                    lambda: open(port_file).read().strip()
                    if os.path.exists(port_file) else "",
                    20, ["scheduler"], pm)
    sched_addr = "127.0.0.1:" + port
    log("scheduler at " + sched_addr)
    sched = grpc.insecure_channel(sched_addr)
    grpc.channel_ready_future(sched).result(timeout=10)

    # 1. Services through reflection.
    refl = Reflection(sched, refl_pb2)
    services = refl.list_services()
    log("scheduler services: %s" % services)
    for want in ["lmps.Scheduler", "grpc.health.v1.Health",
                 "grpc.reflection.v1alpha.ServerReflection"]:
        check(want in services, "reflection does not list %s: %s" % (want, services))
    try:
        refl.files_containing("grpc.health.v1.Health")
        log("observed: reflection serves grpc.health.v1.Health's descriptor")
    except LookupError as e:
        log("observed: reflection has no descriptor for grpc.health.v1.Health (%s);"
            " grpcurl needs -proto health.proto for it" % e)

    # 2. lmps.Scheduler's descriptor; GetStatus called dynamically.
    pool = descriptor_pool.DescriptorPool()
    files = refl.load_symbol("lmps.Scheduler", pool)
    log("descriptor files from reflection: %s" % sorted(files))
    sched_stub = DynamicStub(sched, pool, "lmps.Scheduler")
    methods = sorted(sched_stub.service.methods_by_name)
    check(set(methods) >= {"Register", "GetAssignment", "Heartbeat", "GetStatus"},
          "lmps.Scheduler methods: %s" % methods)
    get_status = sched_stub.method("GetStatus")
    ROLE_SERVER = enum_value(pool, "lmps.Role", "SERVER")
    ROLE_WORKER = enum_value(pool, "lmps.Role", "WORKER")
    ASSEMBLING = enum_value(pool, "lmps.JobState", "ASSEMBLING")
    RUNNING = enum_value(pool, "lmps.JobState", "RUNNING")

    status = get_status()
    check(status.state == ASSEMBLING, "job state %s before any node" % status.state)
    check(status.expected_servers == 1 and status.expected_workers == 1,
          "expected 1 server and 1 worker: %s" % json_format.MessageToDict(status))
    check(status.spec.name == "reflection-test", "spec name %r" % status.spec.name)

    ckpt = os.path.join(tmp, "ckpt")
    pm.start("server", [server_bin, "--scheduler=" + sched_addr,
                        "--listen=127.0.0.1:0", "--advertise_host=127.0.0.1",
                        "--checkpoint_dir=" + ckpt, "--assemble_timeout_s=60"])

    def server_node():
        for n in get_status().nodes:
            if n.role == ROLE_SERVER:
                return n
        return None

    node = wait_for("the shard in GetStatus", server_node, 20, ["scheduler", "server"], pm)
    log("GetStatus (dynamic): %s" % json_format.MessageToJson(
        get_status(), indent=None, preserving_proto_field_name=True))
    check(node.node_id == "server-0", "server node id %r" % node.node_id)
    check(node.address.startswith("127.0.0.1:") and node.address != "127.0.0.1:0",
          "server address %r" % node.address)
    check(node.alive, "server node not alive")
    shard_addr = node.address
    shard = grpc.insecure_channel(shard_addr)
    grpc.channel_ready_future(shard).result(timeout=10)

    # 3. Health before the job assembles.
    check(health_check(sched, health_pb2) == "SERVING", "scheduler is not SERVING")
    try:
        per_service = health_check(sched, health_pb2, "lmps.Scheduler")
    except grpc.RpcError as e:
        per_service = "%s %r" % (e.code(), e.details())
    log("observed: health Check{service: \"lmps.Scheduler\"}: %s (only the "
        "server-wide status \"\" is maintained)" % per_service)
    before = health_check(shard, health_pb2)
    log("shard health while the job lacks its worker: %s" % before)
    check(before == "NOT_SERVING",
          "shard health before its parameters exist: %s (want NOT_SERVING)" % before)
    shard_refl = Reflection(shard, refl_pb2)
    shard_services = shard_refl.list_services()
    log("shard services: %s" % shard_services)
    check("lmps.ParameterServer" in shard_services,
          "shard reflection lacks lmps.ParameterServer: %s" % shard_services)
    ps_pool = descriptor_pool.DescriptorPool()
    shard_refl.load_symbol("lmps.ParameterServer", ps_pool)
    ps_stub = DynamicStub(shard, ps_pool, "lmps.ParameterServer")
    tensor_info = ps_stub.method("GetTensorInfo")
    try:
        tensor_info({"tensor": "wte.weight"})
        raise TestFailure("GetTensorInfo answered before the shard has parameters")
    except grpc.RpcError as e:
        log("GetTensorInfo before assembly: %s %r" % (e.code(), e.details()))
        check(e.code() == grpc.StatusCode.UNAVAILABLE,
              "GetTensorInfo before assembly: %s (want UNAVAILABLE)" % e.code())

    # 4. A worker completes the job: the shard becomes SERVING.
    pm.start("worker", [worker_bin, "--scheduler=" + sched_addr, "--threads=1",
                        "--data=/usr/share/common-licenses/GPL-3",
                        "--assemble_timeout_s=60"])
    t0 = time.monotonic()
    wait_for("the shard to report SERVING",
             lambda: health_check(shard, health_pb2) == "SERVING",
             30, ["scheduler", "server", "worker"], pm, interval=0.05)
    log("shard health SERVING %.2f s after the worker started" % (time.monotonic() - t0))

    def running_with_progress():
        st = get_status()
        if st.state != RUNNING:
            return None
        workers = [n for n in st.nodes if n.role == ROLE_WORKER]
        if len(workers) == 1 and workers[0].step > 0:
            return st
        return None

    st = wait_for("RUNNING with a worker past step 0", running_with_progress, 30,
                  ["scheduler", "server", "worker"], pm)
    worker = [n for n in st.nodes if n.role == ROLE_WORKER][0]
    check(math.isfinite(worker.loss) and 0 < worker.loss < 6,
          "worker loss %r" % worker.loss)
    log("GetStatus: RUNNING, %s at step %d, loss %.4f"
        % (worker.node_id, worker.step, worker.loss))

    assignment = sched_stub.method("GetAssignment")({"node_id": worker.node_id})
    log("GetAssignment(%s): %s" % (worker.node_id, json_format.MessageToJson(
        assignment, indent=None, preserving_proto_field_name=True,
        including_default_value_fields=False)[:400] + "..."))
    check(assignment.node_id == worker.node_id, "assignment for %r" % assignment.node_id)
    check(assignment.role == ROLE_WORKER and assignment.dp_rank == 0,
          "worker assignment role %s dp_rank %s" % (assignment.role, assignment.dp_rank))
    check(list(assignment.shard_addresses) == [shard_addr],
          "shard_addresses %s, want [%s]" % (list(assignment.shard_addresses), shard_addr))

    info = tensor_info({"tensor": "wte.weight"})
    log("GetTensorInfo(wte.weight): %s" % json_format.MessageToJson(
        info, indent=None, preserving_proto_field_name=True))
    check(len(info.tensors) == 1 and info.tensors[0].name == "wte.weight",
          "tensors: %s" % [t.name for t in info.tensors])
    t = info.tensors[0]
    check(list(t.shape) == [256, 32], "wte.weight shape %s" % list(t.shape))
    check(len(t.chunks) >= 1 and all(c.shard == 0 for c in t.chunks),
          "wte.weight chunks %s" % t.chunks)
    check(math.isfinite(t.l2_norm) and t.l2_norm > 0, "l2_norm %r" % t.l2_norm)

    # 5. Clean stop.
    rc_worker = pm.stop("worker")
    rc_server = pm.stop("server")
    rc_sched = pm.stop("scheduler")
    log("exit status after SIGTERM: worker %s, server %s, scheduler %s"
        % (rc_worker, rc_server, rc_sched))
    check(rc_server == 0, "lmps_server exited %s on SIGTERM (documented: 0)" % rc_server)
    check(rc_sched is not None and rc_worker is not None,
          "a daemon had to be SIGKILLed after SIGTERM")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin_dir", required=True)
    args = parser.parse_args()

    def on_signal(signo, _frame):
        raise SystemExit(128 + signo)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    base = os.environ.get("TEST_TMPDIR")
    tmp = tempfile.mkdtemp(prefix="reflection_client_test.", dir=base)
    try:
        run(args, tmp)
    except TestFailure as e:
        print("FAIL: %s" % e, file=sys.stderr, flush=True)
        return 1
    finally:
        if not base:
            shutil.rmtree(tmp, ignore_errors=True)
    print("PASS", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
