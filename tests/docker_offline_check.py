#!/usr/bin/env python3
"""Offline validation of docker/: no Docker engine runs here, so check what can
be checked without one. Exits non-zero naming every problem found.

- every compose file parses, and every file it or its Dockerfiles reference exists;
- every node of the mounted nodes-config has a service, and each service's node
  index, address and device reservation match the nodes-config.
"""
import json
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
problems = []


def check(cond, message):
    if not cond:
        problems.append(message)
    return cond


def host_path(compose_file, volume):
    """Host side of a bind mount, or None when it comes from an environment variable."""
    src = volume.split(":")[0]
    if src.startswith("${"):
        return None
    return (compose_file.parent / src).resolve()


def check_dockerfile(path):
    if not check(path.exists(), f"{path}: missing"):
        return
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*COPY\s+(?!--)(.+)\s+\S+\s*$", line)
        if m:
            for src in m.group(1).split():
                if src != ".":
                    check((ROOT / src).exists(), f"{path.name}: COPY source {src} does not exist")


def check_compose(compose_file):
    try:
        compose = yaml.safe_load(compose_file.read_text())
    except yaml.YAMLError as e:
        problems.append(f"{compose_file.name}: does not parse: {e}")
        return
    services = compose.get("services", {})
    check(services, f"{compose_file.name}: no services")
    config = None
    gpus = {}
    for name, svc in services.items():
        where = f"{compose_file.name}: service {name}"
        build = svc.get("build", {})
        check_dockerfile((compose_file.parent / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).resolve())
        check(svc.get("networks"), f"{where}: not on the user-defined network")
        for volume in svc.get("volumes", []):
            path = host_path(compose_file, volume)
            if path is not None:
                check(path.exists() or volume.split(":")[1] == "/out", f"{where}: mounts {path}, which does not exist")
            if volume.split(":")[1] == "/config/nodes.json":
                check(volume.endswith(":ro"), f"{where}: the nodes-config must be mounted read-only")
                config = json.loads(path.read_text())
            if volume.split(":")[1] == "/model":
                check(volume.endswith(":ro"), f"{where}: the model must be mounted read-only")
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        for d in devices:
            for gpu in d.get("device_ids", []):
                check(gpu not in gpus, f"{where}: GPU {gpu} is also reserved by {gpus.get(gpu)}")
                gpus[gpu] = name
    if not check(config is not None, f"{compose_file.name}: no service mounts a nodes-config at /config/nodes.json"):
        return
    nodes = config["nodes"]
    check("starter" in services, f"{compose_file.name}: no starter service")
    check(nodes["starter"]["addr"] == "starter", f"{compose_file.name}: the starter's addr must be its service name")
    starter_cmd = services.get("starter", {}).get("command", [])
    check("--nodes-config" in starter_cmd, f"{compose_file.name}: the starter is not given the nodes-config")
    for i, sec in enumerate(nodes["secondary"]):
        name = sec["addr"]
        if not check(name in services, f"{compose_file.name}: secondary {i} (addr {name}) has no service"):
            continue
        cmd = services[name].get("command", [])
        check(cmd[:1] == ["secondary"], f"{compose_file.name}: service {name} does not run the secondary binary")
        check(cmd[-1] == str(i), f"{compose_file.name}: service {name} runs node index {cmd[-1]}, the nodes-config has it at {i}")
        check(sec["communication"]["starter_addr"] == "starter", f"{compose_file.name}: secondary {i} names another starter")
    ports = [nodes["starter"]["communication"]["port"], nodes["starter"]["inference"]["port_in"], nodes["starter"]["inference"]["port_out"]]
    for sec in nodes["secondary"]:
        ports += [sec["communication"]["port"], sec["inference"]["port_in"], sec["inference"]["port_out"]]
    check(len(ports) == len(set(ports)), f"{compose_file.name}: the nodes-config reuses a port")
    services_for_nodes = {"starter"} | {s["addr"] for s in nodes["secondary"]}
    check(set(services) == services_for_nodes, f"{compose_file.name}: services {sorted(services)} are not the nodes {sorted(services_for_nodes)}")


compose_files = sorted(DOCKER.glob("docker-compose*.yml"))
check(len(compose_files) >= 2, "docker/: expected a GPU and a CPU compose file")
for f in compose_files:
    check_compose(f)
check_dockerfile(DOCKER / "Dockerfile")
check_dockerfile(DOCKER / "Dockerfile.cuda")

for p in problems:
    print("FAIL:", p)
print(f"docker offline check: {len(compose_files)} compose files, {len(problems)} problems")
sys.exit(1 if problems else 0)
