#!/usr/bin/python3
"""Ring benchmark: standalone against 2- and 3-node rings on loopback, with
n_samples = 1, n_nodes, 2 x n_nodes and 8 (micro-batches of --micro-batch samples,
by default n_samples / n_nodes rounded up); optionally with every node in its own
network namespace behind a tbf bandwidth limit (root only).

Prints a Markdown table and writes it, the raw JSON and a PNG plot of
cumulative time against generated tokens (MDI-LLM's figure) to bench/results/.

    bench/ring_bench.py                          # stories260K (../shared) + random nanollama-304m, loopback
    bench/ring_bench.py --netns 1gbit,100mbit    # also in namespaces at those rates (root)
    bench/ring_bench.py --models stories260K --n-tokens 200
    bench/ring_bench.py --models tinyllama-1.1b --n-tokens 8 --name ring_bench_tinyllama
    bench/ring_bench.py --from-json              # table and plot again from bench/results/ring_bench.json
"""
import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = ROOT / "build" / "bin"
RESULTS = ROOT / "bench" / "results"
SHARED = ROOT.parent / "shared"


def sh(cmd, **kw):
    print("+", " ".join(map(str, cmd)), file=sys.stderr)
    return subprocess.run(list(map(str, cmd)), check=True, **kw)


def build():
    sh(["bash", ROOT / "scripts/install-deps.sh"])
    # the plot; Debian's package, for Debian's /usr/bin/python3 that runs this script
    if subprocess.run(["dpkg", "-s", "python3-matplotlib"], capture_output=True).returncode != 0:
        sh(["apt-get", "install", "-y", "-q", "python3-matplotlib"])
    sh(["cmake", "-S", ROOT, "-B", ROOT / "build", "-DCMAKE_BUILD_TYPE=Release"], stdout=subprocess.DEVNULL)
    sh(["cmake", "--build", ROOT / "build", "-j", str(os.cpu_count()), "--target", "starter", "secondary", "prepare_model"])


def prepare(model, work):
    """Model directory split for 1, 2 and 3 nodes."""
    if model == "stories260K" and (SHARED / "models/stories260K/stories260K.bin").exists():
        source = SHARED / "models/stories260K/stories260K.bin"
    else:
        source = f"random:{model}"
    out = work / model
    for n in (1, 2, 3):
        sh([BIN / "prepare_model", source, "--n-nodes", n, "--out", out], stdout=subprocess.DEVNULL)
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(addr, secondary):
    n = {"addr": addr, "communication": {"port": free_port()}, "inference": {"port_in": free_port(), "port_out": free_port()}}
    if secondary:
        n["communication"]["starter_addr"] = "127.0.0.1"
    return n


class Netns:
    """Each node in its own namespace, joined by a bridge namespace; tbf on every node's egress."""

    def __init__(self, n_nodes, rate):
        self.names = [f"mdibench{i}" for i in range(n_nodes)]
        self.addrs = [f"10.213.0.{i + 1}" for i in range(n_nodes)]
        self.rate = rate
        self.bridge = "mdibenchbr"

    def __enter__(self):
        self.cleanup()
        sh(["ip", "netns", "add", self.bridge])
        sh(["ip", "netns", "exec", self.bridge, "ip", "link", "add", "br0", "type", "bridge"])
        sh(["ip", "netns", "exec", self.bridge, "ip", "link", "set", "br0", "up"])
        for i, (name, addr) in enumerate(zip(self.names, self.addrs)):
            sh(["ip", "netns", "add", name])
            sh(["ip", "link", "add", f"mdiv{i}", "netns", name, "type", "veth", "peer", "name", f"mdib{i}", "netns", self.bridge])
            sh(["ip", "netns", "exec", self.bridge, "ip", "link", "set", f"mdib{i}", "master", "br0", "up"])
            sh(["ip", "netns", "exec", name, "ip", "addr", "add", f"{addr}/24", "dev", f"mdiv{i}"])
            sh(["ip", "netns", "exec", name, "ip", "link", "set", f"mdiv{i}", "up"])
            sh(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
            sh(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", f"mdiv{i}", "root", "tbf",
                "rate", self.rate, "burst", "256kb", "latency", "50ms"])
        return self

    def prefix(self, i):
        return ["ip", "netns", "exec", self.names[i]]

    def cleanup(self):
        for name in getattr(self, "names", []) + [self.bridge]:
            subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL)

    def __exit__(self, *exc):
        self.cleanup()


def run_ring(model_dir, n_nodes, n_samples, n_tokens, threads, micro_batch, work, netns=None):
    addrs = netns.addrs if netns else ["127.0.0.1"] * n_nodes
    config = {"nodes": {"starter": node(addrs[0], False), "secondary": [node(a, True) for a in addrs[1:]]}}
    for s in config["nodes"]["secondary"]:
        s["communication"]["starter_addr"] = addrs[0]
    cfg = work / f"ring{n_nodes}.json"
    cfg.write_text(json.dumps(config))
    out = work / "out.json"
    procs = []
    try:
        for i in range(n_nodes - 1):
            prefix = netns.prefix(i + 1) if netns else []
            procs.append(subprocess.Popen(prefix + [str(BIN / "secondary"), "--nodes-config", str(cfg), str(i), "--threads", str(threads),
                                                    "--chunk-cache", str(work / f"cache{i}")],
                                          stdout=subprocess.DEVNULL, stderr=open(work / f"secondary{i}.log", "w")))
        prefix = netns.prefix(0) if netns else []
        cmd = prefix + [str(BIN / "starter"), "--ckpt", str(model_dir), "--n-samples", str(n_samples), "--n-tokens", str(n_tokens),
                        "--temperature", "0", "--prompt", "Once upon a time", "--threads", str(threads), "--out", str(out),
                        "--micro-batch", str(micro_batch)]
        if n_nodes > 1:
            cmd += ["--nodes-config", str(cfg)]
        t0 = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=open(work / "starter.log", "w"))
        wall = time.time() - t0
    finally:
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    result = json.loads(out.read_text())
    result["wall_s"] = wall
    return result


def hop_overhead(model_dir, work, reps):
    """The issue's per-hop figure: (time per token on an n-node ring - standalone) / n, one
    sample, loopback; single runs vary by 2x on a busy VM, so the median of `reps` runs,
    standalone and ring alternating."""
    runs = {n: [] for n in (1, 2, 3)}
    for _ in range(reps):
        for n in runs:
            runs[n].append(run_ring(model_dir, n, 1, 480, 1, 0, work)["stats"]["tokens_per_s"])
    out = []
    for n in (2, 3):
        hops = sorted((1e6 / ring - 1e6 / alone) / n for alone, ring in zip(runs[1], runs[n]))
        out.append({"nodes": n, "reps": reps, "standalone_tok_s": statistics.median(runs[1]), "ring_tok_s": statistics.median(runs[n]),
                    "hop_us_median": statistics.median(hops), "hop_us_min": hops[0], "hop_us_max": hops[-1]})
    return out


def summarize(name, net, n_nodes, n_samples, micro_batch, result):
    stats = result["stats"]
    tokens = stats["generated_tokens"]
    row = {"model": name, "network": net, "nodes": n_nodes, "samples": n_samples, "tokens": tokens,
           "micro_batch": micro_batch or (n_samples if n_nodes == 1 else -(-n_samples // n_nodes)),
           "tokens_per_s": stats["tokens_per_s"], "ms_per_token": 1000.0 / stats["tokens_per_s"] if stats["tokens_per_s"] else 0,
           "timeline": [t for t in result["stats"].get("token_times", [])]}
    nodes = stats.get("nodes", {})
    per_node = []
    bytes_total = 0
    for key in ["starter"] + sorted(k for k in nodes if k.startswith("secondary")):
        if key not in nodes or "stage" not in nodes[key] and key != "starter":
            continue
        st = nodes[key] if key == "starter" else nodes[key]["stage"]
        frames = max(1, st["frames"])
        per_node.append(f"{key}: compute {1000 * st['compute_s'] / frames:.2f} / wait {1000 * st['idle_s'] / frames:.2f} ms")
        bytes_total += nodes[key].get("bytes_out", 0)
    row["per_node"] = "; ".join(per_node)
    # A sample's token goes once around the ring: what its round trip does not spend
    # computing, it spends in transfer (sockets, queues, scheduling), over n_nodes hops.
    compute_ms = sum(1000 * (nodes[k] if k == "starter" else nodes[k]["stage"])["compute_s"] /
                     max(1, (nodes[k] if k == "starter" else nodes[k]["stage"])["frames"])
                     for k in nodes if k == "starter" or "stage" in nodes[k])
    # a frame carries a micro-batch: its round trip yields micro_batch tokens
    round_trip_ms = row["ms_per_token"] * n_samples / min(n_samples, row["micro_batch"])
    row["transfer_ms_per_hop"] = max(0.0, round_trip_ms - compute_ms) / n_nodes if nodes else 0.0
    row["bytes_per_token"] = bytes_total / tokens if tokens and bytes_total else 0
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="stories260K,nanollama-304m")
    ap.add_argument("--n-tokens", type=int, default=0, help="new tokens per sample (default: 200 for stories260K, 24 otherwise)")
    ap.add_argument("--threads", type=int, default=0, help="LibTorch threads per node (default: cores / nodes, at least 1)")
    ap.add_argument("--netns", default="", help="comma-separated tbf rates, e.g. 1gbit,100mbit (needs root)")
    ap.add_argument("--micro-batch", type=int, default=0, help="starter --micro-batch (default 0: n_samples / n_nodes, rounded up)")
    ap.add_argument("--hop-reps", type=int, default=9, help="runs of the per-hop measurement (stories260K; 0: skip it)")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--name", default="ring_bench", help="results file name: bench/results/NAME.{md,json,png}")
    ap.add_argument("--from-json", action="store_true", help="rewrite the table and redraw the plot from bench/results/NAME.json")
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        return report(saved["rows"], saved["hop_overhead"], args.name)
    if not args.no_build:
        build()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rates = [r for r in args.netns.split(",") if r]
    if rates and os.geteuid() != 0:
        sys.exit("--netns needs root: network namespaces and tc are root-only")
    rows, hops = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        for model in args.models.split(","):
            model_dir = prepare(model, work)
            n_tokens = args.n_tokens or (200 if model == "stories260K" else 24)
            networks = [("loopback", None)] + [(f"netns {r}", r) for r in rates]
            for net, rate in networks:
                # (nodes, samples, micro-batch); 8 samples also as one batch of 8
                configs = [(1, 1, args.micro_batch), (1, 8, args.micro_batch)]
                for n in (2, 3):
                    configs += [(n, s, args.micro_batch) for s in sorted({1, n, 2 * n, 8})] + [(n, 8, 8)]
                for n_nodes, n_samples, micro_batch in configs:
                    if rate and n_nodes == 1:
                        continue
                    threads = args.threads or max(1, (os.cpu_count() or 1) // n_nodes)
                    if rate:
                        with Netns(n_nodes, rate) as ns:
                            result = run_ring(model_dir, n_nodes, n_samples, n_tokens, threads, micro_batch, work, ns)
                    else:
                        result = run_ring(model_dir, n_nodes, n_samples, n_tokens, threads, micro_batch, work)
                    row = summarize(model, net, n_nodes, n_samples, micro_batch, result)
                    rows.append(row)
                    print(f"{model} {net} {n_nodes} nodes {n_samples} samples in batches of {row['micro_batch']}: {row['tokens_per_s']:.1f} tok/s",
                          file=sys.stderr)
            if model == "stories260K" and args.hop_reps:
                hops = hop_overhead(model_dir, work, args.hop_reps)
    report(rows, hops, args.name)


def machine():
    """CPU model, cores, ISA, memory and kernel: what the figures depend on."""
    cpu, flags, mem_gib = platform.machine(), "", 0.0
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1] for line in info.splitlines() if line.startswith("flags")).split()
        mem_kib = next(line.split()[1] for line in pathlib.Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        mem_gib = int(mem_kib) / 2**20
    except (OSError, StopIteration):
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    vm = ", virtual machine" if "hypervisor" in flags else ""
    return f"{cpu} ({isa}{vm}), {os.cpu_count()} cores, {mem_gib:.0f} GiB, {platform.platform()}"


def report(rows, hops, name):
    lines = [f"Ring benchmark on {machine()}, {time.strftime('%Y-%m-%d')}. Greedy, prompt \"Once upon a time\".", "",
             "| model | network | nodes | samples | micro-batch | tokens | tokens/s | ms/token | queue+transfer ms/hop | bytes/token on the wire | per node, per frame |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['network']} | {r['nodes']} | {r['samples']} | {r['micro_batch']} | {r['tokens']} | {r['tokens_per_s']:.1f} | "
                     f"{r['ms_per_token']:.2f} | {r['transfer_ms_per_hop']:.3f} | {r['bytes_per_token']:.0f} | {r['per_node']} |")
    lines += ["", "Aggregate tokens/s with 8 samples against 1 sample, same model, network and nodes:", "",
              "| model | network | nodes | micro-batch | 1 sample tok/s | 8 samples tok/s | ratio |", "|---|---|---|---|---|---|---|"]
    for r8 in rows:
        r1 = next((r for r in rows if r["samples"] == 1 and all(r[k] == r8[k] for k in ("model", "network", "nodes"))), None)
        if r8["samples"] == 8 and r1 and r1["tokens_per_s"]:
            lines.append(f"| {r8['model']} | {r8['network']} | {r8['nodes']} | {r8['micro_batch']} | {r1['tokens_per_s']:.1f} | {r8['tokens_per_s']:.1f} | "
                         f"{r8['tokens_per_s'] / r1['tokens_per_s']:.2f}x |")
    if hops:
        lines += ["", f"Overhead per hop of a decode frame: (ms/token of the ring - standalone) / nodes; stories260K, 1 sample, 480 tokens, "
                      f"loopback, one thread per node; median of {hops[0]['reps']} runs, standalone and rings alternating:", "",
                  "| nodes | standalone tok/s | ring tok/s | per hop µs, median | min .. max |", "|---|---|---|---|---|"]
        for h in hops:
            lines.append(f"| {h['nodes']} | {h['standalone_tok_s']:.0f} | {h['ring_tok_s']:.0f} | {h['hop_us_median']:.1f} | "
                         f"{h['hop_us_min']:.1f} .. {h['hop_us_max']:.1f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    (RESULTS / f"{name}.md").write_text(table)
    (RESULTS / f"{name}.json").write_text(json.dumps({"rows": rows, "hop_overhead": hops}, indent=1))
    plot(rows, name)


def plot(rows, name):
    """One panel per model and network: cumulative time against generated tokens, as MDI-LLM plots it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing (apt-get install python3-matplotlib): no plot", file=sys.stderr)
        return
    models = sorted({r["model"] for r in rows})
    networks = list(dict.fromkeys(r["network"] for r in rows))
    fig, axes = plt.subplots(len(models), len(networks), figsize=(6 * len(networks), 4.5 * len(models)), squeeze=False)
    for row_axes, model in zip(axes, models):
        for ax, net in zip(row_axes, networks):
            shown = [r for r in rows if r["model"] == model and r["network"] == net and r["timeline"]]
            for i, r in enumerate(shown):
                # one colour per line (tab20 does not repeat within a panel), dashes by node count
                ax.plot(range(1, len(r["timeline"]) + 1), r["timeline"], color=plt.cm.tab20(i % 20),
                        linestyle={1: ":", 2: "--"}.get(r["nodes"], "-"),
                        label=f"{r['nodes']} nodes, {r['samples']} samples, batches of {r['micro_batch']}")
            ax.set_title(f"{model}, {net}")
            ax.set_xlabel("generated tokens (all samples)")
            ax.set_ylabel("time (s)")
            ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=100)
    print(f"wrote {RESULTS / f'{name}.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
