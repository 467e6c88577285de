"""soak.py - the cluster under mixed load and faults for a bounded time, with figures.

Started by run_soak.sh, which makes the model, generates folio_pb2 and (with --netns) the network
namespaces. This program starts a folio-coordinator and N folio-worker groups itself, so that it
can kill, stop and restart them, and talks the wire protocol (proto/README.md) from Python:

- Load, one thread: L connections (DEALER sockets), each with up to K requests in flight, mixed:
  streamed and unstreamed requests of a fixed prompt pool (greedy, and sampled with a seed) whose
  tokens must equal a reference run's prefix; Cancels after k tokens; client disconnects (a DEALER
  of its own closed after k tokens); short deadlines; free text and token-id prompts with the
  model's default sampling.
- Faults, a second thread: a worker SIGKILLed and started again (never g0's, so one worker lives
  the whole run and its memory is measured over all of it), a worker SIGSTOPped and continued, the
  coordinator killed (SIGKILL or SIGTERM) and started again (in the first 40% of the faults), and
  with namespaces a worker host's link taken down and up. The last part of the run has no faults.
- Checkpoints: every fault healed, the load paused until nothing is in flight, then the RSS and
  open descriptors of every process (/proc), and Status (requests migrated, failed over).

The invariant checked (shared/DESIGN.md, proto/README.md): every request gets exactly one FINAL
within its deadline plus a slack (else it is lost); delta indices continue the stream (an index
twice is a duplicate, one too far a skip); nothing arrives after a FINAL or for an id never sent;
no delta after a Cancel's answer; an OK request of the pool has exactly the reference's tokens
(migration must not change them), any other has a prefix of them; usage counts what arrived; no
status a correct request cannot earn (INVALID_ARGUMENT, INTERNAL, CANCELLED without a Cancel...).
Requests in flight when the coordinator is restarted are lost to their client by the protocol
("Coordinator restarts"): they are counted as "in flight at coordinator restart", not as lost;
the client gives them up when it learns of the restart (here: from the fault thread, as a client
would from Health's instance) and reconnects. After the load stops the cluster must hold nothing:
Status' requests in flight and every worker's running and waiting requests back to 0 (else hung).
Memory: each process alive at the end is compared with its first checkpoint taken after its own
warm-up (as long as the run's), when that checkpoint is at least a quarter of the run before the
end: RSS may grow by 5% or 2 MiB, whichever is more; descriptors by 5% or 2, whichever is more.
Descriptors are also listed by kind (TCP by service port and state, eventfds, ...; a socket in no
TCP table is a connection closed by its peer and never released), which says what leaked.

Prints a report and writes it as JSON (--report); exits 1 when the invariant or the memory bound
breaks, 2 on a set-up failure.
"""
import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import zmq

HEADER = b"FOLIOC1"
REQUEST, PARTIAL, FINAL = b"\x01", b"\x02", b"\x03"
RSS_FLOOR_KB = 2048
FD_FLOOR = 2
GROWTH = 0.05

pb = None  # folio_pb2, imported in main() from --gen


def now():
    return time.monotonic()


def log(msg):
    print("[soak %7.1f] %s" % (now() - T0, msg), flush=True)


T0 = now()


# ---- processes -------------------------------------------------------------------------------

class Proc:
    """One slot of the cluster (the coordinator, or group gI's worker) and its incarnations."""

    def __init__(self, name, argv, logdir, netns=None):
        self.name, self.argv, self.logdir, self.netns = name, argv, logdir, netns
        self.p = None
        self.started = 0.0
        self.incarnation = 0
        self.stopped = False
        self.baseline = None  # (t, rss_kb, fds, checkpoint index) of this incarnation

    def start(self):
        argv = (["ip", "netns", "exec", self.netns] if self.netns else []) + self.argv
        err = open(os.path.join(self.logdir, "%s.log" % self.name), "a")
        err.write("---- start %d at %.1f s\n" % (self.incarnation + 1, now() - T0))
        err.flush()
        # `ip netns exec` execs the program: the pid is the program's.
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        err.close()
        self.started = now()
        self.incarnation += 1
        self.stopped = False
        self.baseline = None

    def alive(self):
        return self.p is not None and self.p.poll() is None

    def send_signal(self, sig):
        if self.alive():
            os.kill(self.p.pid, sig)
        if sig == signal.SIGSTOP:
            self.stopped = True
        elif sig == signal.SIGCONT:
            self.stopped = False

    def kill(self, sig=signal.SIGKILL, wait_s=10.0):
        if not self.alive():
            return
        if self.stopped and sig != signal.SIGKILL:
            os.kill(self.p.pid, signal.SIGCONT)
        os.kill(self.p.pid, sig)
        try:
            self.p.wait(wait_s)
        except subprocess.TimeoutExpired:
            os.kill(self.p.pid, signal.SIGKILL)
            self.p.wait()
        self.stopped = False

    def sample(self):
        """(rss_kb, fds) of the live process, or None."""
        if not self.alive():
            return None
        pid = self.p.pid
        try:
            with open("/proc/%d/status" % pid) as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            fds = len(os.listdir("/proc/%d/fd" % pid))
        except (OSError, StopIteration, ValueError):
            return None
        return rss, fds


TCP_STATES = {"01": "established", "02": "syn-sent", "03": "syn-recv", "04": "fin-wait1", "05": "fin-wait2",
              "06": "time-wait", "07": "close", "08": "close-wait", "09": "last-ack", "0A": "listen", "0B": "closing"}


def fd_kinds(pid):
    """The process's descriptors by kind: TCP sockets by local port and state, other sockets, eventfds,
    epolls, pipes, files. Which kind grows says where a descriptor leak is."""
    rows = []
    for name in ("tcp", "tcp6"):
        try:
            with open("/proc/%d/net/%s" % (pid, name)) as f:
                rows += [line.split() for line in f.read().splitlines()[1:]]
        except OSError:
            pass
    port = lambda addr: int(addr.rsplit(":", 1)[1], 16)  # noqa: E731
    listening = {port(c[1]) for c in rows if c[3] == "0A"}
    tcp = {}
    for c in rows:  # named by the service's port: the local one where it listens, else the peer's
        p = port(c[1]) if port(c[1]) in listening else port(c[2])
        tcp[c[9]] = "tcp:%d:%s" % (p, TCP_STATES.get(c[3], c[3]))
    kinds = {}
    try:
        fds = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        return kinds
    for fd in fds:
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            # Not in the TCP tables: closed by the peer and never released (or another family).
            k = tcp.get(target[8:-1], "socket:unlisted")
        elif target.startswith("anon_inode:"):
            k = target[len("anon_inode:"):]
        elif target.startswith("pipe:"):
            k = "pipe"
        else:
            k = "file"
        kinds[k] = kinds.get(k, 0) + 1
    return dict(sorted(kinds.items()))


def rpc(ctx, endpoint, method, wait_ms=2000, **fields):
    """One unary request on a fresh connection; the Response or None."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    try:
        s.send_multipart([HEADER, REQUEST, pb.Request(version=1, id=1, method=method, **fields).SerializeToString()])
        if not s.poll(wait_ms):
            return None
        frames = s.recv_multipart()
        r = pb.Response()
        r.ParseFromString(frames[-1])
        return r
    finally:
        s.close()


# ---- the prompt pool and its references ------------------------------------------------------

class Entry:
    """A prompt with fixed sampling; ref: the tokens of an unfaulted run of ref_len tokens."""

    def __init__(self, i, text, sampled, seed):
        self.i, self.text, self.sampled, self.seed = i, text, sampled, seed
        self.ref = None

    def generate(self, max_tokens, stream):
        s = pb.SamplingParams(seed=self.seed)
        if self.sampled:
            s.temperature, s.top_k, s.top_p = 0.9, 40, 0.95
        else:
            s.temperature = 0.0
        return pb.GenerateRequest(text=self.text, sampling=s, max_tokens=max_tokens, stream=stream, ignore_eos=True)


def make_pool(rng, n):
    shared = "You are a careful assistant. Answer briefly and cite the rule you used. " * 3
    pool = []
    for i in range(n):
        body = "question %d: %s" % (i, " ".join(rng.choice(["why", "does", "the", "stream", "move", "on", "when",
                                                             "a", "worker", "dies", "tokens", "stay", "the", "same"])
                                              for _ in range(4 + i % 9)))
        text = (shared + body) if i % 3 == 0 else body
        pool.append(Entry(i, text, sampled=(i % 2 == 1), seed=1000 + i))
    return pool


def compute_references(ctx, endpoint, pool, ref_len, timeout_s):
    """Every entry once, unstreamed, all at once (batched equals alone on the CPU backend)."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    for e in pool:
        req = pb.Request(version=1, id=e.i + 1, method=pb.METHOD_GENERATE, generate=e.generate(ref_len, False),
                         timeout_ms=int(timeout_s * 1000))
        s.send_multipart([HEADER, REQUEST, req.SerializeToString()])
    end = now() + timeout_s + 5
    done = 0
    while done < len(pool) and now() < end:
        if not s.poll(200):
            continue
        frames = s.recv_multipart()
        r = pb.Response()
        r.ParseFromString(frames[-1])
        if frames[-2] != FINAL:
            continue
        e = pool[r.id - 1]
        if r.status.code != pb.OK or len(r.delta.tokens) != ref_len:
            raise SystemExit("reference for entry %d: %s %s, %d tokens" % (
                e.i, pb.StatusCode.Name(r.status.code), r.status.message, len(r.delta.tokens)))
        e.ref = list(r.delta.tokens)
        done += 1
    s.close()
    if done < len(pool):
        raise SystemExit("references: %d of %d answered" % (done, len(pool)))


# ---- load ------------------------------------------------------------------------------------

KINDS = [("stream", 34), ("unary", 14), ("cancel", 12), ("disconnect", 8), ("deadline", 10), ("free", 22)]


class Req:
    __slots__ = ("id", "kind", "entry", "stream", "max_tokens", "sent", "lost_at", "tokens", "cancel_after",
                 "cancel_id", "cancel_answered", "disconnect_after")

    def __init__(self):
        self.tokens = []
        self.entry = None
        self.cancel_after = self.disconnect_after = None
        self.cancel_id = None
        self.cancel_answered = False


class Conn:
    def __init__(self, load, one_shot=False):
        self.s = load.ctx.socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.connect(load.endpoint)
        self.next_id = 1
        self.live = {}      # id -> Req
        self.cancels = {}   # Cancel id -> target Req
        self.gone = {}      # ids given up (lost): a late FINAL is recognised, not "unknown"
        self.one_shot = one_shot
        self.ready_at = 0.0
        load.poller.register(self.s, zmq.POLLIN)

    def close(self, load):
        load.poller.unregister(self.s)
        self.s.close()


class Load:
    def __init__(self, args, ctx, endpoint, pool, control):
        self.args, self.ctx, self.endpoint, self.pool, self.control = args, ctx, endpoint, pool, control
        self.rng = random.Random(args.seed * 7 + 1)
        self.poller = zmq.Poller()
        self.epoch = control.epoch
        self.conns = []
        self.one_shots = []
        self.c = {k: 0 for k in ("sent", "ok", "finals", "lost", "late", "at_restart", "disconnected", "dup_index",
                                 "skipped_index", "after_final", "unknown_id", "delta_after_cancel",
                                 "mismatch_greedy", "mismatch_sampled", "prefix_mismatch", "usage_mismatch",
                                 "unexpected_status", "bad_frames", "cancel_sent", "tokens")}
        self.by_kind = {k: {} for k, _ in KINDS}
        self.codes = {}
        self.error_messages = {}  # "CODE: message with numbers as N" -> count
        self.problems = []
        self.slow = args.slow

    def problem(self, msg):
        if len(self.problems) < 50:
            self.problems.append("%.1fs %s" % (now() - T0, msg))

    def live_count(self):
        return sum(len(c.live) for c in self.conns) + sum(len(c.live) for c in self.one_shots)

    # -- sending --

    def send(self, conn, req, g, timeout_ms):
        req.id = conn.next_id
        conn.next_id += 1
        req.sent = now()
        req.lost_at = req.sent + timeout_ms / 1000.0 + self.args.slack_s * self.slow
        msg = pb.Request(version=1, id=req.id, method=pb.METHOD_GENERATE, generate=g, timeout_ms=timeout_ms)
        conn.s.send_multipart([HEADER, REQUEST, msg.SerializeToString()])
        conn.live[req.id] = req
        self.c["sent"] += 1

    def new_request(self, conn):
        rng = self.rng
        kind = rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
        req = Req()
        req.kind = kind
        timeout_ms = int(self.args.timeout_s * 1000 * self.slow)
        r = rng.random()
        max_tokens = rng.randint(8, 128) if r < 0.6 else rng.randint(128, 512) if r < 0.9 else rng.randint(512, self.args.ref_len)
        if kind == "free":
            if rng.random() < 0.5:
                text = "free %d %s" % (rng.randint(0, 10 ** 6), "x" * rng.randint(0, 40))
                g = pb.GenerateRequest(text=text, max_tokens=max_tokens, stream=rng.random() < 0.7,
                                       ignore_eos=rng.random() < 0.5)
            else:
                toks = [rng.randint(3, 390) for _ in range(rng.randint(1, 80))]
                g = pb.GenerateRequest(prompt_tokens=toks, max_tokens=max_tokens, stream=rng.random() < 0.7,
                                       ignore_eos=True)
            req.stream, req.max_tokens = g.stream, max_tokens
        else:
            req.entry = rng.choice(self.pool)
            req.stream = kind != "unary" and not (kind == "deadline" and rng.random() < 0.3)
            if kind == "deadline":
                max_tokens = self.args.ref_len
                timeout_ms = rng.randint(100, 800)
            elif kind in ("cancel", "disconnect"):
                max_tokens = rng.randint(64, self.args.ref_len)
            req.max_tokens = max_tokens
            g = req.entry.generate(max_tokens, req.stream)
            if kind == "cancel":
                req.cancel_after = rng.randint(1, min(24, max_tokens - 1))
            elif kind == "disconnect":
                req.disconnect_after = rng.randint(1, min(24, max_tokens - 1))
        if kind == "disconnect":
            conn = Conn(self, one_shot=True)
            self.one_shots.append(conn)
        self.send(conn, req, g, timeout_ms)
        self.by_kind[kind]["sent"] = self.by_kind[kind].get("sent", 0) + 1

    # -- receiving --

    def on_message(self, conn, frames):
        if len(frames) != 3 or frames[0] != HEADER or frames[1] not in (PARTIAL, FINAL):
            self.c["bad_frames"] += 1
            self.problem("bad frames %r" % (frames[:2],))
            return
        r = pb.Response()
        r.ParseFromString(frames[2])
        final = frames[1] == FINAL
        if r.id in conn.cancels:
            target = conn.cancels.pop(r.id)
            if r.status.code not in (pb.OK, pb.NOT_FOUND):
                self.unexpected("cancel answered %s" % pb.StatusCode.Name(r.status.code))
            target.cancel_answered = True
            return
        req = conn.live.get(r.id)
        if req is None:
            if r.id in conn.gone:
                if final:
                    self.c["late"] += 1
                    self.problem("late FINAL for lost request %d (%s)" % (r.id, conn.gone[r.id]))
                return
            if r.id < conn.next_id:
                self.c["after_final"] += 1
                self.problem("a message for finished request %d" % r.id)
            else:
                self.c["unknown_id"] += 1
                self.problem("a message for unknown id %d (%s)" % (r.id, r.status.message))
            return
        if r.delta.tokens:
            if req.cancel_answered and not final:
                self.c["delta_after_cancel"] += 1
                self.problem("request %d: a delta after its Cancel's answer" % r.id)
            expected = len(req.tokens)
            if r.delta.index < expected:
                self.c["dup_index"] += 1
                self.problem("request %d: delta index %d again (have %d)" % (r.id, r.delta.index, expected))
            elif r.delta.index > expected:
                self.c["skipped_index"] += 1
                self.problem("request %d: delta index %d skips (have %d)" % (r.id, r.delta.index, expected))
            req.tokens.extend(r.delta.tokens)
            self.c["tokens"] += len(r.delta.tokens)
        if final:
            del conn.live[r.id]
            self.on_final(req, r)
            if conn.one_shot:
                self.close_one_shot(conn)
            return
        if req.cancel_after is not None and req.cancel_id is None and len(req.tokens) >= req.cancel_after:
            req.cancel_id = conn.next_id
            conn.next_id += 1
            conn.cancels[req.cancel_id] = req
            msg = pb.Request(version=1, id=req.cancel_id, method=pb.METHOD_CANCEL,
                             cancel=pb.CancelRequest(target_id=req.id))
            conn.s.send_multipart([HEADER, REQUEST, msg.SerializeToString()])
            self.c["cancel_sent"] += 1
        if req.disconnect_after is not None and len(req.tokens) >= req.disconnect_after:
            del conn.live[req.id]
            self.c["disconnected"] += 1
            self.count_kind(req.kind, "disconnected")
            self.close_one_shot(conn)

    def close_one_shot(self, conn):
        conn.close(self)
        self.one_shots.remove(conn)

    def unexpected(self, what):
        self.c["unexpected_status"] += 1
        self.problem("unexpected: " + what)

    def count_kind(self, kind, what):
        self.by_kind[kind][what] = self.by_kind[kind].get(what, 0) + 1

    def on_final(self, req, r):
        code = pb.StatusCode.Name(r.status.code)
        self.c["finals"] += 1
        self.codes[code] = self.codes.get(code, 0) + 1
        self.count_kind(req.kind, code)
        if r.status.code != pb.OK:
            key = "%s: %s" % (code, re.sub(r"\d+(\.\d+)?", "N", r.status.message))
            self.error_messages[key] = self.error_messages.get(key, 0) + 1
        allowed = {pb.OK, pb.UNAVAILABLE, pb.RESOURCE_EXHAUSTED}
        if req.kind == "cancel":
            allowed.add(pb.CANCELLED)
        if req.kind == "deadline":
            allowed.add(pb.DEADLINE_EXCEEDED)
        if r.status.code not in allowed:
            self.unexpected("request %d (%s): %s %s" % (req.id, req.kind, code, r.status.message))
        if r.status.code == pb.OK:
            self.c["ok"] += 1
        got = req.tokens
        if r.status.code == pb.OK and r.result.usage.completion_tokens != len(got):
            self.c["usage_mismatch"] += 1
            self.problem("request %d: usage %d tokens, received %d" % (req.id, r.result.usage.completion_tokens, len(got)))
        if req.entry is not None:
            ref = req.entry.ref
            if r.status.code == pb.OK:
                if got != ref[:req.max_tokens]:
                    self.c["mismatch_sampled" if req.entry.sampled else "mismatch_greedy"] += 1
                    k = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
                    self.problem("request %d (%s, entry %d, %s): OK output differs from the reference at token %d "
                                 "(%d tokens, wanted %d)" % (req.id, req.kind, req.entry.i,
                                                             "sampled" if req.entry.sampled else "greedy", k,
                                                             len(got), req.max_tokens))
            elif got != ref[:len(got)]:
                self.c["prefix_mismatch"] += 1
                self.problem("request %d (%s): %s with tokens that are not the reference's prefix" % (req.id, req.kind, code))
        elif r.status.code == pb.OK and req.max_tokens and len(got) > req.max_tokens:
            self.problem("request %d: %d tokens for max_tokens %d" % (req.id, len(got), req.max_tokens))
            self.c["usage_mismatch"] += 1

    # -- the loop --

    def check_lost(self, t):
        if self.control.coordinator_down.is_set():
            return
        for conn in self.conns + self.one_shots:
            for rid in [rid for rid, q in conn.live.items() if t > q.lost_at]:
                q = conn.live.pop(rid)
                conn.gone[rid] = "%s, %d tokens" % (q.kind, len(q.tokens))
                self.c["lost"] += 1
                self.count_kind(q.kind, "lost")
                self.problem("request %d (%s, %s, %d tokens): no FINAL within its deadline + %.0f s" % (
                    rid, q.kind, "streamed" if q.stream else "unstreamed", len(q.tokens), self.args.slack_s * self.slow))
            if conn.one_shot and not conn.live:
                self.close_one_shot(conn)

    def on_restart(self):
        """The coordinator was restarted: requests in flight on it are lost to us by the protocol;
        give them up and reconnect (a new connection), as a client that saw Health's instance change."""
        n = 0
        for conn in self.conns + self.one_shots:
            for q in conn.live.values():
                n += 1
                self.count_kind(q.kind, "at_restart")
            conn.close(self)
        self.c["at_restart"] += n
        self.one_shots = []
        self.conns = [Conn(self) for _ in range(self.args.lanes)]
        log("load: %d requests in flight at the coordinator restart given up; %d connections reopened" % (
            n, len(self.conns)))

    def run(self, until):
        self.conns = [Conn(self) for _ in range(self.args.lanes)]
        last_lost_check = 0.0
        while True:
            t = now()
            ctl = self.control
            if ctl.epoch != self.epoch and not ctl.coordinator_down.is_set():
                self.epoch = ctl.epoch
                self.on_restart()
            stopping = t >= until
            paused = stopping or ctl.pause.is_set() or ctl.coordinator_down.is_set()
            if not paused:
                for conn in self.conns:
                    while len(conn.live) < self.args.per_lane and t >= conn.ready_at:
                        self.new_request(conn)
                        conn.ready_at = t + self.rng.random() * 0.05
            if t - last_lost_check > 0.25:
                self.check_lost(t)
                last_lost_check = t
            if paused and self.live_count() == 0:
                if ctl.pause.is_set():
                    ctl.quiet.set()
                if stopping:
                    return
            events = dict(self.poller.poll(50))
            for conn in list(self.conns) + list(self.one_shots):
                if events.get(conn.s):
                    for _ in range(200):  # bounded, so lost checks and pauses still run
                        try:
                            frames = conn.s.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self.on_message(conn, frames)
                        if conn.one_shot and conn not in self.one_shots:
                            break  # closed: its request ended or its client went away


# ---- faults and checkpoints ------------------------------------------------------------------

class Control:
    def __init__(self):
        self.epoch = 0
        self.coordinator_down = threading.Event()
        self.pause = threading.Event()
        self.quiet = threading.Event()
        self.stop = threading.Event()


class Cluster:
    def __init__(self, args, ctx):
        self.args, self.ctx = args, ctx
        self.ep_c, self.ep_w = args.client_endpoint, args.worker_endpoint
        ns = (lambda h: args.netns + h) if args.netns else (lambda h: None)
        b = args.build
        coord = [b + "/folio-coordinator", "--listen", self.ep_c, "--workers", self.ep_w, "-m", args.model,
                 "--heartbeat-ms", str(args.heartbeat_ms)]
        if args.netns:
            coord.append("--insecure")
        self.coordinator = Proc("coordinator", coord, args.workdir, ns("co"))
        self.workers = []
        for i in range(args.groups):
            w = [b + "/folio-worker", "--workers", self.ep_w, "--group", "g%d" % i, "-m", args.model, "--threads", "1",
                 "--heartbeat-ms", str(args.heartbeat_ms), "--kv-budget", args.kv_budget]
            self.workers.append(Proc("g%d" % i, w, args.workdir, ns("w%d" % i)))
        self.procs = [self.coordinator] + self.workers
        self.migrated = {}      # coordinator incarnation -> last requests_migrated seen
        self.failed_over = {}
        self.status_errors = 0

    def start(self):
        self.coordinator.start()
        for w in self.workers:
            w.start()

    def stop(self):
        for p in self.procs:
            p.kill(signal.SIGKILL, 5)

    def status(self, timeout_ms=2000):
        r = rpc(self.ctx, self.ep_c, pb.METHOD_STATUS, timeout_ms)
        if r is None or r.status.code != pb.OK:
            return None
        inc = self.coordinator.incarnation
        self.migrated[inc] = max(self.migrated.get(inc, 0), r.cluster.requests_migrated)
        self.failed_over[inc] = max(self.failed_over.get(inc, 0), r.cluster.requests_failed_over)
        return r.cluster

    def wait_healthy(self, timeout_s):
        end = now() + timeout_s
        while now() < end:
            s = self.status(1000)
            if s is not None and sum(1 for g in s.groups if g.healthy) == len(self.workers):
                return True
            time.sleep(0.2)
        return False

    def wait_health_answers(self, timeout_s):
        end = now() + timeout_s
        while now() < end:
            r = rpc(self.ctx, self.ep_c, pb.METHOD_HEALTH, 500)
            if r is not None and r.status.code == pb.OK:
                return r.health
            time.sleep(0.1)
        return None


class Faults:
    def __init__(self, args, cluster, control, t_faults, t_end_faults, checkpoints):
        self.args, self.cluster, self.control = args, cluster, control
        self.t_faults, self.t_end_faults = t_faults, t_end_faults
        self.checkpoints = checkpoints
        self.rng = random.Random(args.seed * 13 + 5)
        self.pending = []   # (time, description, fn)
        self.busy = set()   # slots with a fault in progress
        self.counts = {}
        self.events = []
        self.error = None
        self.link_down = set()

    def note(self, what, kind=None):
        if kind:
            self.counts[kind] = self.counts.get(kind, 0) + 1
        self.events.append("%.1f %s" % (now() - T0, what))
        log("fault: " + what)

    def later(self, delay, fn):
        self.pending.append((now() + delay, fn))

    def run(self):
        try:
            self.loop()
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            self.error = "fault thread: %r" % (e,)
            log(self.error)
            self.control.pause.clear()
            self.control.coordinator_down.clear()

    def loop(self):
        args = self.args
        while now() < self.t_faults and not self.control.stop.is_set():
            time.sleep(0.1)
        t0 = now()  # the warm-up's checkpoint may have run past t_faults
        span = max(1.0, self.t_end_faults - t0)
        # Coordinator restarts in the first 40% only: the last incarnation then lives long enough
        # past its warm-up for its memory to be judged (at least a quarter of the run).
        coord_window_end = t0 + 0.4 * span
        next_coord = t0 + max(3.0, self.rng.uniform(0.15, 0.35) * span)
        next_fault = now() + self.rng.uniform(0.5, 2.0)
        next_cp = now() + args.checkpoint_s
        while not self.control.stop.is_set():
            t = now()
            for item in [p for p in self.pending if p[0] <= t]:
                self.pending.remove(item)
                item[1]()
            if t >= self.t_end_faults:
                break
            if t >= next_cp and t < self.t_end_faults - args.checkpoint_s / 3:
                self.heal()
                self.checkpoints.take("checkpoint")
                next_cp = now() + args.checkpoint_s
                next_fault = now() + self.rng.uniform(0.5, 2.0)
                continue
            if "coordinator" in args.faults and t >= next_coord and t < coord_window_end:
                self.restart_coordinator()
                next_coord = now() + max(args.coordinator_gap_s, span / 6)
                next_fault = now() + self.rng.uniform(0.5, 2.0)
                continue
            if t >= next_fault:
                self.one_fault()
                next_fault = now() + self.rng.uniform(args.fault_gap_s * 0.5, args.fault_gap_s * 1.5)
            time.sleep(0.05)
        self.heal()

    def one_fault(self):
        rng = self.rng
        workers = self.cluster.workers
        choices = [("kill", 3), ("stop", 3), ("short_stop", 1), ("link", 3)]
        choices = [c for c in choices if c[0].replace("short_", "") in self.args.faults
                   and (c[0] != "link" or self.args.netns)]
        if not choices:
            return
        what = rng.choices([c for c, _ in choices], [w for _, w in choices])[0]
        if what == "kill":
            cands = [w for w in workers[1:] if w.name not in self.busy]
        else:
            cands = [w for w in workers if w.name not in self.busy]
        if not cands:
            return
        w = rng.choice(cands)
        self.busy.add(w.name)
        if what == "kill":
            w.kill(signal.SIGKILL)
            self.note("SIGKILL %s" % w.name, "worker SIGKILLed and restarted")

            def restart(w=w):
                w.start()
                self.busy.discard(w.name)
                self.note("restart %s" % w.name)
            self.later(rng.uniform(0.3, 2.0), restart)
        elif what in ("stop", "short_stop"):
            w.send_signal(signal.SIGSTOP)
            # short: under the 3 heartbeats that declare a group dead; long: past them.
            d = rng.uniform(0.1, 0.4) * self.args.heartbeat_ms / 200 if what == "short_stop" else rng.uniform(1.0, 4.0)
            self.note("SIGSTOP %s for %.1f s" % (w.name, d), "worker SIGSTOPped " + (
                "under 3 heartbeats" if what == "short_stop" else "1-4 s"))

            def cont(w=w):
                w.send_signal(signal.SIGCONT)
                self.busy.discard(w.name)
                self.note("SIGCONT %s" % w.name)
            self.later(d, cont)
        else:
            port = "%s%sp" % (self.args.netns, w.name.replace("g", "w"))
            self.set_link(port, "down")
            self.link_down.add(port)
            d = rng.uniform(1.0, 4.0)
            self.note("link of %s's host down for %.1f s" % (w.name, d), "worker host link down 1-4 s")

            def up(port=port, w=w):
                self.set_link(port, "up")
                self.link_down.discard(port)
                self.busy.discard(w.name)
                self.note("link of %s's host up" % w.name)
            self.later(d, up)

    def set_link(self, port, state):
        subprocess.run(["ip", "-n", self.args.netns + "sw", "link", "set", port, state], check=True)

    def restart_coordinator(self):
        c = self.cluster
        c.status()  # its last figures before it goes
        sig = signal.SIGKILL if self.rng.random() < 0.7 else signal.SIGTERM
        self.control.coordinator_down.set()
        c.coordinator.kill(sig)
        self.note("coordinator %s" % ("SIGKILL" if sig == signal.SIGKILL else "SIGTERM"),
                  "coordinator restarted after " + ("SIGKILL" if sig == signal.SIGKILL else "SIGTERM"))
        c.coordinator.start()
        h = c.wait_health_answers(10 * self.args.slow)
        if h is None:
            raise RuntimeError("the restarted coordinator does not answer Health")
        self.control.epoch += 1
        self.control.coordinator_down.clear()
        self.note("coordinator restarted (instance %d)" % h.instance)

    def heal(self):
        """Every fault undone, every group healthy."""
        for item in sorted(self.pending, key=lambda p: p[0]):
            item[1]()
        self.pending = []
        for w in self.cluster.workers:
            if w.stopped:
                w.send_signal(signal.SIGCONT)
            if not w.alive():
                w.start()
        for port in list(self.link_down):
            self.set_link(port, "up")
        self.link_down.clear()
        self.busy.clear()
        if not self.cluster.wait_healthy(30 * self.args.slow):
            raise RuntimeError("groups not all healthy 30 s after healing")


class Checkpoints:
    """Pauses the load until nothing is in flight, then samples every process."""

    def __init__(self, args, cluster, control):
        self.args, self.cluster, self.control = args, cluster, control
        self.rows = []  # {t, label, procs: {name: {pid, incarnation, rss_kb, fds}}, migrated}

    def take(self, label, paused_already=False):
        ctl = self.control
        if not paused_already:
            ctl.quiet.clear()
            ctl.pause.set()
            if not ctl.quiet.wait(self.args.timeout_s * self.args.slow + 60):
                log("checkpoint: the load did not go quiet")
        time.sleep(1.0)  # closed connections reach the coordinator
        procs = {}
        for p in self.cluster.procs:
            samples = []
            for _ in range(3):
                s = p.sample()
                if s:
                    samples.append(s)
                time.sleep(0.3)
            if not samples:
                continue
            rss = sorted(s[0] for s in samples)[len(samples) // 2]
            fds = sorted(s[1] for s in samples)[len(samples) // 2]
            procs[p.name] = {"pid": p.p.pid, "incarnation": p.incarnation, "rss_kb": rss, "fds": fds,
                             "fd_kinds": fd_kinds(p.p.pid)}
            if p.baseline is None and now() - p.started >= self.args.proc_warmup_s:
                p.baseline = (now(), rss, fds, len(self.rows), procs[p.name]["fd_kinds"])
        st = self.cluster.status()
        row = {"t": round(now() - T0, 1), "label": label, "procs": procs,
               "requests_migrated": sum(self.cluster.migrated.values())}
        self.rows.append(row)
        log("%s: %s" % (label, ", ".join("%s %d KiB %d fds" % (n, v["rss_kb"], v["fds"]) for n, v in procs.items())))
        if "coordinator" in procs:
            log("  coordinator's descriptors: %s" % procs["coordinator"]["fd_kinds"])
        if st is None:
            log("checkpoint: Status did not answer")
        if not paused_already:
            ctl.pause.clear()


def growth_verdicts(args, cluster, final_row, run_s):
    out = []
    t_end = now()
    for p in cluster.procs:
        cur = final_row["procs"].get(p.name)
        v = {"process": p.name, "incarnation": p.incarnation, "restarts": p.incarnation - 1}
        if cur is None:
            v.update(checked=False, why="not running at the end")
        elif p.baseline is None:
            v.update(checked=False, why="no checkpoint after its warm-up")
        else:
            bt, brss, bfds, bi, bkinds = p.baseline
            span = t_end - bt
            v.update(baseline_checkpoint=bi, span_s=round(span, 1), rss_kb_start=brss, rss_kb_end=cur["rss_kb"],
                     fds_start=bfds, fds_end=cur["fds"])
            if bkinds != cur["fd_kinds"]:
                v["fd_kinds_start"], v["fd_kinds_end"] = bkinds, cur["fd_kinds"]
            if span < max(15.0, run_s / 4):
                v.update(checked=False, why="measured over %.0f s only (restarted late)" % span)
            else:
                rss_ok = cur["rss_kb"] - brss <= max(GROWTH * brss, RSS_FLOOR_KB)
                fds_ok = cur["fds"] - bfds <= max(GROWTH * bfds, FD_FLOOR)
                if args.no_rss_check:  # judged on descriptors alone
                    rss_ok = True
                    v["why"] = "RSS not judged in this build (sanitizers)"
                v.update(checked=True, rss_ok=rss_ok, fds_ok=fds_ok)
        out.append(v)
    return out


# ---- main ------------------------------------------------------------------------------------

class Interrupted(Exception):
    pass


def on_signal(signum, frame):
    raise Interrupted()


def main():
    global pb
    # SIGTERM (ctest's timeout, run_soak.sh's cleanup) still stops every process this started.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", required=True)
    ap.add_argument("--gen", required=True, help="the directory of folio_pb2.py")
    ap.add_argument("--model", required=True)
    ap.add_argument("--workdir", required=True, help="logs (and ipc endpoints)")
    ap.add_argument("--client-endpoint", required=True)
    ap.add_argument("--worker-endpoint", required=True)
    ap.add_argument("--netns", default="", help="namespace prefix made by run_soak.sh (TAGco, TAGwI, TAGsw)")
    ap.add_argument("--duration", type=float, default=180, help="seconds of load, warm-up included")
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--lanes", type=int, default=4, help="client connections")
    ap.add_argument("--per-lane", type=int, default=4, help="requests in flight per connection")
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--warmup", type=float, default=0, help="seconds of load before faults (default: 10%% of the run, 10 to 120 s)")
    ap.add_argument("--checkpoint-s", type=float, default=0, help="seconds between checkpoints (default: run/6, at least 20)")
    ap.add_argument("--proc-warmup-s", type=float, default=0,
                    help="a process's age before its first counted checkpoint (default: the warm-up's length)")
    ap.add_argument("--fault-gap-s", type=float, default=2.5, help="mean seconds between faults")
    ap.add_argument("--faults", default="kill,stop,coordinator,link",
                    help="fault kinds, comma-separated: kill (workers), stop (workers), coordinator, link (--netns)")
    ap.add_argument("--coordinator-gap-s", type=float, default=30)
    ap.add_argument("--heartbeat-ms", type=int, default=200)
    ap.add_argument("--kv-budget", default="4MiB")
    ap.add_argument("--timeout-s", type=float, default=20, help="deadline of ordinary requests")
    ap.add_argument("--slack-s", type=float, default=10, help="after deadline + slack without FINAL: lost")
    ap.add_argument("--ref-len", type=int, default=768)
    ap.add_argument("--pool", type=int, default=12)
    ap.add_argument("--slow", type=float, default=1.0, help="timeout factor (sanitizer builds)")
    ap.add_argument("--no-rss-check", action="store_true", help="RSS reported, not judged (AddressSanitizer's quarantine)")
    ap.add_argument("--report", default="")
    args = ap.parse_args()
    args.faults = set(args.faults.split(","))
    sys.path.insert(0, args.gen)
    pb = __import__("folio_pb2")

    run_s = args.duration
    if not args.warmup:
        args.warmup = min(120.0, max(10.0, 0.1 * run_s))
    if not args.proc_warmup_s:
        args.proc_warmup_s = args.warmup
    if not args.checkpoint_s:
        args.checkpoint_s = max(20.0, run_s / 6)
    tail = min(30.0, max(8.0, 0.05 * run_s))  # fault-free load at the end
    log("seed %d, %.0f s (warm-up %.0f s, faults until %.0f s), %d groups, %d x %d in flight%s" % (
        args.seed, run_s, args.warmup, run_s - tail, args.groups, args.lanes, args.per_lane,
        ", namespaces " + args.netns if args.netns else ""))

    ctx = zmq.Context()
    cluster = Cluster(args, ctx)
    control = Control()
    checkpoints = Checkpoints(args, cluster, control)
    report = {"seed": args.seed, "duration_s": run_s, "groups": args.groups, "netns": bool(args.netns)}
    failures = []
    rc = 0
    try:
        cluster.start()
        if not cluster.wait_healthy(60 * args.slow):
            raise SystemExit("set-up: the groups did not all become healthy")
        rng = random.Random(args.seed)
        pool = make_pool(rng, args.pool)
        t_ref = now()
        compute_references(ctx, cluster.ep_c, pool, args.ref_len, 120 * args.slow)
        log("references: %d entries x %d tokens in %.1f s" % (len(pool), args.ref_len, now() - t_ref))

        t_start = now()
        t_faults = t_start + args.warmup
        t_end_faults = t_start + run_s - tail
        load = Load(args, ctx, cluster.ep_c, pool, control)
        faults = Faults(args, cluster, control, t_faults, t_end_faults, checkpoints)

        # The first checkpoint (every process's baseline) at the end of the warm-up, then faults.
        def warm_then_faults():
            while now() < t_faults:
                time.sleep(0.1)
            checkpoints.take("after warm-up")
            faults.run()
        fthread = threading.Thread(target=warm_then_faults, daemon=True)
        fthread.start()
        load.run(t_start + run_s)
        control.stop.set()
        fthread.join(60)
        load_s = now() - t_start

        # After the load: nothing may stay in flight in the cluster.
        hung = None
        end = now() + 10 * args.slow
        while now() < end:
            st = cluster.status()
            if st is not None:
                hung = st.requests_inflight + sum(g.load.running + g.load.waiting for g in st.groups)
                if hung == 0:
                    break
            time.sleep(0.3)
        checkpoints.take("end", paused_already=True)
        final_status = cluster.status()

        # After every fault: each pool entry still gives its reference.
        post = 0
        for e in pool:
            r = rpc(ctx, cluster.ep_c, pb.METHOD_GENERATE, int(30000 * args.slow),
                    generate=e.generate(args.ref_len, False), timeout_ms=int(30000 * args.slow))
            if r is None or r.status.code != pb.OK or list(r.delta.tokens) != e.ref:
                post += 1

        c = load.c
        verdicts = growth_verdicts(args, cluster, checkpoints.rows[-1], run_s)
        report.update({
            "load_s": round(load_s, 1),
            "requests_sent": c["sent"], "finals": c["finals"], "completed_ok": c["ok"],
            "requests_migrated": sum(cluster.migrated.values()), "requests_failed_over": sum(cluster.failed_over.values()),
            "ended_with_error": {k: v for k, v in sorted(load.codes.items()) if k != "OK"},
            "error_messages": dict(sorted(load.error_messages.items(), key=lambda kv: -kv[1])),
            "lost": c["lost"], "late_finals": c["late"], "hung": hung if hung is not None else -1,
            "in_flight_at_coordinator_restart": c["at_restart"], "client_disconnects": c["disconnected"],
            "cancels_sent": c["cancel_sent"],
            "duplicate_indices": c["dup_index"], "skipped_indices": c["skipped_index"],
            "after_final": c["after_final"], "unknown_ids": c["unknown_id"], "bad_frames": c["bad_frames"],
            "delta_after_cancel": c["delta_after_cancel"],
            "mismatch_greedy": c["mismatch_greedy"], "mismatch_sampled": c["mismatch_sampled"],
            "prefix_mismatch": c["prefix_mismatch"], "usage_mismatch": c["usage_mismatch"],
            "unexpected_status": c["unexpected_status"], "post_fault_reference_mismatch": post,
            "tokens_received": c["tokens"], "by_kind": load.by_kind, "faults": faults.counts,
            "checkpoints": checkpoints.rows, "memory": verdicts,
            "groups_healthy_at_end": sum(1 for g in final_status.groups if g.healthy) if final_status else -1,
            "problems": load.problems, "fault_events": faults.events,
        })
        if faults.error:
            failures.append(faults.error)
        for k in ("lost", "duplicate_indices", "skipped_indices", "after_final", "unknown_ids", "bad_frames",
                  "delta_after_cancel", "mismatch_greedy", "mismatch_sampled", "prefix_mismatch", "usage_mismatch",
                  "unexpected_status", "post_fault_reference_mismatch", "late_finals"):
            if report[k]:
                failures.append("%s: %d" % (k, report[k]))
        if report["hung"] != 0:
            failures.append("hung: %d" % report["hung"])
        if report["groups_healthy_at_end"] != args.groups:
            failures.append("groups healthy at the end: %d of %d" % (report["groups_healthy_at_end"], args.groups))
        for v in verdicts:
            if v.get("checked") and not (v["rss_ok"] and v["fds_ok"]):
                failures.append("%s grew: RSS %d -> %d KiB, fds %d -> %d" % (
                    v["process"], v["rss_kb_start"], v["rss_kb_end"], v["fds_start"], v["fds_end"]))
        if not any(v.get("checked") for v in verdicts):
            failures.append("no process's memory could be checked")
    except Interrupted:
        log("interrupted: the cluster is stopped")
        rc = 1
    except SystemExit as e:
        log("set-up failed: %s" % e)
        rc = 2
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        control.stop.set()
        control.pause.clear()
        cluster.stop()
    if rc:
        return rc
    report["failures"] = failures
    print_report(report)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if failures else 0


def print_report(r):
    print("\n==== soak report (seed %d, %.0f s of load, %d groups%s) ====" % (
        r["seed"], r["load_s"], r["groups"], ", namespaces" if r["netns"] else ""))
    rows = [("requests sent", r["requests_sent"]), ("completed OK", r["completed_ok"]),
            ("migrated mid-stream (Status)", r["requests_migrated"]), ("failed over (Status)", r["requests_failed_over"]),
            ("ended with an error", sum(r["ended_with_error"].values())),
            ("  by status", ", ".join("%s %d" % kv for kv in r["ended_with_error"].items()) or "-"),
            ("in flight at coordinator restart", r["in_flight_at_coordinator_restart"]),
            ("client disconnects (no FINAL due)", r["client_disconnects"]), ("cancels sent", r["cancels_sent"]),
            ("lost (no FINAL in deadline + slack)", r["lost"]), ("late FINALs", r["late_finals"]),
            ("hung (in flight after the load)", r["hung"]),
            ("duplicate / skipped delta indices", "%d / %d" % (r["duplicate_indices"], r["skipped_indices"])),
            ("after FINAL / unknown id / bad frames", "%d / %d / %d" % (r["after_final"], r["unknown_ids"], r["bad_frames"])),
            ("delta after a Cancel's answer", r["delta_after_cancel"]),
            ("OK output != reference (greedy / sampled)", "%d / %d" % (r["mismatch_greedy"], r["mismatch_sampled"])),
            ("error output not a reference prefix", r["prefix_mismatch"]), ("usage mismatches", r["usage_mismatch"]),
            ("unexpected statuses", r["unexpected_status"]),
            ("references after the faults differing", r["post_fault_reference_mismatch"]),
            ("tokens received", r["tokens_received"]),
            ("by kind", "; ".join("%s: %s" % (k, ", ".join("%s %d" % kv for kv in sorted(v.items())))
                                  for k, v in r["by_kind"].items())),
            ("faults", ", ".join("%s %d" % kv for kv in sorted(r["faults"].items())) or "-")]
    for k, v in rows:
        print("  %-44s %s" % (k, v))
    if r["error_messages"]:
        print("  error statuses by message:")
        for m, n in list(r["error_messages"].items())[:8]:
            print("    %5d  %s" % (n, m[:110]))
    print("  processes (RSS KiB, fds: at the first checkpoint after the process's warm-up -> at the end):")
    for v in r["memory"]:
        if "rss_kb_start" in v:
            mark = ("ok" if v["rss_ok"] and v["fds_ok"] else "GREW") if v.get("checked") else "not checked"
            print("    %-12s restarts %-3d RSS %6d -> %6d (%+.1f%%)  fds %3d -> %3d  over %5.0f s  %s%s" % (
                v["process"], v["restarts"], v["rss_kb_start"], v["rss_kb_end"],
                100.0 * (v["rss_kb_end"] - v["rss_kb_start"]) / max(1, v["rss_kb_start"]),
                v["fds_start"], v["fds_end"], v["span_s"], mark, (": " + v["why"]) if v.get("why") else ""))
            if "fd_kinds_start" in v:
                print("      descriptors then: %s" % v["fd_kinds_start"])
                print("      descriptors now:  %s" % v["fd_kinds_end"])
        else:
            print("    %-12s restarts %-3d not checked: %s" % (v["process"], v["restarts"], v["why"]))
    if r["problems"]:
        print("  first problems:")
        for p in r["problems"][:20]:
            print("    " + p)
    print("RESULT: %s" % ("FAIL (" + "; ".join(r["failures"]) + ")" if r["failures"] else "PASS"))


if __name__ == "__main__":
    sys.exit(main())
