"""Runs the peer workloads (W1-W5) through dlaunch and the tools a user would pick instead,
interleaved, and prints medians and ratios against the machine's limit. Started by
scripts/bench/peers.sh, which builds dlaunch, installs the peers and sets up loopback MPI;
see that script for the workloads and docs/performance.md for the method and the figures."""

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

SLOTS = 4
MPI_ARGS = ["--oversubscribe", "--mca", "btl", "self,vader", "--mca", "oob_tcp_if_include", "lo"]
# What a task itself is, not the launcher: left out of the launcher's idle CPU (W5).
TASK_COMMANDS = {"sleep", "sh", "dash", "bash"}
HZ = os.sysconf("SC_CLK_TCK")

MPI4PY_RUNNER = """
import subprocess, sys
from mpi4py.futures import MPIPoolExecutor

def run(cmd):
    return subprocess.call(cmd, shell=True)

if __name__ == "__main__":
    cmds = open(sys.argv[1]).read().splitlines()
    with MPIPoolExecutor() as pool:
        codes = list(pool.map(run, cmds, unordered=True))
    sys.exit(1 if any(codes) else 0)
"""

DASK_LOCAL_RUNNER = """
import subprocess, sys
from dask.distributed import Client, LocalCluster

def run(cmd):
    return subprocess.call(cmd, shell=True)

if __name__ == "__main__":
    cmds = open(sys.argv[1]).read().splitlines()
    workers = int(sys.argv[2])
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, silence_logs=40) as cluster, Client(cluster) as client:
        codes = client.gather(client.map(run, cmds, pure=False))
    sys.exit(1 if any(codes) else 0)
"""

DASK_MPI_RUNNER = """
import subprocess, sys
from dask_mpi import initialize

def run(cmd):
    return subprocess.call(cmd, shell=True)

initialize(interface="lo", nthreads=1, dashboard=False)
from distributed import Client

cmds = open(sys.argv[1]).read().splitlines()
with Client() as client:
    codes = client.gather(client.map(run, cmds, pure=False))
sys.exit(1 if any(codes) else 0)
"""


class Tool:
    """How one tool runs `n` copies of a shell command with `workers` task slots."""

    def __init__(self, name, mpi_ranks=None, slow=False):
        self.name = name
        # Ranks mpirun starts for `workers` slots, for the MPI tools (None: no MPI).
        self.mpi_ranks = mpi_ranks
        # Rates and efficiencies are measured on at most --slow-max tasks (a few tasks/s).
        self.slow = slow

    def argv(self, ctx, work, cmds, workers):
        raise NotImplementedError

    def mpirun(self, ctx, workers):
        return ["mpirun", "-n", str(self.mpi_ranks(workers)), *MPI_ARGS]


class Xargs(Tool):
    def argv(self, ctx, work, cmds, workers):
        return ["sh", "-c", 'xargs -P "$1" -d "\\n" -n1 sh -c < "$2"', "xargs", str(workers), cmds]


class Parallel(Tool):
    def argv(self, ctx, work, cmds, workers):
        return ["parallel", "--will-cite", "-j", str(workers), "::::", cmds]


class Dlaunch(Tool):
    def __init__(self, name, output_root, logs="files", task_dir=True):
        super().__init__(name, mpi_ranks=lambda workers: workers + 1)
        self.output_root = output_root
        self.logs = logs
        self.task_dir = task_dir

    def argv(self, ctx, work, cmds, workers):
        lines = open(cmds).read().splitlines()
        # One template per distinct command keeps the job file small: every W is one command.
        assert len(set(lines)) == 1, "one command per workload"
        out = tempfile.mkdtemp(prefix="dlaunch-out-", dir=self.output_root)
        ctx.outputs.append(out)
        job = os.path.join(work, "job.toml")
        with open(job, "w") as f:
            f.write(
                f'[job]\nname = "peers"\noutput_dir = "{out}"\nslots_per_worker = 1\nlogs = "{self.logs}"\n'
                f"task_dir = {'true' if self.task_dir else 'false'}\n"
                f'[[tasks]]\nname = "t"\ncommand = "{lines[0]}"\ncpus = 0\n'
                f"matrix = {{ i = [{', '.join(str(i) for i in range(len(lines)))}] }}\n"
            )
        return [*self.mpirun(ctx, workers), ctx.dlaunch, job]


class Mpi4py(Tool):
    def argv(self, ctx, work, cmds, workers):
        script = os.path.join(work, "mpi4py_runner.py")
        open(script, "w").write(MPI4PY_RUNNER)
        return [*self.mpirun(ctx, workers), ctx.python, "-m", "mpi4py.futures", script, cmds]


class DaskLocal(Tool):
    def argv(self, ctx, work, cmds, workers):
        script = os.path.join(work, "dask_local_runner.py")
        open(script, "w").write(DASK_LOCAL_RUNNER)
        return [ctx.python, script, cmds, str(workers)]


class DaskMpi(Tool):
    def argv(self, ctx, work, cmds, workers):
        script = os.path.join(work, "dask_mpi_runner.py")
        open(script, "w").write(DASK_MPI_RUNNER)
        return [*self.mpirun(ctx, workers), ctx.python, script, cmds]


class Disbatch(Tool):
    def argv(self, ctx, work, cmds, workers):
        return [ctx.disbatch, "-e", "-s", f"localhost:{workers}", "-p", os.path.join(work, "db"), cmds]


class Context:
    def __init__(self, args):
        self.dlaunch = args.dlaunch
        self.python = args.python
        self.disbatch = shutil.which("disbatch", path=os.path.dirname(args.python)) or "disbatch"
        self.timeout = args.timeout
        self.cleanup = []
        # dlaunch's output directories, removed after the last run: removing 2,000 directories
        # right before a run made ext4 (without a journal, here) skip the freed inodes in every
        # later run's creates for minutes, and charged that to whichever tool ran next.
        self.outputs = []


def run_once(ctx, tool, cmd, n, workers, sample=None):
    """Seconds for the whole lifecycle of `tool` running `n` × `cmd` on `workers` slots, or
    None when it failed or ran past the timeout. `sample(pid)` runs while the tool runs."""
    work = tempfile.mkdtemp(prefix="peers-")
    ctx.cleanup.append(work)
    cmds = os.path.join(work, "cmds")
    with open(cmds, "w") as f:
        f.write((cmd + "\n") * n)
    argv = tool.argv(ctx, work, cmds, workers)
    log = open(os.path.join(work, "log"), "w+")
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # A timer ends a run past the timeout: Popen.wait(timeout=...) polls, every 50 ms once the
    # run is past 64 ms, and every figure would come in steps of 50 ms. Plain wait() blocks in
    # waitpid and returns the moment the tool exits.
    expired = threading.Event()
    timer = threading.Timer(ctx.timeout, lambda: (expired.set(), kill_group(proc)))
    timer.start()
    measured = sample(proc.pid) if sample else None
    try:
        code = proc.wait()
    finally:
        elapsed = time.perf_counter() - start
        timer.cancel()
        if expired.is_set():
            code = f"timeout ({ctx.timeout:g} s)"
        log.seek(0)
        output = log.read()
        log.close()
        for path in ctx.cleanup:
            shutil.rmtree(path, ignore_errors=True)
        ctx.cleanup.clear()
    if code != 0:
        print(f"  {tool.name}: exit {code} on {n} x {cmd!r}; last output:\n{output[-800:]}", file=sys.stderr)
        return None, measured
    return elapsed, measured


def kill_group(proc):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def descendants(root):
    """pid → (command name, CPU ticks) of `root` and every process below it."""
    parent, info = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        parent[int(entry)] = int(fields[1])
        info[int(entry)] = (comm, int(fields[11]) + int(fields[12]))
    tree, frontier = {root}, [root]
    while frontier:
        children = [p for p, pp in parent.items() if pp in frontier and p not in tree]
        tree.update(children)
        frontier = children
    return {p: info[p] for p in tree if p in info}


def idle_sampler(warmup, window):
    """CPU the tool's own processes (not its tasks) use while every slot runs a sleeping task."""

    def sample(pid):
        time.sleep(warmup)
        before = descendants(pid)
        time.sleep(window)
        after = descendants(pid)
        own = [p for p in before if p in after and before[p][0] not in TASK_COMMANDS]
        shares = [100.0 * (after[p][1] - before[p][1]) / HZ / window for p in own]
        return {"processes": len(shares), "total": sum(shares), "max": max(shares, default=0.0)}

    return sample


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def run_rounds(ctx, args, tools, workloads, w2_sizes, w4_workers, put, count, floor):
    """Interleaved: every tool once per round and workload, in an order that rotates between
    rounds."""
    for round_ in range(args.runs):
        order = tools[round_ % len(tools) :] + tools[: round_ % len(tools)]
        print(f"round {round_ + 1}/{args.runs}", file=sys.stderr)
        if "W1" in workloads or "W3" in workloads:
            put("floor", "MPI floor", floor(SLOTS))
        for tool in order:
            if "W1" in workloads:
                n = count(tool, args.w1)
                t, _ = run_once(ctx, tool, "true", n, SLOTS)
                put("W1", tool.name, None if t is None else {"n": n, "seconds": t})
            for size in w2_sizes if "W2" in workloads else []:
                n = count(tool, size)
                t, _ = run_once(ctx, tool, "sleep 0.05", n, SLOTS)
                put(f"W2-{size}", tool.name, None if t is None else {"n": n, "seconds": t})
            if "W3" in workloads:
                t, _ = run_once(ctx, tool, "true", 1, SLOTS)
                put("W3", tool.name, t)
            for workers in w4_workers if "W4" in workloads else []:
                if tool.name == order[0].name:
                    put(f"floor-{workers}", "MPI floor", floor(workers))
                n = count(tool, args.w4)
                t, _ = run_once(ctx, tool, "true", n, workers)
                put(f"W4-{workers}", tool.name, None if t is None else {"n": n, "seconds": t})
            if "W5" in workloads:
                warmup = 2.0
                seconds = warmup + args.w5_seconds + 2.0
                _, cpu = run_once(ctx, tool, f"sleep {seconds:g}", SLOTS, SLOTS, idle_sampler(warmup, args.w5_seconds))
                put("W5", tool.name, cpu)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workloads", default="W1 W2 W3 W4 W5")
    p.add_argument("--w1", type=int, default=2000)
    p.add_argument("--w2", default="200")
    p.add_argument("--w4", type=int, default=200)
    p.add_argument("--w4-workers", default="1 2 4 8 16")
    p.add_argument("--w5-seconds", type=float, default=4.0)
    p.add_argument("--slow-max", type=int, default=200)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--tools", required=True, help="space-separated names of the tools to run")
    p.add_argument("--dlaunch", required=True)
    p.add_argument(
        "--dlaunch-logs",
        default="files",
        help="log modes to run dlaunch in: files, framed, and either with -bare (task_dir = false)",
    )
    p.add_argument("--python", required=True)
    p.add_argument("--floor", required=True)
    p.add_argument("--disk", required=True, help="a directory on disk for dlaunch's output")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    ctx = Context(args)
    workloads = args.workloads.split()
    w2_sizes = [int(s) for s in args.w2.split()]
    w4_workers = [int(s) for s in args.w4_workers.split()]

    one_more = lambda workers: workers + 1  # noqa: E731 (a master rank and the workers)
    catalogue = {
        "xargs": Xargs("xargs -P"),
        "dlaunch-disk": Dlaunch("dlaunch (disk)", args.disk),
        "dlaunch-tmpfs": Dlaunch("dlaunch (tmpfs)", "/dev/shm"),
        "parallel": Parallel("GNU parallel"),
        "mpi4py": Mpi4py("mpi4py.futures", mpi_ranks=one_more),
        "dask-local": DaskLocal("dask LocalCluster"),
        # dask-mpi: rank 0 the scheduler, rank 1 the client, the rest workers.
        "dask-mpi": DaskMpi("dask-mpi", mpi_ranks=lambda workers: workers + 2),
        "disbatch": Disbatch("disBatch", slow=True),
    }
    # One row per log mode for each dlaunch peer: "dlaunch (disk)", "dlaunch (disk, framed)",
    # "dlaunch (disk, framed, no task dirs)" for framed-bare.
    for key in ("dlaunch-disk", "dlaunch-tmpfs"):
        base = catalogue.pop(key)
        for mode in args.dlaunch_logs.split():
            logs, bare = mode.removesuffix("-bare"), mode.endswith("-bare")
            extra = ([] if logs == "files" else [logs]) + (["no task dirs"] if bare else [])
            name = f"{base.name[:-1]}, {', '.join(extra)})" if extra else base.name
            catalogue[f"{key}/{mode}"] = Dlaunch(name, base.output_root, logs, not bare)
    expand = lambda t: [k for k in catalogue if k.startswith(t + "/")] or [t]  # noqa: E731
    tools = [catalogue[k] for t in args.tools.split() for k in expand(t)]
    floor_argv = lambda workers: ["mpirun", "-n", str(workers + 1), *MPI_ARGS, args.floor]  # noqa: E731

    def floor(workers):
        start = time.perf_counter()
        done = subprocess.run(floor_argv(workers), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start if done.returncode == 0 else None

    # measurements[key][tool name] = list of results, one per round
    measurements = {}

    def put(key, name, value):
        measurements.setdefault(key, {}).setdefault(name, []).append(value)

    def count(tool, n):
        return min(n, args.slow_max) if tool.slow else n

    try:
        run_rounds(ctx, args, tools, workloads, w2_sizes, w4_workers, put, count, floor)
    finally:
        for path in ctx.outputs:
            shutil.rmtree(path, ignore_errors=True)
    report = summarize(measurements, tools, workloads, w2_sizes, w4_workers)
    report["params"] = {
        "runs": args.runs,
        "slots": SLOTS,
        "w1": args.w1,
        "w2": w2_sizes,
        "w4": args.w4,
        "w4_workers": w4_workers,
        "w5_seconds": args.w5_seconds,
        "slow_max": args.slow_max,
    }
    report["machine"] = {
        "cores": os.cpu_count(),
        "load_average_after": os.getloadavg(),
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    report["runs"] = measurements
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print_table(report, tools, workloads, w2_sizes, w4_workers)
    print(f"\nJSON: {args.json}")


def summarize(m, tools, workloads, w2_sizes, w4_workers):
    """Medians per tool and workload, and ratios against the limit: xargs (fork/exec) plus the
    MPI floor (start-up) for throughput; the MPI floor for one task."""

    def med_seconds(key, name):
        runs = [r for r in m.get(key, {}).get(name, []) if r is not None]
        if not runs:
            return None, None
        return median([r["seconds"] for r in runs]), runs[0]["n"]

    floor = median(m.get("floor", {}).get("MPI floor", []))
    out = {"floor_seconds": floor, "tools": {}}
    x_w1, x_n = med_seconds("W1", "xargs -P")
    limit_w1 = x_w1 + floor if x_w1 is not None and floor is not None else None
    for tool in tools:
        r = {}
        if "W1" in workloads:
            s, n = med_seconds("W1", tool.name)
            if s is not None:
                r["W1"] = {"n": n, "seconds": s, "tasks_per_s": n / s}
                if limit_w1 is not None:
                    # The limit's rate at this tool's task count, for tools measured on fewer tasks.
                    r["W1"]["x_limit"] = s / (limit_w1 * n / x_n) if tool.slow else s / limit_w1
        for size in w2_sizes if "W2" in workloads else []:
            s, n = med_seconds(f"W2-{size}", tool.name)
            if s is not None:
                r[f"W2-{size}"] = {"n": n, "seconds": s, "efficiency": n * 0.05 / SLOTS / s}
        if "W3" in workloads:
            s = median(m.get("W3", {}).get(tool.name, []))
            if s is not None:
                r["W3"] = {"seconds": s, "over_floor": s - floor if floor is not None else None}
        for workers in w4_workers if "W4" in workloads else []:
            s, n = med_seconds(f"W4-{workers}", tool.name)
            if s is None:
                continue
            entry = {"n": n, "seconds": s, "tasks_per_s": n / s}
            xs, xn = med_seconds(f"W4-{workers}", "xargs -P")
            f = median(m.get(f"floor-{workers}", {}).get("MPI floor", []))
            if xs is not None and f is not None:
                entry["x_limit"] = s / ((xs + f) * n / xn)
            r[f"W4-{workers}"] = entry
        if "W5" in workloads:
            samples = [c for c in m.get("W5", {}).get(tool.name, []) if c]
            if samples:
                r["W5"] = {
                    "processes": samples[0]["processes"],
                    "total_percent": median([c["total"] for c in samples]),
                    "max_percent": median([c["max"] for c in samples]),
                }
        out["tools"][tool.name] = r
    out["limit_w1_seconds"] = limit_w1
    return out


def print_table(report, tools, workloads, w2_sizes, w4_workers):
    floor = report["floor_seconds"]
    print(f"\n{os.cpu_count()} cores, {SLOTS} slots each, medians of {report['params']['runs']} interleaved runs")
    if floor is not None:
        print(f"MPI floor (mpirun -n {SLOTS + 1}, MPI_Init + MPI_Finalize): {floor:.3f} s")
    if report["limit_w1_seconds"] is not None:
        print(f"W1 limit (xargs -P{SLOTS} + MPI floor): {report['limit_w1_seconds']:.3f} s")
    head = ["tool"]
    if "W1" in workloads:
        head += ["W1 tasks/s", "× limit"]
    head += [f"W2 {s} eff" for s in w2_sizes] if "W2" in workloads else []
    if "W3" in workloads:
        head += ["W3 s", "over floor"]
    head += [f"W4 {k}w t/s (×lim)" for k in w4_workers] if "W4" in workloads else []
    if "W5" in workloads:
        head += ["W5 CPU % max/total (procs)"]
    rows = [head]
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    for tool in tools:
        r = report["tools"].get(tool.name, {})
        g = lambda key, field: r.get(key, {}).get(field)  # noqa: E731
        row = [tool.name]
        if "W1" in workloads:
            n = g("W1", "n")
            note = "" if n is None or n == report["params"]["w1"] else f" (n={n})"
            row += [fmt(g("W1", "tasks_per_s"), ",.0f") + note, fmt(g("W1", "x_limit"), ".2f")]
        for s in w2_sizes if "W2" in workloads else []:
            n = g(f"W2-{s}", "n")
            note = "" if n is None or n == s else f" (n={n})"
            eff = g(f"W2-{s}", "efficiency")
            row.append("—" if eff is None else f"{100 * eff:.0f} %{note}")
        if "W3" in workloads:
            row += [fmt(g("W3", "seconds"), ".3f"), fmt(g("W3", "over_floor"), "+.3f")]
        for k in w4_workers if "W4" in workloads else []:
            tps = g(f"W4-{k}", "tasks_per_s")
            row.append("—" if tps is None else f"{tps:,.0f} ({fmt(g(f'W4-{k}', 'x_limit'), '.2f')})")
        if "W5" in workloads:
            w5 = r.get("W5")
            row.append("—" if w5 is None else f"{w5['max_percent']:.2f} / {w5['total_percent']:.2f} ({w5['processes']})")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for i, row in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


if __name__ == "__main__":
    main()
