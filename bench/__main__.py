"""python -m bench WORKLOAD [options] — every workload prints one line per measurement (--json: JSON lines).

all            machine, offline, grpo, service, rescore in one run; writes docs/performance.md and its plots
machine        CPU model, cores, measured fp32 GEMM GFLOP/s
offline        Scorer fp32/int8 vs PyTorch eager on real RMB items: items/s, GFLOP/s, Spearman, accuracy
grpo           64 prompts × 8 responses: no dedup, dedup, the gating cache, and the no-gating-pass floor
service        `polyreward serve` under 1/8/64/256 concurrent single-item clients vs the offline Scorer
rescore        `polyreward rescore` rows/s, local and remote engines
export-memory  peak RSS of exporting a large decoder
long           one decoder item of 1k-16k tokens: time and peak RSS, chunked attention vs eager graph vs PyTorch
decoder        Llama-3-8B-shaped fp16 decoder, CUDA EP vs PyTorch eager (a GPU machine)
tenants        one tenant floods the server with 10,000 items: another tenant's single-item latency vs alone
rules          what each rule objective adds per item, vs the model alone on the same items
trust          interval coverage, margin uncertainty and calibration, best-of-N Goodhart; writes docs/trust.md
"""

from __future__ import annotations

import sys

from bench import (
    decoder,
    export_memory,
    grpo,
    load,
    long,
    machine,
    offline,
    peer,
    report,
    rescore,
    rules,
    soak,
    tenants,
    trust,
)

WORKLOADS = {
    "all": report.main,
    "machine": lambda argv: [print(line) for line in machine.run()],
    "offline": offline.main,
    "grpo": grpo.main,
    "service": load.main,
    "rescore": rescore.main,
    "peer": peer.main,
    "soak": soak.main,
    "export-memory": export_memory.main,
    "long": long.main,
    "decoder": decoder.main,
    "trust": trust.main,
    "rules": rules.main,
    "tenants": tenants.main,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in WORKLOADS:
        sys.exit(__doc__)
    WORKLOADS[sys.argv[1]](sys.argv[2:])
