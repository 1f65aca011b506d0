"""`fleet`: bring a local cluster up and down, serve in the foreground, show status.

    fleet serve     set up the cluster and stay in the foreground until Ctrl-C
    fleet up        the same cluster in the background; returns once it is ready
    fleet down      stop the cluster `fleet up` started
    fleet status    models, versions, replicas, URL
    fleet train     retrain a model as a Ray job (Ray Train, or Ray Tune with --tune) and follow its logs
    fleet rollout   watch and steer a model's progressive rollout (cluster/rollout_cli.py)
    fleet render    fleet's deployment for another tool: `serve-config` for `serve deploy` (cluster/serve_config.py)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster.config import SECRET_ENV, FleetSettings, load_settings
from cluster.rollout_cli import add_rollout_parser
from cluster.state import StateFile, pid_alive
from cluster.status import curl_example, describe_cluster

__all__ = ["main"]


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repository", help="model repository path or URI (default: ./model_repository)")
    p.add_argument("--host", help="the address the ingress listens on: an address (default 127.0.0.1), 0.0.0.0, "
                   "or node (each replica its node's address)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, help="KServe v2 gRPC port (default 8001; 0: no gRPC)")
    p.add_argument("--dashboard-port", type=int, help="Ray dashboard / job server port (default 8265)")
    p.add_argument("--num-cpus", type=int, help="Ray logical CPUs (default: this machine's)")
    p.add_argument("--ingress-replicas", type=int)
    p.add_argument("--worker-replicas", type=int)
    p.add_argument("--http-server", choices=["fleet", "serve"],
                   help="fleet: ingress replicas listen on the port themselves (default); serve: Ray Serve's ingress")
    p.add_argument("--no-haproxy", dest="haproxy", action="store_false", default=None,
                   help="with --http-server serve: Serve's Python proxy instead of HAProxy")
    p.add_argument("--placement", choices=["auto", "colocated", "split"],
                   help="models in the ingress replicas (colocated), in worker deployments (split), or auto (default)")
    p.add_argument("--state-dir", help="where the pid, state and log live (default ./.fleet)")
    p.add_argument("--address", help="deploy into this running Ray cluster (`ray start`'s address, or auto) "
                   "instead of starting one; fleet down then removes only what fleet deployed")
    p.add_argument("--ingress-per-node", type=int,
                   help="ingress replicas on every node (instead of --ingress-replicas in all)")


def _settings(args: argparse.Namespace) -> FleetSettings:
    keys = ("repository", "host", "port", "grpc_port", "dashboard_port", "num_cpus", "ingress_replicas",
            "worker_replicas", "http_server", "haproxy", "placement", "state_dir", "address", "ingress_per_node")
    try:
        return load_settings(**{k: getattr(args, k, None) for k in keys})
    except ValueError as exc:
        raise SystemExit(f"fleet: invalid configuration: {exc}") from None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _start_supervisor(settings: FleetSettings) -> dict:
    """Spawn the supervisor in its own session and wait until the cluster is ready."""
    state = StateFile(settings.state_dir)
    running = state.running()
    if running:
        raise SystemExit(f"fleet: a cluster is already running (pid {running['pid']}, {running['url']}); "
                         f"`fleet down` first")
    state.dir.mkdir(parents=True, exist_ok=True)
    state.remove()
    log = open(state.log_path, "ab")
    cmd = [sys.executable, "-m", "cluster.supervisor", "--settings-json", settings.model_dump_json()]
    # The settings carry the keys and the token as digests: their plain values stay in this process, out of the
    # environment the supervisor and every Ray process it starts would inherit.
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=os.getcwd(), env=env)
    log.close()
    deadline = time.monotonic() + settings.startup_timeout_s + 120
    print(f"starting fleet (log: {state.log_path}) ...", flush=True)
    while time.monotonic() < deadline:
        doc = state.read()
        if doc and doc.get("status") == "ready" and doc.get("pid") == proc.pid:
            return doc
        if doc and doc.get("status") == "failed":
            proc.wait(timeout=60)
            raise SystemExit(f"fleet: start-up failed: {doc.get('error')}\n{_tail(state.log_path)}")
        if proc.poll() is not None:
            raise SystemExit(f"fleet: the cluster process exited ({proc.returncode})\n{_tail(state.log_path)}")
        time.sleep(0.5)
    _stop(state, proc.pid)
    raise SystemExit(f"fleet: not ready after {settings.startup_timeout_s + 120:.0f} s\n{_tail(state.log_path)}")


def _stop(state: StateFile, pid: int, grace_s: float = 90.0) -> bool:
    """SIGTERM the supervisor, wait for its orderly shutdown, then kill its process group."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        state.remove()
        return False
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.25)
    if pid_alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    state.remove()
    return True


def _stop_and_report(state: StateFile, pid: int) -> None:
    print(f"stopping fleet (pid {pid}) ...", flush=True)
    _stop(state, pid)
    print("fleet stopped.")


def grpc_line(url: str, grpc_port: int | None) -> list[str]:
    """The banner's gRPC address (host:port, as tritonclient.grpc takes it), none when gRPC is off."""
    if not grpc_port:
        return []
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or "127.0.0.1"
    return [f"  gRPC:       {host}:{grpc_port} (KServe v2, tritonclient.grpc)"]


def _banner(doc: dict) -> str:
    url = doc["url"]
    lines = [
        f"fleet is serving on {url}",
        f"  repository: {doc['repository']}",
        *grpc_line(url, doc.get("settings", {}).get("grpc_port")),
        f"  metrics:    {url}/metrics",
        f"  dashboard and job server: {doc['dashboard_url']}",
        "    (token authentication is on: the `ray job` CLI needs RAY_AUTH_MODE=token, the token is ~/.ray/auth_token)",
        f"    RAY_AUTH_MODE=token ray job submit --address {doc['dashboard_url']} --working-dir . -- \\",
        "        python -m training.retrain --model fraud --num-workers 2 --epochs 5",
        "    or: fleet train fraud --num-workers 2 --epochs 5",
    ]
    example = curl_example(url)
    if example:
        lines += ["  try:", f"    {example}"]
    return "\n".join(lines)


def cmd_up(args: argparse.Namespace) -> int:
    settings = _settings(args)
    doc = _start_supervisor(settings)
    print(_banner(doc))
    print("stop it with: fleet down")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    state = StateFile(settings.state_dir)
    stopping = False

    def interrupted(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    doc = _start_supervisor(settings)
    print(_banner(doc))
    print("Ctrl-C stops it.", flush=True)
    while not stopping and pid_alive(doc["pid"]):
        time.sleep(0.5)
    if stopping:
        print()
        _stop_and_report(state, int(doc["pid"]))
        return 0
    print(f"fleet: the cluster process exited unexpectedly\n{_tail(state.log_path)}")
    return 1


def cmd_down(args: argparse.Namespace) -> int:
    state = StateFile(_settings(args).state_dir)
    doc = state.running()
    if not doc:
        print("fleet: no cluster is running")
        return 0
    _stop_and_report(state, int(doc["pid"]))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state = StateFile(_settings(args).state_dir)
    doc = state.running()
    if not doc:
        print("fleet: no cluster is running (start one with `fleet up`)")
        return 1
    info = describe_cluster(doc)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"fleet {info['status']} on {info['url']} (pid {doc['pid']}), dashboard {info['dashboard_url']}")
        print(f"repository: {info['repository']}")
        for m in info["models"]:
            versions = ",".join(m["versions"]) or "-"
            where = (f"worker replicas {m['replicas']}" if m.get("placement") == "split"
                     else "colocated in the ingress replicas")
            print(f"  {m['name']:<20} versions {versions:<10} {m['state']:<12} {where}")
        print(f"ingress replicas: {info['ingress_replicas']}")
        for node, deployments in sorted(info["nodes"].items()):
            print(f"  node {node}: " + ", ".join(f"{name} {n}" for name, n in sorted(deployments.items())))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cluster.jobs import submit_and_follow, train_entrypoint

    address = args.address
    settings = _settings(args)
    if address is None:
        doc = StateFile(settings.state_dir).running()
        if not doc:
            print("fleet: no cluster is running (start one with `fleet up`, or pass --address)")
            return 1
        address = doc["dashboard_url"]
    entrypoint = train_entrypoint(args.model, tune=args.tune, extra=args.job_args)
    _, status = submit_and_follow(address, entrypoint, nice=settings.train_nice, follow=not args.no_follow)
    done = status == "SUCCEEDED" or (args.no_follow and status in ("PENDING", "RUNNING"))
    return 0 if done else 1


def cmd_render(args: argparse.Namespace) -> int:
    import yaml

    from cluster.serve_config import render_serve_config

    text = yaml.safe_dump(render_serve_config(_settings(args)), sort_keys=False)
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}: deploy it with `RAY_AUTH_MODE=token serve deploy {args.output} --address "
              "<the cluster's dashboard URL>` (RAY_AUTH_MODE=token: when the cluster's token authentication is on)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet", description="fleet: a model-serving cluster on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, text in (
        ("serve", cmd_serve, "start the local cluster and serve in the foreground (Ctrl-C stops)"),
        ("up", cmd_up, "start the local cluster in the background"),
        ("down", cmd_down, "stop the local cluster"),
        ("status", cmd_status, "show models, versions, replicas and URL"),
    ):
        p = sub.add_parser(name, help=text)
        _add_settings_flags(p)
        p.set_defaults(fn=fn)
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
    train = sub.add_parser("train", allow_abbrev=False,
                           help="retrain a model as a Ray job on the running cluster and follow its logs",
                           description="Submits `python -m training.retrain --model MODEL ...` (or training.tune "
                           "with --tune) through the Ray Jobs SDK; the arguments it does not know go to the job "
                           "(e.g. --epochs 5 --num-workers 2; see python -m training.retrain --help).")
    train.add_argument("model", help="the model to retrain (e.g. fraud)")
    train.add_argument("--tune", action="store_true", help="a Ray Tune search (ASHA) instead of one training run")
    train.add_argument("--address", help="job server URL (default: the running cluster's dashboard)")
    train.add_argument("--no-follow", action="store_true", help="submit and return without following the logs")
    train.add_argument("--state-dir", help="where `fleet up` keeps its state (default ./.fleet)")
    train.set_defaults(fn=cmd_train)
    render = sub.add_parser("render", help="write fleet's deployment in another tool's format")
    render.add_argument("what", choices=["serve-config"],
                        help="serve-config: a Ray Serve config file for `serve deploy` on a running Ray cluster")
    render.add_argument("-o", "--output", help="the file to write (default: standard output)")
    _add_settings_flags(render)
    render.set_defaults(fn=cmd_render)
    add_rollout_parser(sub)
    # Whatever `fleet train` does not know goes to the job (--epochs 5 --num-workers 2 ...), before or after MODEL.
    args, unknown = parser.parse_known_args(argv)
    if args.command != "train" and unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.job_args = [a for a in unknown if a != "--"] if args.command == "train" else []
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
