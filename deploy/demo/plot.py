#!/usr/bin/env python3
"""Plots a demo run: offered load and the forecast band, replicas per tier and shard, TTFT
p50/p95 against the SLO, failed requests, edge failovers and escalations.

    plot.py --out DIR --prometheus URL --namespace NS --service NAME --slo-ms N

Reads DIR/requests.jsonl and DIR/events.json (replay.py), queries Prometheus over the run, and
writes DIR/demo.png; prints a summary table.
"""

import argparse
import json
import os
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def query_range(url, q, start, end, step=5):
    params = urllib.parse.urlencode({"query": q, "start": start, "end": end, "step": step})
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=30) as r:
            body = json.load(r)
    except OSError as e:
        print(f"warning: Prometheus query failed ({e}): {q}")
        return []
    out = []
    for s in body.get("data", {}).get("result", []):
        t = np.array([float(v[0]) for v in s["values"]])
        y = np.array([float(v[1]) for v in s["values"]])
        out.append((s["metric"], t, y))
    return out


def windows(records, start, end, width):
    edges = np.arange(start, end + width, width)
    return edges, [[r for r in records if lo <= r["t"] < lo + width] for lo in edges[:-1]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--service", required=True)
    ap.add_argument("--slo-ms", type=float, required=True)
    a = ap.parse_args()
    ev = json.load(open(os.path.join(a.out, "events.json")))
    reqs = [json.loads(line) for line in open(os.path.join(a.out, "requests.jsonl"))]
    t0, t1 = ev["start"], ev["end"]
    for r in reqs:
        r["t"] = r["sent_s"]
    sel = f'namespace="{a.namespace}",inference_service="{a.service}"'
    wsel = f'namespace="{a.namespace}",tidal_inference_service="{a.service}"'
    prom = lambda q: query_range(a.prometheus, q, t0, t1)  # noqa: E731

    fig, ax = plt.subplots(4, 1, figsize=(11, 13), sharex=True)
    rel = lambda t: t - t0  # noqa: E731
    # 1. Load: what clients sent, what the workers saw, the forecast and its band.
    edges, per = windows(reqs, 0, ev["duration_s"], 10)
    for tier, color in (("cloud", "tab:blue"), ("edge", "tab:green")):
        ax[0].step(edges[:-1], [sum(r["tier"] == tier for r in w) / 10 for w in per],
                   where="post", color=color, label=f"offered by {tier} clients (req/s)")
    for m, t, y in prom(f'sum(rate(tidal_worker_requests_total{{{wsel},endpoint=~"/v1/(chat/)?completions"}}[30s]))'):
        ax[0].plot(rel(t), y, color="black", lw=1, label="observed by the workers")
    band = {}
    for kind in ("predicted", "lower", "upper"):
        for m, t, y in prom(f'tidal_forecast_{kind}_rps{{{sel}}}'):
            band.setdefault(m.get("target", "?"), {})[kind] = (t, y)
    for target, b in band.items():
        if "lower" in b and "upper" in b:
            t, lo = b["lower"]
            _, hi = b["upper"]
            n = min(len(lo), len(hi))
            ax[0].fill_between(rel(t[:n]), lo[:n], hi[:n], alpha=0.15,
                               label=f"forecast band ({target})")
        if "predicted" in b:
            t, y = b["predicted"]
            ax[0].plot(rel(t), y, ls="--", lw=1, label=f"forecast ({target})")
    ax[0].set_ylabel("requests/s")
    # 2. Replicas per target (cloud router, shards, edge sites), as the autoscaler decided.
    for m, t, y in prom(f'tidal_autoscaler_current_replicas{{{sel}}}'):
        ax[1].step(rel(t), y, where="post", label=m.get("target", "?"))
    ax[1].set_ylabel("ready replicas")
    # 3. TTFT per 10 s window against the SLO.
    mids = edges[:-1] + 5
    for q, style in ((50, "-"), (95, "-o")):
        ys = [np.percentile([r["ttft_s"] * 1000 for r in w if r["ok"]], q)
              if any(r["ok"] for r in w) else np.nan for w in per]
        ax[2].plot(mids, ys, style, ms=3, label=f"TTFT p{q}")
    ax[2].axhline(a.slo_ms, color="red", ls=":", label="SLO (p95)")
    ax[2].set_ylabel("ms")
    # 4. Failures, edge failovers, escalations.
    ax[3].bar(edges[:-1], [sum(not r["ok"] for r in w) for w in per], width=9, align="edge",
              color="tab:red", label="failed requests")
    ax[3].bar(edges[:-1], [sum(r["failover"] and r["ok"] for r in w) for w in per], width=9,
              align="edge", color="tab:orange", alpha=0.6, label="edge requests served by the cloud")
    for m, t, y in prom(f'sum(increase(tidal_worker_escalations_total{{{wsel}}}[10s]))'):
        ax[3].plot(rel(t), y, color="tab:purple", label="escalations (per 10 s)")
    ax[3].set_ylabel("per 10 s")
    ax[3].set_xlabel("seconds into the replay")
    for axis in ax:
        if "cut_s" in ev:
            axis.axvspan(ev["cut_s"], ev.get("restore_s", ev["duration_s"]), color="grey",
                         alpha=0.15, label="edge node cut off" if axis is ax[0] else None)
        axis.legend(fontsize=7, loc="upper left")
        axis.grid(alpha=0.3)
    fig.suptitle(f"Tidal demo: {a.service} ({a.namespace})")
    fig.tight_layout()
    png = os.path.join(a.out, "demo.png")
    fig.savefig(png, dpi=90)

    ok = [r for r in reqs if r["ok"]]
    ttft = np.array([r["ttft_s"] * 1000 for r in ok]) if ok else np.array([np.nan])
    print(f"requests        {len(reqs)} sent, {len(ok)} answered, {len(reqs) - len(ok)} failed")
    print(f"edge failovers  {sum(r['failover'] for r in reqs)} edge requests went to the cloud")
    print(f"TTFT            p50 {np.nanpercentile(ttft, 50):.0f} ms, "
          f"p95 {np.nanpercentile(ttft, 95):.0f} ms (SLO p95 {a.slo_ms:.0f} ms)")
    print(f"plot            {png}")


if __name__ == "__main__":
    main()
