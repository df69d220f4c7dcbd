#!/usr/bin/python3
"""Pipeline-parallel fine-tuning benchmark: short `starter train` runs on
loopback rings, one process per node (one LibTorch thread each).

  1. training tokens/s on 1, 2 and 3 nodes (1F1B) on --model;
  2. GPipe against 1F1B on 3 nodes with 8 micro-batches on --memory-model, whose
     activations outweigh its weights: the micro-batches whose activations each
     node held at once, and each node's peak resident memory;
  3. the measured pipeline bubble of every ring run, 1 - (forward + backward) / step
     time of each stage, against the ideal (stages - 1) / (micro-batches + stages - 1).

Prints Markdown tables and writes them to bench/results/train_bench.md.

    bench/train_bench.py                               # nanollama-304m and stories15M, random weights
    bench/train_bench.py --bin build-train/bin --steps 5
"""
import argparse
import csv
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nodes_config(path, n_nodes):
    def node(secondary):
        comm = {"port": free_port()}
        if secondary:
            comm["starter_addr"] = "127.0.0.1"
        return {"addr": "127.0.0.1", "communication": comm, "inference": {"port_in": free_port(), "port_out": free_port()}}

    path.write_text(json.dumps({"nodes": {"starter": node(False), "secondary": [node(True) for _ in range(n_nodes - 1)]}}))
    return path


def prepare(bin_dir, spec, out):
    for n in (2, 3):
        subprocess.run([bin_dir / "prepare_model", spec, "--n-nodes", str(n), "--out", out], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return out


def train(work, bin_dir, model, n_nodes, schedule, seq_len, args):
    """One run on fresh secondaries; returns the rows of its --log CSV."""
    log = work / f"{model.name}-{n_nodes}-{schedule}.csv"
    cmd = [bin_dir / "starter", "train", "--ckpt", model, "--threads", "1", "--data", work / "text.txt", "--schedule", schedule,
           "--steps", args.steps, "--batch-size", args.batch_size, "--micro-batches", args.micro_batches, "--seq-len", seq_len,
           "--val-fraction", "0", "--log", log]
    secondaries = []
    if n_nodes > 1:
        config = nodes_config(work / f"nodes{n_nodes}.json", n_nodes)
        cmd += ["--nodes-config", config]
        secondaries = [subprocess.Popen([bin_dir / "secondary", "--nodes-config", config, str(i), "--threads", "1",
                                         "--chunk-cache", work / f"cache{i}"], stderr=subprocess.DEVNULL)
                       for i in range(n_nodes - 1)]
    print(f"+ {model.name}: {n_nodes} node(s), {schedule}", file=sys.stderr)
    try:
        subprocess.run(list(map(str, cmd)), check=True, stderr=subprocess.DEVNULL, timeout=3600)
    finally:
        for s in secondaries:
            s.wait(timeout=60)
    with open(log) as f:
        return list(csv.DictReader(f))


def node_names(row):
    return [k[: -len("_forward_s")] for k in row if k.endswith("_forward_s")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:nanollama-304m", help="the model of the tokens/s runs")
    ap.add_argument("--memory-model", default="random:stories15M", help="the model of the GPipe/1F1B memory runs")
    ap.add_argument("--bin", default=str(ROOT / "build" / "bin"), help="where starter, secondary and prepare_model are")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=32, help="of the tokens/s runs")
    ap.add_argument("--memory-seq-len", type=int, default=256, help="of the memory runs")
    args = ap.parse_args()
    bin_dir = pathlib.Path(args.bin).resolve()

    with tempfile.TemporaryDirectory(prefix="train_bench-") as tmp:
        work = pathlib.Path(tmp)
        speed_model = prepare(bin_dir, args.model, work / "speed")
        memory_model = prepare(bin_dir, args.memory_model, work / "memory")
        # plain words the synthetic byte-level tokenizer of a random model packs into many sequences
        words = "the model learns to split its layers over small devices and to train them together".split()
        (work / "text.txt").write_text(" ".join(words[i * 7 % len(words)] for i in range(20000)))

        measured = list(range(1, args.steps))  # the first step warms up
        speed, memory, bubble = [], [], []
        runs = [(speed_model, n, "1f1b", args.seq_len) for n in (1, 2, 3)]
        runs += [(memory_model, 3, schedule, args.memory_seq_len) for schedule in ("gpipe", "1f1b")]
        for model, n_nodes, schedule, seq_len in runs:
            rows = train(work, bin_dir, model, n_nodes, schedule, seq_len, args)
            tokens = args.batch_size * seq_len
            steady = [rows[i] for i in measured] or rows
            step_s = statistics.median(tokens / float(r["tokens_per_s"]) for r in steady)
            name = args.model if model == speed_model else args.memory_model
            speed.append((name, seq_len, n_nodes, schedule, tokens / step_s, step_s))
            last = rows[-1]
            for node in node_names(last):
                busy = statistics.median(float(r[f"{node}_forward_s"]) + float(r[f"{node}_backward_s"]) for r in steady)
                if model == memory_model:
                    memory.append((schedule, node, int(last[f"{node}_peak_held"]), float(last[f"{node}_peak_rss_mib"])))
                if n_nodes > 1:
                    ideal = (n_nodes - 1) / (args.micro_batches + n_nodes - 1)
                    bubble.append((name, n_nodes, schedule, node, 1 - busy / step_s, ideal))

    out = [f"# Fine-tuning benchmark: batch {args.batch_size} sequences in {args.micro_batches} micro-batches, {args.steps} steps "
           f"(medians of steps 2..), float32, random weights, one LibTorch thread per node, loopback, {os.cpu_count()} CPU cores\n",
           "| model | seq len | nodes | schedule | tokens/s | step s |", "|---|---|---|---|---|---|"]
    out += [f"| {m} | {sl} | {n} | {s} | {t:.1f} | {st:.2f} |" for m, sl, n, s, t, st in speed]
    out += ["", f"| {args.memory_model}, 3 nodes | node | micro-batches held at once | peak RSS MiB |", "|---|---|---|---|"]
    out += [f"| {s} | {node} | {held} | {rss:.0f} |" for s, node, held, rss in memory]
    out += ["", "| model | nodes | schedule | node | measured bubble | ideal (S-1)/(M+S-1) |", "|---|---|---|---|---|---|"]
    out += [f"| {m} | {n} | {s} | {node} | {b:.3f} | {ideal:.3f} |" for m, n, s, node, b, ideal in bubble]
    table = "\n".join(out) + "\n"
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_bench.md").write_text(table)


if __name__ == "__main__":
    main()
