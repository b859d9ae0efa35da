"""int8 per-channel vs fp32 on real text, with heads fitted here on real ratings (not random)."""

from __future__ import annotations

import gzip
import hashlib
import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from models.heads import save_heads
from models.inputs import Item
from models.objectives import Objective
from models.scorer import Scorer

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ASPECTS = ["helpfulness", "clarity", "factuality", "depth", "engagement"]


def rows(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def held_out(key: str) -> bool:
    """A stable 20 % hold-out by hash of the row id (never a random draw)."""
    return int(hashlib.sha256(str(key).encode()).hexdigest(), 16) % 5 == 0


def label(value) -> float:
    return float("nan") if value in (None, "", "None") else float(value)


@pytest.fixture(scope="module")
def real_artifact(tmp_path_factory, data_dir, backbone_dirs):
    """Ridge heads for 5 just-eval aspects + safety, fitted on the training part, exported fp32 + int8."""
    from models.export import export_artifact
    from training.stage1 import fit_objectives

    multi = [r for r in rows(data_dir / "just_eval_ratings/multi_aspect.jsonl.gz") if not held_out(r["id"])]
    safety = [r for r in rows(data_dir / "just_eval_ratings/safety.jsonl.gz") if not held_out(r["id"])][:300]
    items = [Item(prompt=r["prompt"], response=r["response"]) for r in multi + safety]
    nan = float("nan")
    labels = np.array(
        [[label(r[a]) for a in ASPECTS] + [nan] for r in multi]
        + [[nan] * 5 + [label(r["safety"])] for r in safety]
    )
    objectives = [
        Objective(name=n, source=f"just_eval_ratings/{n}", scale=(1, 5)) for n in [*ASPECTS, "safety"]
    ]
    heads, fitted = fit_objectives(
        backbone_dirs["minilm"], items, labels, objectives, alpha=10.0, progress=False
    )
    assert (
        np.corrcoef(fitted[: len(multi), 0], labels[: len(multi), 0])[0, 1] > 0.3
    )  # heads learned something
    root = tmp_path_factory.mktemp("real")
    save_heads(heads, root / "heads.safetensors")
    export_artifact(backbone_dirs["minilm"], root / "heads.safetensors", root / "artifact", ["fp32", "int8"])
    return root / "artifact"


def test_int8_ranks_like_fp32_on_real_held_out_text(real_artifact, data_dir):
    pairs = [r for r in rows(data_dir / "rmb/pairwise.jsonl.gz")[::40] if r["chosen"] != r["rejected"]][:150]
    items = [
        Item(messages=[*r["conversation"], {"role": "assistant", "content": r[side]}])
        for r in pairs
        for side in ("chosen", "rejected")
    ]
    assert len(items) >= 200
    fp32 = np.array([r.score for r in Scorer(real_artifact, precision="fp32", device="cpu").score(items)])
    int8 = np.array([r.score for r in Scorer(real_artifact, precision="int8", device="cpu").score(items)])
    rho = spearmanr(fp32, int8).statistic
    acc32 = np.mean(fp32[0::2] > fp32[1::2])
    acc8 = np.mean(int8[0::2] > int8[1::2])
    print(
        f"int8 vs fp32 on {len(items)} rmb texts: Spearman {rho:.4f}; pair accuracy fp32 {acc32:.3f} int8 {acc8:.3f}"
    )
    assert rho >= 0.98
    assert abs(acc32 - acc8) <= 0.03
