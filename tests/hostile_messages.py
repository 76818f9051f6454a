"""The message side of the hostile client test (hostile_client_test.py):
what the client knows about the job (daemons, methods, chunks), THE RULE
that keeps a hostile request from being a legitimate one (the guard), seeded
random values and request makers, and the regression seeds. Helpers only;
the test is hostile_client_test.py.
"""

import collections
import math
import random
import re
import struct
import threading
import warnings

import grpc
from google.protobuf import descriptor

from hostile_jobs import check, log

MAX_BLOB = 2 << 20       # enormous strings/bytes; every daemon accepts 64 MiB
ROLE_SERVER, ROLE_WORKER = 2, 3


def code_name(e):
    try:
        c = e.code()
        return c.name if c is not None else "UNKNOWN"
    except Exception:  # noqa: BLE001
        return type(e).__name__



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


