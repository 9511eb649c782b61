"""Scale (issue 18): one CCA round with N clients on one machine, per phase, and a native deployment's memory
per SuperNode.

    python -m benchmarks.scale                                       # MNIST MLP, IID, 1 epoch, N = 10 25 50 100, inline
    python -m benchmarks.scale --backend inline ray --clients 10 25 50 100
    python -m benchmarks.scale --clients 100 --gamma-clients 8       # gamma chosen on 8 clients, all 100 merged
    python -m benchmarks.scale --dataset cifar10 --arch resnet20 --clients 20 --max-train 256 --tag resnet20
    python -m benchmarks.scale --deployment 8                        # SuperLink + 8 SuperNodes on 127.0.0.1

Each federation is ``fedmerge simulate --method cca --rounds 1`` (reference and gamma chosen on the held-out
probe slice, every reply checked, the cross blocks recomputed by the server) in a process of its own, so that
each peak memory is its own: the peak of the summed resident set sizes of the process and every descendant
(Ray's raylet and workers included), sampled from /proc every 0.2 s, and for the process itself its kernel
peak (ru_maxrss). Times come from the run's result.json (``rounds[0].timings``: ``round`` = configure_train to
the merged model, clients included; ``merge`` = aligning and averaging with the gamma search, BatchNorm reset
and evaluation of each candidate; the server's checks; the clients' phases) and the process's wall and CPU
time. The merge time is fitted by least squares as ``a + b N`` per backend; the ratio merge / round is
reported per N. The load average at the start of each run is recorded: the machine may be shared.

``--deployment N`` starts ``flower-superlink`` and N ``flower-supernode`` processes on 127.0.0.1 (insecure, no
``--node-config``: the server assigns partitions, as docker/compose.yaml's NUM_SUPERNODES replicas do), runs
one round with ``flwr run`` (the compose file's default workload: cifar10-mini, CNN x1, 1 epoch, unless
overridden) and reports each SuperNode's peak memory (the SuperNode and the ClientApp processes it starts),
its idle memory before the run, and the SuperLink's (with the ServerApp process it starts).

Writes ``scale.json``/``scale.md``/``scale.png`` (or ``deployment.*``) under ``--out`` (default
results/cpu/scale), and the runs under ``--out``/runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PHASES = ("phase1_wait", "verify_statistics", "select_reference", "phase2", "verify_cross_statistics", "merge")


# --- memory of a process tree, from /proc ---------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _memory(pid: int) -> tuple[int, int, int]:
    """(resident, proportional, private) bytes of one process, zeros once it is gone. Resident counts every
    page mapped in, shared ones (libraries, Ray's object store) included, so summing it over processes counts a
    shared page once per process: an upper bound. Private (Private_Clean + Private_Dirty) counts only this
    process's own pages: summed, a lower bound. Proportional (the kernel's Pss) charges a page shared by k
    processes 1/k to each, so its sum over a tree is what the tree holds, each page once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)   # the header's key matches no name
    except OSError:
        return 0, 0, 0

    def kib(name: str) -> int:
        v = fields.get(name)
        return int(v.split()[0]) * 1024 if v else 0
    return kib("Rss"), kib("Pss"), kib("Private_Clean") + kib("Private_Dirty")


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"


def tree(pid: int, kids: dict[int, list[int]] | None = None) -> list[int]:
    kids = kids if kids is not None else _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


class TreeMemory:
    """Samples, every ``period`` s, each watched process tree's summed resident, proportional and private memory
    (:func:`_memory`); keeps each tree's peaks, and the processes of the tree at its resident peak."""

    def __init__(self, roots: dict[str, int], period: float = 0.2):
        self.roots, self.period = dict(roots), period
        self.peak = {k: 0 for k in roots}
        self.peak_private = {k: 0 for k in roots}
        self.peak_pss = {k: 0 for k in roots}
        self.at_peak: dict[str, list] = {k: [] for k in roots}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, int]:
        kids = _children()
        now = {}
        for k, root in self.roots.items():
            procs = [(p, *_memory(p)) for p in tree(root, kids)]
            rss, pss, private = (sum(m[i] for m in procs) for i in (1, 2, 3))
            now[k] = rss
            self.peak_private[k] = max(self.peak_private[k], private)
            self.peak_pss[k] = max(self.peak_pss[k], pss)
            if rss > self.peak[k]:
                self.peak[k] = rss
                self.at_peak[k] = [(_command(p), _mib(r), _mib(u)) for p, r, _, u in sorted(procs, key=lambda m: -m[1])
                                   if r > 0]
        return now

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _mib(b: float) -> float:
    return b / 2 ** 20


# --- federations with fedmerge simulate --------------------------------------------------------------------
def simulate_once(args, backend: str, n: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "fedmerge.cli", "simulate", "--dataset", args.dataset, "--arch", args.arch,
           "--width", str(args.width), "--split", args.split, "--epochs", str(args.epochs), "--rounds", "1",
           "--method", "cca", "--backend", backend, "--clients", str(n), "--out", str(out),
           "--gamma-clients", str(args.gamma_clients), "--probe-size", str(args.probe_size), "--seed", str(args.seed)]
    if args.ray_workers and backend == "ray":
        cmd += ["--ray-workers", str(args.ray_workers)]
    if args.max_train:
        cmd += ["--max-train", str(args.max_train)]
    if args.max_test:
        cmd += ["--max-test", str(args.max_test)]
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    load = os.getloadavg()
    t0 = time.time()
    log = open(out.with_suffix(".log"), "w")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    with TreeMemory({"tree": p.pid}) as mem:
        try:
            _, status, usage = os.wait4(p.pid, 0)
        except KeyboardInterrupt:
            os.killpg(p.pid, signal.SIGTERM)
            raise
    wall = time.time() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    row = {"backend": backend, "clients": n, "returncode": p.returncode, "wall": wall,
           "cpu": usage.ru_utime + usage.ru_stime, "peak_rss_process_mib": usage.ru_maxrss / 1024,
           "peak_rss_tree_mib": _mib(mem.peak["tree"]), "peak_private_tree_mib": _mib(mem.peak_private["tree"]),
           "peak_pss_tree_mib": _mib(mem.peak_pss["tree"]), "processes_at_peak": mem.at_peak["tree"],
           "load_at_start": load[0], "command": " ".join(cmd[1:])}
    res_path = out / "result.json"
    if p.returncode != 0 or not res_path.exists():
        row["error"] = out.with_suffix(".log").read_text()[-2000:]
        return row
    res = json.loads(res_path.read_text())
    rnd = res["rounds"][0]
    tm = rnd["timings"]
    row.update({"timings": tm, "round": tm.get("round"), "merge": tm.get("merge"),
                "merged_accuracy": res["accuracy"]["merged"], "clients_mean_accuracy": res["accuracy"][
                    "average_of_clients"], "gamma": res["gamma"], "clients_merged": len(res["clients_merged"]),
                "clients_rejected": len(res["clients_rejected"]),
                "gamma_selected_on": rnd["merge_info"].get("gamma_selected_on")})
    row["merge_over_round"] = row["merge"] / row["round"] if row["round"] else None
    return row


def fit_line(xs, ys) -> dict:
    """Least squares y = a + b x, with R^2."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else float("nan")
    a = my - b * mx
    ss = sum((y - my) ** 2 for y in ys)
    r2 = 1 - sum((y - a - b * x) ** 2 for x, y in zip(xs, ys)) / ss if ss > 0 else float("nan")
    return {"intercept": a, "slope": b, "r2": r2}


def _phase(r: dict, *keys: str) -> float | None:
    t = r.get("timings")
    return None if t is None else float(sum(t.get(k, 0.0) for k in keys))


def run_scale(args) -> None:
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    rows = []
    for backend in args.backend:
        for n in args.clients:
            tag = f"{args.tag}_{backend}_n{n}" + (f"_g{args.gamma_clients}" if args.gamma_clients else "") + (
                f"_w{args.ray_workers}" if args.ray_workers and backend == "ray" else "")
            run_dir = (out / "runs" / tag).resolve()
            if run_dir.exists():
                shutil.rmtree(run_dir)
            print(f"{tag}: running ...", flush=True)
            r = simulate_once(args, backend, n, run_dir)
            rows.append(r)
            print(f"{tag}: wall {r['wall']:.0f} s, round {r.get('round') or float('nan'):.1f} s, merge "
                  f"{r.get('merge') or float('nan'):.1f} s, peak {r['peak_rss_tree_mib']:.0f} MiB"
                  + (f"  ERROR {r['error'][-300:]}" if "error" in r else ""), flush=True)
    fits = {}
    for backend in args.backend:
        ok = [r for r in rows if r["backend"] == backend and r.get("merge") is not None]
        if len(ok) >= 2:
            fits[backend] = {"merge": fit_line([r["clients"] for r in ok], [r["merge"] for r in ok]),
                             "round": fit_line([r["clients"] for r in ok], [r["round"] for r in ok])}
    headers = ["backend", "N", "wall s", "round s", "clients s", "server checks s", "merge s", "merge/round %",
               "transforms s", "apply s", "evaluate s", "peak RSS MiB", "peak PSS MiB", "peak private MiB", "CPU s",
               "merged %",
               "clients mean %", "gamma", "load"]
    table = []
    for r in rows:
        ok = r.get("merge") is not None
        table.append([r["backend"], r["clients"], r["wall"], r.get("round", "-"),
                      _phase(r, "phase1_wait", "phase2") if ok else "-",
                      _phase(r, "verify_statistics", "select_reference", "verify_cross_statistics") if ok else "-",
                      r.get("merge", "-"), 100 * r["merge_over_round"] if ok else "-",
                      _phase(r, "merge_transforms") if ok else "-", _phase(r, "merge_apply") if ok else "-",
                      _phase(r, "merge_evaluate") if ok else "-", r["peak_rss_tree_mib"],
                      r.get("peak_pss_tree_mib", "-"), r["peak_private_tree_mib"], r["cpu"],
                      100 * r["merged_accuracy"] if ok else "-",
                      100 * r["clients_mean_accuracy"] if ok and r["clients_mean_accuracy"] is not None else "-",
                      r.get("gamma", "-"), r["load_at_start"]])
    from benchmarks.common import environment, md_table, write_results

    fit_lines = [f"- {b}: merge = {f['merge']['intercept']:.2f} s + {f['merge']['slope']:.3f} s x N "
                 f"(R^2 {f['merge']['r2']:.3f}); round = {f['round']['intercept']:.2f} s + "
                 f"{f['round']['slope']:.3f} s x N (R^2 {f['round']['r2']:.3f})" for b, f in fits.items()]
    md = (f"# One CCA round vs the number of clients ({args.dataset}, {args.arch} x{args.width:g}, {args.split}, "
          f"{args.epochs:g} epoch; gamma chosen on "
          f"{'all clients' if not args.gamma_clients else f'{args.gamma_clients} clients'})\n\n"
          + md_table(headers, table) + "\n" + "\n".join(fit_lines) + "\n\n"
          "round: configure_train to the merged model (clients included); clients: phase 1 (training, own "
          "statistics) and phase 2 (cross statistics) as the server waited for them; server checks: the own "
          "statistics recomputed from the uploaded weights, the reference ranked on the held-out slice, every "
          "cross block checked and recomputed; merge: the gamma search and the final merge (transforms, apply, "
          "evaluate are its parts; transforms and apply are summed over the merge's worker threads). peak RSS: "
          "the resident memory of the process and its descendants, summed (a page shared by several of them "
          "counts once per process: an upper bound); peak PSS: their proportional set sizes summed (a page shared by k "
          "processes counts 1/k in each: what the tree holds, each page once); peak private: their private pages "
          "only (a lower bound). "
          "load: the 1-minute load "
          f"average at the start (this machine has {os.cpu_count()} CPUs and may be shared).\n")
    payload = {"config": vars(args), "rows": rows, "fits": fits, "environment": environment(),
               "command": "python -m benchmarks.scale " + " ".join(sys.argv[1:])}
    write_results(out, args.name, payload, md)
    _plot(out / f"{args.name}.png", rows, args)


def _plot(path: Path, rows: list[dict], args) -> None:
    from benchmarks.plots import line_plot

    for backend in args.backend:
        ok = [r for r in rows if r["backend"] == backend and r.get("merge") is not None]
        if len(ok) < 2:
            continue
        xs = [r["clients"] for r in ok]
        series = {"round": [r["round"] for r in ok],
                  "clients (phases 1 and 2)": [_phase(r, "phase1_wait", "phase2") for r in ok],
                  "server checks": [_phase(r, "verify_statistics", "select_reference", "verify_cross_statistics")
                                    for r in ok],
                  "merge": [r["merge"] for r in ok],
                  "merge: transforms (thread-s)": [_phase(r, "merge_transforms") for r in ok],
                  "merge: apply (thread-s)": [_phase(r, "merge_apply") for r in ok]}
        name = path if backend == args.backend[0] else path.with_name(f"{path.stem}_{backend}.png")
        loads = ", ".join(f"{r['load_at_start']:.1f}" for r in ok)
        line_plot(name, xs, series, title=f"one CCA round, {args.arch} on {args.dataset}, {backend} "
                  f"(load at start: {loads})", xlabel="clients N", ylabel="seconds", xticks=xs)


# --- a native deployment: SuperLink + N SuperNodes ----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_deployment(args) -> None:
    out = Path(args.out)
    work = out / "deployment_run"
    if work.exists():
        shutil.rmtree(work)
    (work / "flwr_home").mkdir(parents=True)
    port = _free_port()
    env = {**os.environ, "FLWR_HOME": str(work / "flwr_home"), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if args.data_root:
        env["FEDMERGE_DATA"] = args.data_root
    (work / "flwr_home" / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, argv: list[str]) -> None:
        procs[name] = subprocess.Popen(argv, stdout=open(work / f"{name}.log", "w"), stderr=subprocess.STDOUT,
                                       env=env, cwd=work, start_new_session=True)

    n = args.deployment
    load = os.getloadavg()
    try:
        start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                            "--database", str(work / "state.db"), "--disable-runtime-dependency-installation"])
        deadline = time.time() + 120
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.time() > deadline:
                raise RuntimeError("the SuperLink did not open its port: " + (work / "superlink.log").read_text())
            time.sleep(0.5)
        for i in range(n):
            start(f"supernode{i}", [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                    f"127.0.0.1:{port}", "--port", str(_free_port())])
        time.sleep(args.settle)
        roots = {name: p.pid for name, p in procs.items()}
        with TreeMemory(roots, period=0.25) as mem:
            idle = mem.sample()
            cfg = (f"dataset='{args.dataset}' arch='{args.arch}' width={args.width} epochs={args.epochs:g} "
                   f"split='{args.split}' method='cca' num-clients={n} min-clients={n} "
                   f"probe-size={args.probe_size} out='{(work / 'run').resolve()}'"
                   + (f" max-train={args.max_train}" if args.max_train else "")
                   + (f" max-test={args.max_test}" if args.max_test else ""))
            t0 = time.time()
            run = subprocess.run([str(BIN / "flwr"), "run", ".", "local", "--stream", "--run-config", cfg],
                                 capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.timeout)
            wall = time.time() - t0
    finally:
        for p in procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    res_path = work / "run" / "result.json"
    if not res_path.exists():
        raise RuntimeError(f"flwr run wrote no result: {run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    res = json.loads(res_path.read_text())
    nodes = [f"supernode{i}" for i in range(n)]
    peaks = [_mib(mem.peak[k]) for k in nodes]
    private = [_mib(mem.peak_private[k]) for k in nodes]
    idles = [_mib(idle[k]) for k in nodes]
    payload = {"supernodes": n, "config": cfg, "wall_flwr_run": wall, "load_at_start": load[0],
               "clients_merged": res["clients_merged"], "clients_rejected": res["clients_rejected"],
               "merged_accuracy": res["accuracy"]["merged"], "round_timings": res["rounds"][0]["timings"],
               "supernode_peak_mib": peaks, "supernode_peak_private_mib": private, "supernode_idle_mib": idles,
               "superlink_peak_private_mib": _mib(mem.peak_private["superlink"]),
               "processes_at_peak": {k: mem.at_peak[k] for k in ["superlink", *nodes]},
               "superlink_peak_mib": _mib(mem.peak["superlink"]), "superlink_idle_mib": _mib(idle["superlink"]),
               "total_peak_mib_upper_bound": sum(peaks) + _mib(mem.peak["superlink"]),
               "command": "python -m benchmarks.scale " + " ".join(sys.argv[1:])}
    from benchmarks.common import md_table, write_results

    md = (f"# SuperLink + {n} SuperNodes on 127.0.0.1 (insecure; {cfg})\n\n"
          + md_table(["process", "idle resident MiB", "peak resident MiB", "peak private MiB"],
                     [["SuperNode (mean over nodes)", sum(idles) / n, sum(peaks) / n, sum(private) / n],
                      ["SuperNode (largest)", max(idles), max(peaks), max(private)],
                      ["SuperLink (+ ServerApp)", payload["superlink_idle_mib"], payload["superlink_peak_mib"],
                       payload["superlink_peak_private_mib"]]])
          + f"\nflwr run: {wall:.0f} s; clients merged {len(res['clients_merged'])} of {n}, rejected "
            f"{len(res['clients_rejected'])}; merged accuracy {100 * res['accuracy']['merged']:.2f}%; "
            f"load at start {load[0]:.1f} on {os.cpu_count()} CPUs.\n"
            "A SuperNode's memory is that of the SuperNode process and the ClientApp processes it starts "
            "(sampled every 0.25 s); the sum of the peaks bounds what the machine held at once: "
            f"{payload['total_peak_mib_upper_bound']:.0f} MiB.\n")
    write_results(out, "deployment", payload, md)
    if sorted(res["clients_merged"]) != list(range(n)):
        raise SystemExit(f"only {len(res['clients_merged'])} of {n} clients were merged")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[10, 25, 50, 100])
    p.add_argument("--backend", nargs="+", default=["inline"], choices=["inline", "ray"])
    p.add_argument("--ray-workers", type=int, default=None, help="Ray: clients run at once (default one per CPU)")
    p.add_argument("--dataset", default=None, help="default: mnist (cifar10-mini with --deployment)")
    p.add_argument("--arch", default=None, help="default: mlp (cnn with --deployment)")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--split", default="iid")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--probe-size", type=int, default=500)
    p.add_argument("--max-train", type=int, default=0)
    p.add_argument("--max-test", type=int, default=0)
    p.add_argument("--gamma-clients", type=int, default=0, help="choose gamma on this many clients (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=os.environ.get("FEDMERGE_DATA", ""))
    p.add_argument("--deployment", type=int, default=0, metavar="N",
                   help="instead: a native SuperLink + N SuperNodes, memory per SuperNode")
    p.add_argument("--settle", type=float, default=5.0, help="deployment: seconds for the SuperNodes to connect")
    p.add_argument("--timeout", type=float, default=1800.0, help="deployment: limit for flwr run (s)")
    p.add_argument("--tag", default="mlp", help="prefix of the run folders")
    p.add_argument("--name", default="scale", help="name of the result files")
    p.add_argument("--out", default="results/cpu/scale")
    args = p.parse_args(argv)
    if args.deployment:
        args.dataset, args.arch = args.dataset or "cifar10-mini", args.arch or "cnn"
        if args.deployment < 2:
            p.error("--deployment needs at least 2 SuperNodes")
        run_deployment(args)
        return
    args.dataset, args.arch = args.dataset or "mnist", args.arch or "mlp"
    if any(n < 2 for n in args.clients):
        p.error("--clients: every N must be at least 2")
    run_scale(args)


if __name__ == "__main__":
    main()
