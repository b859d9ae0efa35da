"""`polyreward train mixture`: latent preference groups or task-category routing on stage 1's objectives.

Needs stage 1 in OUT (and compares with stage 2's single gating when OUT/heads.safetensors exists). Writes
OUT/mixture-<routing>/: heads.safetensors, mixture.json (the fit, the calibration stats of the objectives and
the groups, and the held-out comparison), and, through the same export and evaluation as the single gating,
artifact/ with report.json.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from polyreward.models.torch.heads import HeadsConfig, Mixture, load_heads
from polyreward.training.heldout import held_out
from polyreward.training.mixture import MixtureTrainConfig, categories, category_of, fit_latent, fit_routed
from polyreward.training.pipeline import HEADS_FILE, STAGE1_FILE, Run, _write_json, calibration

log = logging.getLogger("polyreward.mixture")

REPORT = "mixture.json"


def work_dir(run: Run, cfg: MixtureTrainConfig) -> Path:
    return run.out / f"mixture-{cfg.routing}"


def group_calibration(run: Run, net: Mixture, debiased: np.ndarray) -> dict:
    """Each group score s_m = G_m(x) · (r @ T)'s mean and std on the reference responses (the training
    responses the debiasing and the objectives' calibration use): worst_group compares s_m in these units."""
    items, _ = run.reference_responses()
    with torch.no_grad():
        g = net.group_gating(torch.tensor(run.embed(items)[1], dtype=torch.float32)).double().numpy()
    s = np.einsum("nmk,nk->nm", g, debiased)
    return {
        name: {"mean": float(s[:, m].mean()), "std": float(s[:, m].std())}
        for m, name in enumerate(net.cfg.groups)
    }


def train_mixture(run: Run, cfg: MixtureTrainConfig) -> dict:
    """Fit the mixture heads (`polyreward.training.mixture`) and write them with mixture.json."""
    work = work_dir(run, cfg)
    work.mkdir(parents=True, exist_ok=True)
    stage1 = load_heads(run.out / STAGE1_FILE)
    names = [o.name for o in stage1.cfg.objectives]
    t, _, ref = run.debiasing(stage1)
    fit_pairs, val_pairs = run.gating_pairs()
    tie = run.cfg.stage2.tie_weight
    train, val = run._pair_tensors(stage1, t, fit_pairs, tie), run._pair_tensors(stage1, t, val_pairs, tie)
    hidden = stage1.cfg.hidden_size
    if cfg.routing == "latent":
        net, report = fit_latent(train, val, hidden, cfg, progress=run.progress)
    else:
        label = lambda p: category_of(p.dataset, p.subset, cfg.category_depth)  # noqa: E731
        groups = categories([label(p) for p in [*fit_pairs, *val_pairs]], cfg.min_category_pairs)

        def index(pairs):
            return np.array(
                [groups.index(g) if (g := label(p)) in groups else len(groups) - 1 for p in pairs]
            )

        net, report = fit_routed(train, val, index(fit_pairs), index(val_pairs), groups, hidden, cfg)
    heads_cfg = HeadsConfig(
        objectives=stage1.cfg.objectives, hidden_size=hidden, kind="mixture", mixture=net.cfg,
        uncertainty_rank=stage1.cfg.uncertainty_rank, normalize=stage1.cfg.normalize,
    )  # fmt: skip
    run.assemble(
        stage1, t, heads_cfg, {f"mixture.{k}": v for k, v in net.state_dict().items()}, work / HEADS_FILE
    )
    compared = {"mixture": net}
    if (run.out / HEADS_FILE).exists() and (single := load_heads(run.out / HEADS_FILE)).gating is not None:
        compared["gated"] = single.gating
    out = {"fit": report, "groups": net.cfg.groups, **calibration(names, ref, t)}
    out["group_calibration"] = group_calibration(run, net, ref @ t)
    out["held_out"] = held_out(run, stage1, t, compared)
    _write_json(work / REPORT, out)
    log.info(
        "mixture (%s): %d groups, validation loss %.4f", cfg.routing, report["groups"], report["val_loss"]
    )
    return out
