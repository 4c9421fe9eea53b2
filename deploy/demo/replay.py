#!/usr/bin/env python3
"""Replays a slice of a request trace against an InferenceService through the OpenAI API, the
way its clients would send it, and records what every request saw.

    replay.py --trace CSV --cloud URL [--edge-pods CMD] --out DIR [options]

- Arrivals: the trace's timestamps (Azure LLM inference trace CSV: TIMESTAMP, ContextTokens,
  GeneratedTokens) over `--window` trace seconds, played `--speed` times faster and thinned
  (seeded) to a mean of `--rps`; prompt length follows ContextTokens (scaled down), max_tokens
  follows GeneratedTokens (scaled down, capped by `--max-tokens`): the trace's shape at a size
  2 CPU cores serve. Sampling at temperature 0.3.
- Clients: a share `--edge-share` of them sit at the edge site and call an edge worker pod
  (addresses from `--edge-pods`, a command printing pod IPs); when it cannot be reached they
  fail over to the cloud URL, as an edge gateway would. The rest call `--cloud`.
- Streaming chat completions: time to first token is measured at the first content chunk.
- `--cut-at F --cut CMD --restore-at G --restore CMD`: runs CMD at fractions F and G of the run
  (the demo cuts the edge node off and restores it).
- Writes DIR/requests.jsonl (one line per request) and DIR/events.json; a progress bar on stderr.
"""

import argparse
import concurrent.futures
import csv
import datetime
import json
import os
import random
import subprocess
import sys
import threading
import time
import http.client
import urllib.parse

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain how tides work in one sentence.",
    "Give me three tips for a good night's sleep.",
    "What is Kubernetes used for?",
    "Name a fruit that is yellow.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
]
FILLER = "Please keep the answer short and friendly. "


def load_trace(path, window, speed, rps, seed):
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            ts = datetime.datetime.fromisoformat(r["TIMESTAMP"][:26])
            rows.append((ts, int(r["ContextTokens"]), int(r["GeneratedTokens"])))
    t0 = rows[0][0]
    picked = [(((ts - t0).total_seconds()) / speed, c, g) for ts, c, g in rows
              if (ts - t0).total_seconds() < window]
    duration = window / speed
    keep = min(1.0, rps * duration / max(1, len(picked)))
    rng = random.Random(seed)
    return [p for p in picked if rng.random() < keep], duration


class Edge:
    """The edge pods' addresses, refreshed every few seconds from a command."""

    def __init__(self, cmd):
        self.cmd, self.addrs, self.at = cmd, [], 0.0
        self.lock = threading.Lock()

    def pick(self, i):
        with self.lock:
            if self.cmd and time.time() - self.at > 3:
                self.at = time.time()
                try:
                    out = subprocess.run(self.cmd, shell=True, capture_output=True, text=True,
                                         timeout=10).stdout
                    self.addrs = [a for a in out.split() if a]
                except subprocess.SubprocessError:
                    pass
            return f"http://{self.addrs[i % len(self.addrs)]}:8080" if self.addrs else None


def call(base, model, prompt, max_tokens, timeout, connect_timeout=None):
    """One streaming chat completion; (ttft_s, total_s, tokens) or raises. `connect_timeout`
    bounds only reaching the server (an unreachable edge is given up on quickly; a slow answer
    is waited for)."""
    body = json.dumps({"model": model, "stream": True, "max_tokens": max_tokens,
                       "temperature": 0.3,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port or 80,
                                      timeout=connect_timeout or timeout)
    start = time.time()
    ttft, tokens = None, 0
    try:
        conn.connect()
        conn.sock.settimeout(timeout)
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"content-type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read(300).decode(errors='replace')}")
        for line in resp:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("error"):
                raise RuntimeError(chunk["error"].get("message", "error"))
            delta = chunk["choices"][0].get("delta", {}).get("content")
            if delta:
                tokens += 1
                if ttft is None:
                    ttft = time.time() - start
    finally:
        conn.close()
    return ttft if ttft is not None else time.time() - start, time.time() - start, tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", required=True)
    ap.add_argument("--cloud", required=True, help="base URL of the cloud entry point")
    ap.add_argument("--edge-pods", default="", help="command printing the edge pods' IPs")
    ap.add_argument("--edge-share", type=float, default=0.3)
    ap.add_argument("--model", required=True)
    ap.add_argument("--window", type=float, default=600, help="trace seconds replayed")
    ap.add_argument("--speed", type=float, default=2.5)
    ap.add_argument("--rps", type=float, default=1.0, help="mean request rate sent")
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=8, help="cap on a request's max_tokens")
    ap.add_argument("--cut-at", type=float)
    ap.add_argument("--cut")
    ap.add_argument("--restore-at", type=float)
    ap.add_argument("--restore")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    arrivals, duration = load_trace(a.trace, a.window, a.speed, a.rps, a.seed)
    os.makedirs(a.out, exist_ok=True)
    rng = random.Random(a.seed + 1)
    edge = Edge(a.edge_pods)
    results, lock = [], threading.Lock()
    events = {"start": time.time(), "duration_s": duration}

    def one(i, at, ctx_tokens, gen_tokens, at_edge):
        prompt = QUESTIONS[i % len(QUESTIONS)] + " " + FILLER * min(6, ctx_tokens // 300)
        max_tokens = max(2, min(a.max_tokens, gen_tokens // 32))
        rec = {"i": i, "sent_s": at, "tier": "edge" if at_edge else "cloud",
               "max_tokens": max_tokens, "ok": False, "failover": False}
        targets = []
        if at_edge:
            base = edge.pick(i)
            if base:
                targets.append(base)
        targets.append(a.cloud)
        if at_edge and len(targets) == 1:
            rec["failover"] = True
        for n, base in enumerate(targets):
            try:
                # An unreachable edge is given up on after 3 s of trying to connect.
                connect = 3 if (at_edge and n == 0 and len(targets) > 1) else None
                rec["ttft_s"], rec["total_s"], rec["tokens"] = call(
                    base, a.model, prompt, max_tokens, a.timeout, connect)
                rec["ok"], rec["served_by"] = True, "edge" if base != a.cloud else "cloud"
                break
            except (OSError, http.client.HTTPException, RuntimeError, ValueError) as e:
                rec["error"] = f"{type(e).__name__}: {e}"[:200]
                if n == 0 and len(targets) > 1:
                    rec["failover"] = True
        with lock:
            results.append(rec)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=64)
    t0 = time.time()
    cut_done = restore_done = False
    last_bar = 0.0
    for i, (at, c, g) in enumerate(arrivals):
        while True:
            now = time.time() - t0
            frac = now / duration
            if a.cut and a.cut_at is not None and not cut_done and frac >= a.cut_at:
                cut_done = True
                events["cut_s"] = now
                subprocess.run(a.cut, shell=True, capture_output=True)
            if a.restore and a.restore_at is not None and not restore_done and frac >= a.restore_at:
                restore_done = True
                events["restore_s"] = now
                subprocess.run(a.restore, shell=True, capture_output=True)
            if now - last_bar >= 1:
                last_bar = now
                with lock:
                    ok = sum(r["ok"] for r in results)
                    failed = sum(not r["ok"] for r in results)
                width = 30
                done = int(width * min(1.0, frac))
                state = ("edge CUT" if cut_done and not restore_done
                         else "edge restored" if restore_done else "")
                sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {min(100, frac * 100):3.0f}%"
                                 f" {now:4.0f}/{duration:.0f} s  sent {i}  ok {ok}  failed {failed}"
                                 f"  {state:13s}")
                sys.stderr.flush()
            if now >= at:
                break
            time.sleep(min(0.2, at - now))
        pool.submit(one, i, at, c, g, rng.random() < a.edge_share)
    pool.shutdown(wait=True)
    if a.restore and not restore_done:
        events["restore_s"] = time.time() - t0
        subprocess.run(a.restore, shell=True, capture_output=True)
    sys.stderr.write("\n")
    events["end"] = time.time()
    with open(os.path.join(a.out, "requests.jsonl"), "w") as f:
        for r in sorted(results, key=lambda r: r["i"]):
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(a.out, "events.json"), "w") as f:
        json.dump(events, f)
    ok = [r for r in results if r["ok"]]
    print(f"{len(results)} requests: {len(ok)} answered, {len(results) - len(ok)} failed, "
          f"{sum(r['failover'] for r in results)} edge requests failed over to the cloud")


if __name__ == "__main__":
    main()
