#!/usr/bin/python3
"""The run report and the live status page, opened in a real browser.

Debian's headless Chromium is driven over the DevTools protocol on a pipe
(--remote-debugging-pipe: JSON messages ending in NUL on file descriptors 3
and 4, so no websocket library is needed). Two real jobs run:

 1. a small job to the end (lmps_local, dp 2, 2 shards). Its
    RUN_DIR/report.html is opened from disk. In the page, every chart's
    series must be drawn (an SVG path of non-zero length whose vertex count
    equals its data-points), the loss chart's training series must have one
    point per line of RUN_DIR/steps.jsonl, the page must log no console
    error or exception, and its screenshot must not be blank;
 2. a long job with the job's shared token (--auth_token_file) and
    --metrics_base_port. Its scheduler's http://127.0.0.1:P/status answers
    401 without the token and with a wrong one. With ?token=, once the page
    shows a few steps it is opened in the browser: one table row per node
    (2 shards + 2 workers) with address and heartbeat age, the charts as
    above, no console error, a screenshot that is not blank; after its own
    refresh interval the page has reloaded itself with more steps. Then the
    job is stopped with SIGTERM.

Screenshots go to $TEST_UNDECLARED_OUTPUTS_DIR (report.png, status.png;
Bazel keeps them in .bazel/testlogs/tests/browser_test/test.outputs/), or to
--out_dir. Without Chromium the test prints LMPS_SKIP(installable) (it is in
scripts/install_deps.sh): scripts/test.sh counts that as a failure.

Every process started here is stopped and reaped on every exit path.
Usage: browser_test.py --bin_dir=DIR [--out_dir=DIR]
"""

import argparse
import base64
import fcntl
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib

CHROMIUM = "/usr/bin/chromium"
TOKEN = "browser-test-token-0123456789"


class TestFailure(Exception):
    pass


def log(msg):
    print("browser_test: " + msg, flush=True)


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def wait_for(what, predicate, timeout_s, procs=()):
    """Polls predicate() until it returns a true value; fails naming `what`
    after timeout_s, or at once if one of `procs` exited."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        for name, p in procs:
            if p.poll() is not None:
                raise TestFailure("%s exited with %s while waiting for %s"
                                  % (name, p.returncode, what))
        if time.monotonic() > deadline:
            raise TestFailure("timed out after %gs waiting for %s"
                              % (timeout_s, what))
        time.sleep(0.2)


# --- PNG: is the screenshot blank? ------------------------------------------


def png_pixels(data):
    """(width, height, rows of RGB tuples) of an 8-bit RGB/RGBA PNG."""
    check(data[:8] == b"\x89PNG\r\n\x1a\n", "screenshot is not a PNG")
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(
                ">IIBBBBB", body)
            check(depth == 8 and color in (2, 6) and interlace == 0,
                  "unexpected PNG format (depth %d, color %d)" % (depth, color))
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 255
        rows.append([tuple(line[i:i + 3]) for i in range(0, stride, bpp)])
        prev = line
    return width, height, rows


def check_not_blank(png, name):
    width, height, rows = png_pixels(png)
    counts = {}
    for row in rows[::2]:
        for px in row[::2]:
            counts[px] = counts.get(px, 0) + 1
    total = sum(counts.values())
    background = max(counts.values())
    ink = 1 - background / total
    log("%s: %dx%d, %d colours, %.1f%% not background"
        % (name, width, height, len(counts), 100 * ink))
    check(len(counts) >= 16, "%s looks blank: %d colours" % (name, len(counts)))
    check(ink >= 0.02, "%s looks blank: %.2f%% ink" % (name, 100 * ink))


# --- Chromium over the DevTools pipe ----------------------------------------


def move_above_9(fd):
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Browser:
    """Headless Chromium with one page, spoken to over --remote-debugging-pipe."""

    def __init__(self, profile_dir):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # The child's ends above fd 9, clear of the 3 and 4 they go to.
        to_chrome_r = move_above_9(to_chrome_r)
        from_chrome_w = move_above_9(from_chrome_w)
        self.log_path = os.path.join(os.path.dirname(profile_dir),
                                     "chromium.log")
        self._stderr = open(self.log_path, "w")
        # Chromium reads commands on fd 3 and writes on fd 4: bash moves
        # the pipe ends there (pass_fds keeps them open) and execs it.
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c",
             'exec 3<&%d 4>&%d %d<&- %d>&-; exec "$@"'
             % (to_chrome_r, from_chrome_w, to_chrome_r, from_chrome_w),
             "bash", CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
             "--remote-debugging-pipe", "--no-first-run",
             "--disable-dev-shm-usage", "--hide-scrollbars",
             "--user-data-dir=" + profile_dir, "about:blank"],
            pass_fds=(to_chrome_r, from_chrome_w),
            stdout=subprocess.DEVNULL, stderr=self._stderr)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._next_id = 0
        self.events = []
        self.session = None
        target = self.call("Target.createTarget", {"url": "about:blank"})
        self.session = self.call("Target.attachToTarget", {
            "targetId": target["targetId"], "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(domain + ".enable")
        self.call("Emulation.setDeviceMetricsOverride", {
            "width": 900, "height": 1400, "deviceScaleFactor": 1,
            "mobile": False})

    def _read_message(self, deadline):
        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise TestFailure("Chromium did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                with open(self.log_path) as f:
                    tail = f.read()[-2000:]
                raise TestFailure("Chromium closed its DevTools pipe (exit %s); "
                                  "its log ends:\n%s" % (self.proc.poll(), tail))
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method, params=None, timeout_s=30):
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise TestFailure("%s failed: %s" % (method, reply["error"]))
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method, timeout_s=30):
        deadline = time.monotonic() + timeout_s
        for i, e in enumerate(self.events):
            if e["method"] == method:
                return self.events.pop(i)
        while True:
            e = self._read_message(deadline)
            if e.get("method") == method:
                return e
            if "method" in e:
                self.events.append(e)

    def open(self, url):
        self.events = []
        result = self.call("Page.navigate", {"url": url})
        check("errorText" not in result,
              "cannot open %s: %s" % (url, result.get("errorText")))
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", {
            "expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise TestFailure("page script failed: %s" % result["exceptionDetails"])
        return result["result"].get("value")

    def console_errors(self):
        self.call("Runtime.evaluate", {"expression": "1"})  # drain events
        errors = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                errors.append(p["exceptionDetails"].get("text", "exception"))
            elif (e["method"] == "Runtime.consoleAPICalled"
                  and p.get("type") in ("error", "assert")):
                errors.append(str(p.get("args")))
            elif (e["method"] == "Log.entryAdded"
                  and p["entry"].get("level") == "error"):
                errors.append(p["entry"].get("text", ""))
        return errors

    def screenshot(self):
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        return base64.b64decode(data)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.call("Browser.close", timeout_s=5)
            except (TestFailure, OSError):
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass


# The charts as the browser drew them: for every series path, its chart,
# name, data-points, vertex count and drawn length.
CHARTS_JS = """
Array.from(document.querySelectorAll('svg.chart path.series')).map(p => ({
  chart: p.closest('svg').id,
  name: p.dataset.name,
  points: Number(p.dataset.points),
  vertices: (p.getAttribute('d').match(/[ML]/g) || []).length,
  length: p.getTotalLength(),
}))
"""


def check_charts(browser, name, train_points):
    series = browser.evaluate(CHARTS_JS)
    check(series, "%s: no chart series in the page" % name)
    for s in series:
        check(s["vertices"] == s["points"],
              "%s: chart %s series %s has %d vertices for data-points %d"
              % (name, s["chart"], s["name"], s["vertices"], s["points"]))
        if s["points"] > 1:
            check(s["length"] > 0, "%s: chart %s series %s is not drawn"
                  % (name, s["chart"], s["name"]))
    train = [s for s in series if s["chart"] == "loss" and s["name"] == "train"]
    check(len(train) == 1, "%s: no training-loss series" % name)
    if train_points is not None:
        check(train[0]["points"] == train_points,
              "%s: the loss chart has %d points, the steps %d"
              % (name, train[0]["points"], train_points))
    log("%s: %d series drawn, %d training-loss points"
        % (name, len(series), train[0]["points"]))
    return train[0]["points"]


def check_page(browser, name, out_dir, train_points=None):
    points = check_charts(browser, name, train_points)
    errors = browser.console_errors()
    check(not errors, "%s: console errors: %s" % (name, errors))
    png = browser.screenshot()
    check_not_blank(png, name)
    with open(os.path.join(out_dir, name + ".png"), "wb") as f:
        f.write(png)
    return points


# --- the jobs -----------------------------------------------------------------

JOB = """
name: "browser"
model { n_layer: 2 n_head: 2 n_embd: 32 block_size: 32 }
layout { dp: 2 num_shards: 2 }
train { steps: %d batch_size: 8 eval_interval: 20 seed: 7 %s }
"""


def free_port_range(n):
    for _ in range(200):
        base = random.randint(20000, 60000 - n)
        try:
            socks = []
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise TestFailure("no free port range found")


def start_job(bin_dir, tmp, name, steps, extra_train="", extra_args=()):
    job = os.path.join(tmp, name + ".textproto")
    with open(job, "w") as f:
        f.write(JOB % (steps, extra_train))
    run_dir = os.path.join(tmp, name)
    logf = open(os.path.join(tmp, name + ".log"), "w")
    proc = subprocess.Popen(
        [os.path.join(bin_dir, "launcher/lmps_local"), "--job=" + job,
         "--run_dir=" + run_dir, "--bin_dir=" + bin_dir, "--quiet",
         "--timeout_s=240"] + list(extra_args),
        stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, run_dir, logf


def stop(proc):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def http_get(url, headers=None):
    """(status, body) of GET url; (0, error) when nothing answers."""
    try:
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


def train_points_of(html):
    m = re.search(r'data-name="train" data-points="(\d+)"', html)
    return int(m.group(1)) if m else 0


def report_test(bin_dir, tmp, browser, out_dir):
    proc, run_dir, logf = start_job(bin_dir, tmp, "report_run", steps=60)
    try:
        rc = proc.wait(timeout=240)
    finally:
        stop(proc)
        logf.close()
    check(rc == 0, "the small job exited %s (log %s)" % (rc, logf.name))
    with open(os.path.join(run_dir, "steps.jsonl")) as f:
        steps = sum(1 for line in f if '"loss"' in line)
    check(steps == 60, "steps.jsonl has %d steps with a loss, not 60" % steps)
    browser.open("file://" + os.path.join(run_dir, "report.html"))
    check_page(browser, "report", out_dir, train_points=steps)
    rows = browser.evaluate("document.querySelectorAll('#job, #sample').length")
    check(rows == 2, "report: job spec or sample missing")


def status_test(bin_dir, tmp, browser, out_dir):
    token_file = os.path.join(tmp, "token")
    with open(token_file, "w") as f:
        f.write(TOKEN + "\n")
    base = free_port_range(5)
    # Slow enough (>= 25 ms a step) that it runs while the page is checked;
    # the test stops it.
    proc, _, logf = start_job(
        bin_dir, tmp, "live_run", steps=100000,
        extra_train="debug_slow_worker_rank: 1 debug_slow_worker_delay_ms: 25",
        extra_args=["--metrics_base_port=%d" % base,
                    "--auth_token_file=" + token_file])
    try:
        url = "http://127.0.0.1:%d/status" % base
        procs = [("lmps_local", proc)]
        wait_for("the scheduler's /status on port %d" % base,
                 lambda: http_get(url)[0] != 0, 60, procs)
        code, body = http_get(url)
        check(code == 401, "/status without the token: %d, not 401" % code)
        check("worker-0" not in body, "/status without the token shows nodes")
        code, _ = http_get(url + "?token=wrong-" + TOKEN)
        check(code == 401, "/status with a wrong token: %d, not 401" % code)
        code, _ = http_get(url, {"Authorization": "Bearer " + TOKEN})
        check(code == 200, "/status with the token in a header: %d" % code)
        with_token = url + "?token=" + TOKEN
        wait_for("3 steps on the live page",
                 lambda: train_points_of(http_get(with_token)[1]) >= 3, 120,
                 procs)
        browser.open(with_token)
        nodes = browser.evaluate("""
          Array.from(document.querySelectorAll('#nodes tr.node')).map(r =>
            Array.from(r.cells).map(c => c.textContent))""")
        check(len(nodes) == 4, "live page: %d node rows, not 4: %s"
              % (len(nodes), nodes))
        for cells in nodes:
            check(re.match(r"127\.0\.0\.1:\d+$", cells[2]),
                  "live page: node %s has no address" % cells[0])
            check(re.match(r"\d+\.\d s$", cells[3]),
                  "live page: node %s has no heartbeat age" % cells[0])
            check(cells[6] == "alive", "live page: node %s is %s"
                  % (cells[0], cells[6]))
        first = check_page(browser, "status", out_dir)
        # The page reloads itself (meta refresh, 2 s; it has no script, so
        # only a reload can change it) and shows more steps.
        def advanced():
            points = browser.evaluate(
                "(document.querySelector('#loss path.series[data-name=train]')"
                " || {dataset: {points: 0}}).dataset.points")
            return int(points or 0) > first
        wait_for("the live page to reload itself with more than %d steps"
                 % first, advanced, 30, procs)
        check_charts(browser, "status after its refresh", None)
    finally:
        stop(proc)
        logf.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin_dir", required=True)
    parser.add_argument("--out_dir", default=os.environ.get(
        "TEST_UNDECLARED_OUTPUTS_DIR", ""))
    args = parser.parse_args()
    if not os.access(CHROMIUM, os.X_OK):
        print("LMPS_SKIP(installable): no %s (apt-get install chromium; "
              "scripts/install_deps.sh installs it)" % CHROMIUM, flush=True)
        return 0
    tmp = tempfile.mkdtemp(prefix="lmps_browser_", dir=os.environ.get("TEST_TMPDIR"))
    out_dir = args.out_dir or tmp
    os.makedirs(out_dir, exist_ok=True)
    browser = None
    try:
        browser = Browser(os.path.join(tmp, "profile"))
        report_test(args.bin_dir, tmp, browser, out_dir)
        status_test(args.bin_dir, tmp, browser, out_dir)
        log("PASS (screenshots in %s)" % out_dir)
        return 0
    except TestFailure as e:
        log("FAIL: %s" % e)
        for name in ("report_run.log", "live_run.log"):
            path = os.path.join(tmp, name)
            if os.path.exists(path):
                with open(path) as f:
                    log("--- %s (tail) ---\n%s" % (name, "".join(f.readlines()[-30:])))
        return 1
    finally:
        if browser is not None:
            browser.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
