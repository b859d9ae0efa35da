"""`python -m bench all`: every workload in one run, then docs/performance.md and its plots.

Each workload runs with its defaults (see `python -m bench WORKLOAD --help`), against the baseline it names,
in the same run on the same machine; the Markdown holds medians, ratios and the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench import grpo, load, machine, offline, peer, rescore, rules, soak, tenants

STEPS = {
    "offline": offline, "grpo": grpo, "service": load, "tenants": tenants, "peer": peer, "rescore": rescore,
    "rules": rules, "soak": soak,
}  # fmt: skip
TENANT_COLUMNS = [
    "tenant_token_budget", "probe_alone_p50_ms", "probe_alone_p99_ms", "probe_flood_p50_ms", "probe_flood_p99_ms",
    "p99_vs_alone", "flood_items_per_s", "flood_queued_at_start", "fifo_wait_s", "probes_after_flood", "client_cpu",
    "server_cpu",
]  # fmt: skip
DOCS = Path(__file__).resolve().parent.parent / "docs"
OFFLINE_COLUMNS = [
    "engine", "items_per_s", "tokens_per_s", "useful_gflops", "gemm_pct", "speedup_vs_pytorch", "spearman_vs_pytorch",
    "heldout_pairs", "heldout_accuracy", "accuracy_vs_fp32_points", "batch_spread",
]  # fmt: skip
SERVICE_COLUMNS = [
    "engine", "client", "clients", "items_per_s", "vs_offline", "p50_ms", "p99_ms", "errors", "rejected_429",
    "mean_batch_items", "padding_ratio", "server_cpu", "client_cpu", "server_peak_rss_mb",
]  # fmt: skip


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench all", description=__doc__)
    parser.add_argument("--artifact", help="artifact with fp32 and int8 graphs (default: the shipped model)")
    parser.add_argument("--config", help="serve settings JSON from `polyreward tune`, for every workload")
    parser.add_argument("--json", action="store_true", help="one JSON line per measurement")
    parser.add_argument("--only", nargs="+", choices=list(STEPS), help="run only these workloads")
    parser.add_argument("--soak", action="store_true", help="also the 10-minute soak (left out by default)")
    parser.add_argument("--out", type=Path, default=DOCS / "performance.md")
    args = parser.parse_args(argv)
    common = [
        *(["--artifact", args.artifact] if args.artifact else []),
        *(["--config", args.config] if args.config else []),
    ]
    common += ["--json"] if args.json else []
    started = time.time()
    records = machine.run()
    print(json.dumps(records[0]) if args.json else records[0], flush=True)
    for name, module in STEPS.items():
        if (args.only and name not in args.only) or (name == "soak" and not args.soak and not args.only):
            continue
        sub = argparse.ArgumentParser()
        module.add_args(sub)
        records += module.run(sub.parse_args(common))
    write_report(records, args.out, args, time.time() - started)
    print(f"wrote {args.out}", file=sys.stderr)


def rules_section(rows: list[dict]) -> str:
    """The rule objectives' table (also what `python -m bench rules` adds to docs/performance.md by hand)."""
    return "\n".join([
        "## Rule objectives",
        "",
        f"{rows[0]['items']} real RMB replies with a reasoning trace and a label; each rule kind timed alone "
        "(worker processes warm), then the model with every rule and the strip (`RuleSet.score`) against the "
        "model alone on the same stripped items (fp32 Scorer). In the service the rules run beside the model's batches.",
        "",
        table(rows, ["engine", "rule", "kind", "ms_per_item", "vs_model", "added_ms_per_item", "ratio_vs_model"]),
    ])  # fmt: skip


def section_of(text: str, title: str) -> str | None:
    """The Markdown section of `text` that starts with `title`, up to the next section."""
    if title not in text:
        return None
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start : end + 1 if end >= 0 else len(text)]


def table(rows: list[dict], columns: list[str]) -> str:
    present = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(present) + " |", "|" + "---|" * len(present)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in present) + " |")
    return "\n".join(lines)


def plots(records: list[dict], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    offline_rows = [r for r in records if r["workload"] == "offline"]
    if offline_rows:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.barh(
            [r["engine"] for r in offline_rows], [r["items_per_s"] for r in offline_rows], color="#4c72b0"
        )
        ax.set_xlabel("items/s (real RMB items)")
        ax.set_title("Offline scoring, same items")
        fig.tight_layout()
        fig.savefig(out_dir / "perf-offline.png", dpi=120)
        written.append("perf-offline.png")
    service = [r for r in records if r["workload"] == "service" and "clients" in r]
    if service:
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
        for engine in dict.fromkeys(r["engine"] for r in service):
            rows = [r for r in service if r["engine"] == engine]
            a.plot([r["clients"] for r in rows], [r["items_per_s"] for r in rows], marker="o", label=engine)
            b.plot([r["clients"] for r in rows], [r["p99_ms"] for r in rows], marker="o", label=engine)
        for ax, label in ((a, "items/s"), (b, "p99 latency (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent single-item clients")
            ax.set_ylabel(label)
        a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "perf-service.png", dpi=120)
        written.append("perf-service.png")
    plt.close("all")
    return written


def write_report(records: list[dict], out: Path, args, seconds: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    m = records[0]
    by = lambda w: [r for r in records if r["workload"] == w]  # noqa: E731
    parts = [
        "# Performance",
        "",
        f"Generated by `python -m bench all{' --soak' if getattr(args, 'soak', False) else ''}"
        f"{' --config ' + args.config if args.config else ''}` on "
        f"{time.strftime('%Y-%m-%d')} in {seconds / 60:.0f} minutes. Every number is a median over repeats, "
        "and every baseline ran in the same run on the same machine.",
        "",
        f"**Machine:** {m['cpu']}, {m['cores']} cores, Python {m['python']}. Measured fp32 GEMM (numpy BLAS, "
        f"2048²): **{m['gemm_gflops']} GFLOP/s** (the ceiling useful GFLOP/s is read against).",
        "",
    ]
    if rows := by("offline"):
        settings = rows[0]["settings"]
        parts += [
            "## Offline scoring",
            "",
            f"{rows[0]['items']} items, both sides of RMB pairs ({rows[0]['real_tokens']} real tokens). "
            "Baseline: transformers + the same heads, batches of 32 padded to their longest (OpenRLHF's "
            f"serve_rm), {rows[0]['torch_threads']} torch threads. The engines take turns, round after round, and "
            f"each row is the median of its rounds. Scorer settings: {settings}. Useful GFLOP/s = "
            f"2 × {rows[0]['non_embedding_params'] / 1e6:.1f}M non-embedding parameters × real tokens / s "
            "(gemm_pct above 100 is possible for int8, whose GEMMs outrun fp32's). Accuracy: held-out RMB pairs. "
            "batch_spread: the largest change of a score between being scored alone and inside a batch.",
            "",
            table(rows, OFFLINE_COLUMNS),
            "",
            "![offline](perf-offline.png)",
            "",
        ]
    if rows := by("grpo"):
        parts += [
            "## GRPO-shaped step",
            "",
            f"{rows[0]['prompts']} prompts × {rows[0]['group']} responses (RMB best-of-N sets) scored at once. "
            "no-dedup: every item runs its own gating pass; dedup: items of one batch share it; dedup+cache: "
            "one gating pass per prompt in the step, whatever batch its responses land in (the gating cache, "
            "emptied before each step); floor: every prompt cached, no gating pass at all. The four take turns, "
            "round after round. cache_vs_floor: dedup+cache's seconds over the floor's (the median of the rounds' "
            "ratios); gating_pass_vs_floor: the step's distinct prompts through their gating passes alone, the "
            "work the cache cannot remove, over the floor.",
            "",
            table(
                rows,
                [
                    "engine",
                    "variant",
                    "items_per_s",
                    "speedup_vs_no_dedup",
                    "cache_vs_floor",
                    "gating_pass_vs_floor",
                ],
            ),
            "",
        ]
    if rows := by("tenants"):
        parts += [
            "## Fair shares between tenants",
            "",
            f"One tenant posts {rows[0]['flood_items']:,} items at once ({rows[0]['precision']} server); another "
            f"sends {rows[0]['probes']} single-item requests one after another, first alone, then while the "
            "flood is queued (bench/tenants.py). p99_vs_alone: the probe's p99 latency under the flood over its "
            "p99 alone; fifo_wait_s: how long a first-come-first-served queue would have kept each probe behind "
            "the flood (queued items / the flood's items/s); probes_after_flood: probe requests that ended only "
            "after the whole flood. tenant_token_budget: the batch budget while tenants compete. The batches "
            "run at nice 19 and the probe's on the express lane's own session (README, tenants); "
            "flood_items_per_s is the flood's rate while the probe, sending back to back, takes its token share.",
            "",
            table(rows, TENANT_COLUMNS),
            "",
        ]
    if rows := by("service"):
        parts += [
            "## Service under concurrent single-item clients",
            "",
            "Each client sends one single-item `/v1/score` request at a time (as OpenRLHF does), for 15 s after "
            f"a 3 s warm-up; the load generator ({next((r['client'] for r in rows if 'client' in r), 'python')}: wrk is C, one thread; python "
            "is asyncio + httpx in the benchmark's process) runs on the same cores as the server, and client_cpu "
            "beside server_cpu shows what it took. "
            "vs_offline is items/s over the offline Scorer's on the same items and precision, measured right "
            "before and right after that load run (their mean; offline_items_per_s in the JSON lines).",
            "",
            table(rows, SERVICE_COLUMNS),
            "",
            "![service](perf-service.png)",
            "",
        ]
    if rows := by("peer"):
        ours = {r["engine"]: r for r in by("service") if r.get("clients") == rows[0]["clients"]}
        lines = [f"`{e}`: {r['items_per_s'] / rows[0]['items_per_s']:.2f}×" for e, r in ours.items()]
        parts += [
            "## Peer: michaelfeil/infinity",
            "",
            "infinity-emb (its `optimum` ONNX Runtime engine, fp32, CPU) serves the same MiniLM backbone as plain "
            f"embeddings to {rows[0]['clients']} single-text clients, the texts being the same items as polyreward "
            "tokenizes them. It does less per item: no heads, no second pass over the prompt for the gating. "
            f"polyreward's items/s relative to it at the same load: {', '.join(lines) or 'not measured'}.",
            "",
            table(rows, SERVICE_COLUMNS),
            "",
        ]
    if rows := by("soak"):
        r = rows[0]
        parts += [
            "## Soak",
            "",
            f"`polyreward serve --precision {r['precision']}` at {r['target_items_per_s']} items/s (80 % of the "
            f"{r['max_items_per_s']} measured with 64 clients) for {r['minutes']:g} minutes, open loop: "
            f"{r['requests']} requests, statuses {r['statuses']}, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms. "
            f"Resident memory {r['rss_start_mb']} MB at start, {r['rss_settled_mb']} MB after the first minute, "
            f"{r['rss_end_mb']} MB at the end: **{r['rss_growth_pct']} %** growth; peak "
            f"{r.get('rss_peak_mb', 'not recorded')} MB. Samples every 10 s (MB): "
            f"{r['rss_samples_mb']}.",
            "",
        ]
    if rows := by("rescore"):
        parts += [
            "## Rescoring",
            "",
            f"`polyreward rescore` on {rows[0]['pairs']} RMB pairs ({rows[0]['precision']}); rows/s is scoring "
            "time from summary.json, wall_seconds includes start-up (and the server's for remote).",
            "",
            table(rows, ["engine", "rows", "rows_per_s", "wall_seconds", "accuracy"]),
            "",
        ]
    if rows := by("rules"):
        parts += [rules_section(rows), ""]
    if out.exists() and (long_section := section_of(out.read_text(), "## Long inputs")):
        parts += [long_section]  # written by `python -m bench long --doc`, which this run does not repeat
    names = plots(records, out.parent)
    parts += ["## Raw measurements", "", "```jsonl", *(json.dumps(r) for r in records), "```", ""]
    out.write_text("\n".join(parts))
    assert all((out.parent / n).exists() for n in names)
