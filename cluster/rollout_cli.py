"""`fleet rollout`: watch and steer a model's progressive rollout on the running cluster.

    fleet rollout status MODEL            stable, candidate, stage, weight, the gates' evidence
    fleet rollout start MODEL [--version N]
    fleet rollout pause|resume|promote|abort MODEL
    fleet rollout replay MODEL            re-run the judge over the recorded ticks (no cluster needed)

The admin token is read from `--token-file` or the FLEET_ADMIN_TOKEN variable of this shell;
it is sent as a bearer token and never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request

from cluster.state import StateFile

__all__ = ["add_rollout_parser"]

_ACTIONS = ("status", "start", "pause", "resume", "promote", "abort", "replay")


def add_rollout_parser(sub) -> None:
    p = sub.add_parser("rollout", help="watch and steer a model's progressive rollout (status, promote, abort, ...)")
    p.add_argument("action", choices=_ACTIONS)
    p.add_argument("model")
    p.add_argument("--version", type=int, help="start: the version to roll out (default: the newest accepted)")
    p.add_argument("--mode", choices=["canary", "shadow", "ab"], help="start: default the model's fleet.rollout")
    p.add_argument("--split", type=float, help="start --mode ab: the candidate's fixed share of routing keys")
    p.add_argument("--url", help="the cluster's URL (default: the running cluster's)")
    p.add_argument("--token-file", help="a file holding the admin token (default: $FLEET_ADMIN_TOKEN)")
    p.add_argument("--data-dir", help="replay: the cluster's data folder (default ./data)")
    p.add_argument("--state-dir", default=".fleet", help="where `fleet up` keeps its state (default ./.fleet)")
    p.add_argument("--json", action="store_true", help="print the whole state as JSON")
    p.set_defaults(fn=cmd_rollout)


def _token(args) -> str | None:
    if args.token_file:
        with open(args.token_file) as f:
            return f.read().strip()
    return os.environ.get("FLEET_ADMIN_TOKEN")


def _call(url: str, token: str | None, method: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("content-type", "application/json")
    if token:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {"error": exc.reason}


def _print_state(doc: dict) -> None:
    print(f"model {doc['model']}: status {doc['status']}, stable {doc.get('stable')}, "
          f"candidate {doc.get('candidate')}")
    if doc.get("candidate") is not None:
        stages = ",".join(f"{s:g}" for s in doc.get("stages", []))
        print(f"  stage {doc['stage']} of [{stages}] %, candidate weight {doc['weight']:.1%}, "
              f"shadow {doc.get('shadow_share', 0):.0%}")
    evidence = doc.get("evidence") or {}
    for name, gate in sorted((evidence.get("gates") or {}).items()):
        print(f"  gate {name:<9} {gate.get('state'):<7} statistic {gate.get('statistic', 0):.2f} / threshold "
              f"{gate.get('threshold', 0):.2f}  {gate.get('reason', '')}")
    if doc.get("alarm"):
        print(f"  ALARM: {doc['alarm']}")
    for event in doc.get("history", [])[-5:]:
        detail = {k: v for k, v in event.items() if k not in ("at", "event")}
        print(f"  {event['event']:<9} {json.dumps(detail)[:150]}")


def cmd_rollout(args: argparse.Namespace) -> int:
    if args.action == "replay":
        from serving.monitoring.alerts import audit_dir_for, audit_folder
        from serving.rollout.replay import replay_file, tick_files

        data_dir = args.data_dir or "data"
        audit_dir = audit_dir_for(data_dir, args.state_dir)  # a data folder on an object store: <state_dir>/audit
        files = tick_files(data_dir, args.model, audit_dir)
        if not files:
            print(f"fleet: no recorded rollout of {args.model!r} under {audit_folder(data_dir, audit_dir)}/rollout-ticks")
            return 1
        bad = 0
        for path in files:
            result = replay_file(path)
            bad += len(result["mismatches"])
            decided = ", ".join(f"{d['replayed']} at tick {d['tick']}" for d in result["decisions"]) or "none"
            print(f"{path.name}: {result['ticks']} ticks, decisions {decided}, "
                  f"{len(result['mismatches'])} differ from the record")
        return 0 if bad == 0 else 1
    url = args.url
    if url is None:
        doc = StateFile(args.state_dir).running()
        if not doc:
            print("fleet: no cluster is running (start one with `fleet up`, or pass --url)")
            return 1
        url = doc["url"]
    base = f"{url.rstrip('/')}/v2/models/{args.model}/rollout"
    if args.action == "status":
        status, doc = _call(base, _token(args), "GET")
    else:
        body = {k: v for k, v in (("version", args.version), ("mode", args.mode), ("split", args.split))
                if v is not None}
        status, doc = _call(f"{base}/{args.action}", _token(args), "POST", body)
    if status != 200:
        print(f"fleet: {args.action} failed ({status}): {doc.get('error', doc)}")
        return 1
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print_state(doc)
    return 0
