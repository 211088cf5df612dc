#!/usr/bin/env python3
"""Where each follower's time goes after the source flushes its WAL: a scheduler trace of a soak.

Usage (as root, while `cargo bench --bench soak -- ... > LOG 2>&1` runs; needs `perf` and tracefs,
`mount -t tracefs nodev /sys/kernel/tracing` if it is not mounted):

    benches/tools/sched_trace.py capture LOG OUT [SECONDS]   # waits for the soak's 20 s line
    benches/tools/sched_trace.py report OUT

`capture` names the processes of both followers (the source's WAL writer, both walsenders from
`pg_stat_replication`, native's apply worker, pgferry's threads, its apply session from
`pg_stat_activity`) in OUT.roles and records the scheduler's wake-ups and switches of the whole
machine in OUT.data (`perf sched record -a`). `report` prints, per flush (the WAL writer waking the
walsenders), when each process of each chain is woken and first runs, and the CPU each used in the
10 ms after the flush. benches/README.md (2026-12-05, "Where the last p99 gap comes from") has a
report and what it showed.
"""
import collections
import os
import re
import subprocess
import sys
import time

PASSWORD = "ferry-Secret-7x!"  # tests/support/cluster.rs
CHAINS = {
    "native": [("ws_native", "walwriter"), ("worker", "ws_native")],
    "pgferry": [("ws_ferry", "walwriter"), ("ferry", "ws_ferry"), ("backend", "ferry")],
}


def psql(port, sql):
    env = dict(os.environ, PGPASSWORD=PASSWORD)
    return subprocess.run(
        ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres", "-Atc", sql],
        env=env, capture_output=True, text=True, check=True).stdout.split()


def capture(log, out, seconds):
    while " 20s:" not in open(log).read():
        time.sleep(0.5)
    text = open(log).read()
    port = {c: re.findall(rf'cluster "{c}" started on 127.0.0.1:(\d+)', text)[-1] for c in ("source", "target")}
    ps = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout.splitlines()
    source_pm = [l.split()[0] for l in ps if "postgres -D" in l and "pgferry-test-source" in l][-1]
    roles = [("walwriter", [l.split()[0] for l in ps if l.split()[1:2] == [source_pm] and "walwriter" in l])]
    for row in psql(port["source"], "SELECT CASE WHEN application_name LIKE 'pgferry%' THEN 'ws_ferry' "
                    "ELSE 'ws_native' END || ':' || pid FROM pg_stat_replication"):
        role, pid = row.split(":")
        roles.append((role, [pid]))
    roles.append(("worker", [l.split()[0] for l in ps if "logical replication worker for" in l]))
    ferry = [l.split()[0] for l in ps if "pgferry run" in l and "postgres" not in l][0]
    roles.append(("ferry", os.listdir(f"/proc/{ferry}/task")))
    roles.append(("backend", psql(port["target"], "SELECT pid FROM pg_stat_activity "
                                  "WHERE application_name = 'pgferry cdc apply'")))
    with open(out + ".roles", "w") as f:
        for role, pids in roles:
            f.write(f"{role} {' '.join(pids)}\n")
    subprocess.run(["perf", "sched", "record", "-a", "-o", out + ".data", "--", "sleep", str(seconds)],
                   capture_output=True, check=True)


def report(out):
    roles = {}
    for line in open(out + ".roles"):
        role, *pids = line.split()
        for pid in pids:
            roles[int(pid)] = role
    script = subprocess.run(["perf", "script", "-i", out + ".data", "-F", "tid,cpu,time,event,trace"],
                            capture_output=True, text=True, check=True).stdout
    head = re.compile(r"^\s*(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)$")
    events, flushes = [], []
    for line in script.splitlines():
        m = head.match(line)
        if not m:
            continue
        tid, cpu, t, name, rest = int(m[1]), int(m[2]), float(m[3]), m[4], m[5]
        if name in ("sched:sched_waking", "sched:sched_wakeup"):
            woken = int(re.search(r" pid=(\d+)", rest)[1])
            events.append((t, "wake", tid, woken, cpu))
            if roles.get(tid) == "walwriter" and roles.get(woken, "").startswith("ws_") \
                    and (not flushes or t - flushes[-1] > 0.005):
                flushes.append(t)
        elif name == "sched:sched_switch":
            nxt = int(re.search(r"next_pid=(\d+)", rest)[1])
            events.append((t, "run", int(re.search(r"prev_pid=(\d+)", rest)[1]), nxt, cpu))
    events.sort()
    role = lambda pid: roles.get(pid, "")
    first = collections.defaultdict(list)
    busy = collections.Counter()
    running = {}
    spans = []
    for t, kind, a, b, cpu in events:
        if kind == "run":
            if cpu in running:
                spans.append((running[cpu][0], t, running[cpu][1]))
            running[cpu] = (t, b)
    for i, f in enumerate(flushes):
        end = min(flushes[i + 1] if i + 1 < len(flushes) else f + 0.2, f + 0.1)
        window = [e for e in events if f <= e[0] < end]
        for chain, steps in CHAINS.items():
            at = f
            for who, waker in steps:
                w = next((e for e in window if e[0] >= at and e[1] == "wake"
                          and role(e[3]) == who and role(e[2]) == waker), None)
                r = w and next((e for e in window if e[0] >= w[0] and e[1] == "run" and e[3] == w[3]), None)
                if not r:
                    break
                first[(chain, who, "woken")].append((w[0] - f) * 1000)
                first[(chain, who, "runs")].append((r[0] - f) * 1000)
                at = r[0]
        for s, e, pid in spans:
            overlap = min(e, f + 0.01) - max(s, f)
            if overlap > 0:
                busy[role(pid) or ("idle" if pid == 0 else "other")] += overlap
    q = lambda v, p: sorted(v)[min(len(v) - 1, int(len(v) * p))]
    print(f"{len(flushes)} flushes of the source's WAL")
    for chain, steps in CHAINS.items():
        for who, _ in steps:
            for what in ("woken", "runs"):
                v = first[(chain, who, what)]
                if v:
                    print(f"{chain:8} {who:10} {what:5} after the flush: p50 {q(v, .5):5.2f}  p90 {q(v, .9):5.2f} ms (n {len(v)})")
    print("CPU in the 10 ms after a flush (of 2 x 10 ms on 2 CPUs), per flush:")
    for who, sec in busy.most_common():
        print(f"  {who:10} {sec / max(1, len(flushes)) * 1000:6.2f} ms")


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "capture":
        capture(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "10")
    elif len(sys.argv) == 3 and sys.argv[1] == "report":
        report(sys.argv[2])
    else:
        sys.exit(__doc__)
