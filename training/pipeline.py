"""The training pipeline: featurize → stage 1 → stage 2 → export → eval, each step usable on its own.

A `Run` holds one configuration and its work directory. Steps read what earlier steps wrote there
(`stage1.safetensors`, `heads.safetensors`, `artifact/`), and featurization is cached, so running
`polyreward train gating` after `polyreward train objectives` embeds nothing twice.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from polyreward.models.runtime.items import Item
from polyreward.models.runtime.manifest import CalibrationStat, ObjectiveUncertainty
from polyreward.models.runtime.objectives import Objective
from polyreward.models.runtime.uncertainty import conformal_multipliers
from polyreward.models.torch.heads import GatingConfig, HeadsConfig, RewardHeads, load_heads, save_heads
from polyreward.service.postprocess import prompt_key
from polyreward.training.config import TrainConfig
from polyreward.training.data import Examples, PairExample, read_dataset, subsplit
from polyreward.training.data.examples import scale_label
from polyreward.training.featurize import FeatureCache
from polyreward.training.heldout import held_out
from polyreward.training.stage1 import (
    ObjectiveFit,
    fit_bradley_terry,
    fit_ridge_cv,
    heads_from_fits,
    verbosity_target,
    with_conformal_scores,
)
from polyreward.training.stage2 import PairTensors, debias_transform, spearman, train_gating

log = logging.getLogger("polyreward.train")

STAGE1_FILE = "stage1.safetensors"
UNCERTAINTY_FILE = "uncertainty.json"  # per objective: residual variance and conformal multipliers
HEADS_FILE = "heads.safetensors"
ARTIFACT_DIR = "artifact"
VERBOSITY = "verbosity"


def _key(item: Item) -> str:
    return item.model_dump_json()


def calibration(names: list[str], ref: np.ndarray, t: np.ndarray) -> dict:
    """The reference responses' mean and std of each raw and debiased objective (the manifest's stats)."""

    def stats(a):
        return {n: {"mean": float(a[:, k].mean()), "std": float(a[:, k].std())} for k, n in enumerate(names)}

    return {"calibration": stats(ref), "debiased_calibration": stats(ref @ t)}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")


class Run:
    def __init__(self, cfg: TrainConfig, *, progress: bool = True):
        from polyreward.models.default import default_backbone

        self.cfg = cfg
        self.progress = progress
        self.out = cfg.out_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.backbone = cfg.resolve(cfg.backbone) if cfg.backbone else default_backbone()
        self._rows: dict[str, int] = {}

    # -- data and embeddings -------------------------------------------------------------------------

    @cached_property
    def examples(self) -> Examples:
        """Every configured dataset, read and validated in full before anything is computed."""
        examples = Examples()
        for i, spec in enumerate(self.cfg.datasets):
            where = f"{self.cfg.source} datasets[{i}] ({spec.name})"
            examples.extend(read_dataset(spec, self.cfg.base_dir, where=where))
        return examples

    @cached_property
    def cache(self) -> FeatureCache:
        f = self.cfg.featurize
        root = self.cfg.resolve(self.cfg.cache_dir) if self.cfg.cache_dir else self.out / "features"
        return FeatureCache(root, self.backbone, engine=f.engine, device=f.device, max_length=f.max_length)

    def all_items(self) -> list[Item]:
        ex = self.examples
        items = [e.item for e in ex.ratings]
        items += [it for p in ex.pairs for it in p.items]
        items += [it for b in ex.bon for it in b.items]
        return items

    @cached_property
    def features(self):
        """Embeddings of every distinct conversation in every split (held-out ones feed the baselines)."""
        distinct = []
        for it in self.all_items():
            if self._rows.setdefault(_key(it), len(self._rows)) == len(distinct):
                distinct.append(it)
        f = self.cfg.featurize
        return self.cache.featurize(
            distinct, token_budget=f.token_budget, max_items=f.max_items, shard_items=f.shard_items,
            progress=self.progress,
        )  # fmt: skip

    def embed(self, items: Sequence[Item]) -> tuple[np.ndarray, np.ndarray]:
        """(reward, gating) embeddings as the heads see them: L2-normalized when stage1.normalize is set."""
        feats = self.features
        rows = [self._rows[_key(it)] for it in items]
        reward, gating = feats.reward[rows], feats.gating[rows]
        if self.cfg.stage1.normalize:
            unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)  # noqa: E731
            reward, gating = unit(reward), unit(gating)
        return reward, gating

    def featurize(self) -> dict:
        t = time.perf_counter()
        n = len(self.features.reward)
        return {"distinct_items": n, "seconds": round(time.perf_counter() - t, 1)}

    # -- stage 1 -------------------------------------------------------------------------------------

    def scales(self) -> dict[tuple[str, str], tuple[float, float]]:
        """(dataset, objective) -> the label scale its spec declares; labels are mapped onto [0, 1] with it."""
        specs = {s.name: s for s in self.cfg.datasets}
        used = {(e.dataset, n) for e in self.examples.ratings for n in e.ratings}
        out = {}
        for dataset, name in sorted(used):
            scale = specs[dataset].scale_of(name) if dataset in specs else None
            if scale is not None:
                out[(dataset, name)] = (float(scale[0]), float(scale[1]))
        return out

    def rating_objectives(self) -> list[str]:
        """Objectives with absolute ratings in the training split, in the order the datasets give them."""
        return list(dict.fromkeys(n for e in self.examples.ratings if e.split == "train" for n in e.ratings))

    def objectives_for_finetune(self) -> list[Objective]:
        """Rated objectives (with their first dataset's label scale) and pair-labelled ones, for fine-tuning."""
        scales = self.scales()
        rated = self.rating_objectives()
        first = {name: scale for (_, name), scale in reversed(scales.items())}
        return [Objective(name=n, scale=first.get(n)) for n in rated] + [
            Objective(name=n) for n in self.pair_objectives(rated).values() if n not in rated
        ]

    def pair_objectives(self, rated: list[str]) -> dict[str, str]:
        """Head name -> pair label for objectives fitted by Bradley–Terry on labelled pairs.

        A label that is also a rated objective gets its own head, `<label>-pairs`, beside the ridge head.
        """
        labels = dict.fromkeys(p.objective for p in self.examples.pairs if p.split == "train" and p.objective)
        return {f"{label}-pairs" if label in rated else label: label for label in labels if label}

    def reference_responses(self) -> tuple[list[Item], list[str]]:
        """Every distinct training response (rated ones and both sides of pairs): verbosity and debiasing use it."""
        train = self.examples.where("train")
        seen: dict[str, tuple[Item, str]] = {}
        for e in train.ratings:
            seen.setdefault(_key(e.item), (e.item, e.response))
        for p in train.pairs:
            for item, text in zip(p.items, (p.chosen, p.rejected), strict=True):
                seen.setdefault(_key(item), (item, text))
        items = [v[0] for v in seen.values()]
        return items, [v[1] for v in seen.values()]

    def stage1(self) -> dict:
        """Fit one head per objective; writes stage1.safetensors and stage1.json."""
        s1 = self.cfg.stage1
        train = self.examples.where("train")
        rated = self.rating_objectives()
        paired = self.pair_objectives(rated)
        scales = self.scales()
        objectives: list[Objective] = []
        fits: list[ObjectiveFit] = []
        report: dict[str, dict] = {}
        descr = self.cfg.descriptions

        if rated:
            x, _ = self.embed([e.item for e in train.ratings])
            val = np.array([subsplit(e.id, s1.validation, "stage1") for e in train.ratings])
            held_prompts = self._held_prompts([e.item for e in train.ratings], s1.validation)
            for name in rated:
                y = np.array(
                    [scale_label(e.rating(name), scales.get((e.dataset, name))) for e in train.ratings]
                )
                sources = sorted(
                    {e.dataset for e, v in zip(train.ratings, y, strict=True) if not math.isnan(v)}
                )
                fit = fit_ridge_cv(x, y, val, rank=s1.uncertainty_rank)
                fits.append(with_conformal_scores(fit, x, y, held_prompts))
                objectives.append(
                    Objective(
                        name=name, description=descr.get(name, ""), source="ratings: " + ", ".join(sources),
                        scale=(0.0, 1.0) if any((d, name) in scales for d in sources) else None,
                    )
                )  # fmt: skip
                report[name] = {"kind": "ridge", **fit.metrics}
        for name, label in paired.items():
            pairs = [p for p in train.pairs if p.objective == label and not p.tie]
            xc, xr, val = self._pair_arrays(pairs, s1.validation, "stage1")
            fit = fit_bradley_terry(xc, xr, val, rank=s1.uncertainty_rank)
            fits.append(fit)
            sources = sorted({p.dataset for p in pairs})
            objectives.append(
                Objective(name=name, description=descr.get(name, ""), source="pairs: " + ", ".join(sources))
            )
            report[name] = {"kind": "bradley-terry", **fit.metrics}
        if s1.verbosity and VERBOSITY not in [*rated, *paired]:
            items, texts = self.reference_responses()
            x, _ = self.embed(items)
            val = np.array([subsplit(_key(it), s1.validation, "stage1") for it in items])
            y = verbosity_target(texts)
            fit = fit_ridge_cv(x, y, val, rank=s1.uncertainty_rank)
            fits.append(with_conformal_scores(fit, x, y, self._held_prompts(items, s1.validation)))
            objectives.append(
                Objective(
                    name=VERBOSITY, description=descr.get(VERBOSITY, "response length: log(1 + words)"),
                    source="log1p(words in the response)",
                )
            )  # fmt: skip
            report[VERBOSITY] = {"kind": "ridge (length)", **fit.metrics}
        if not fits:
            raise ValueError(
                f"{self.cfg.source}: no objective to fit (no ratings and no objective-labelled pairs)"
            )
        heads = heads_from_fits(
            objectives, fits, len(fits[0].weight), s1.uncertainty_rank, normalize=s1.normalize
        )
        save_heads(heads, self.out / STAGE1_FILE)
        _write_json(self.out / "stage1.json", report)
        _write_json(self.out / UNCERTAINTY_FILE, {
            o.name: {
                "residual_variance": f.residual,
                "conformal": None if f.conformal_scores is None else conformal_multipliers(f.conformal_scores),
                "conformal_n": None if f.conformal_scores is None else len(f.conformal_scores),
            }
            for o, f in zip(objectives, fits, strict=True)
        })  # fmt: skip
        for name, r in report.items():
            metric = r.get("val_spearman", r.get("val_accuracy", float("nan")))
            log.info("%-28s %-15s n=%-6d validation %s=%.3f", name, r["kind"], r["n"],
                     "spearman" if "val_spearman" in r else "accuracy", metric)  # fmt: skip
        return report

    @staticmethod
    def _held_prompts(items: Sequence[Item], fraction: float) -> np.ndarray:
        """Rows whose prompt falls in a stable `fraction` of prompts: the conformal calibration rows."""
        return np.array([subsplit(prompt_key(it) or "", fraction, "conformal") for it in items], bool)

    def _pair_arrays(self, pairs: list[PairExample], fraction: float, salt: str):
        xc, _ = self.embed([p.items[0] for p in pairs])
        xr, _ = self.embed([p.items[1] for p in pairs])
        val = np.array([subsplit(p.id, fraction, salt) for p in pairs], bool)
        return xc, xr, val

    # -- stage 2 -------------------------------------------------------------------------------------

    def _rewards(self, heads: RewardHeads, x: np.ndarray) -> np.ndarray:
        w = heads.regression.weight.detach().double().numpy()
        b = heads.regression.bias.detach().double().numpy()
        return x @ w.T + b

    def _pair_tensors(self, heads, t: np.ndarray, pairs: list[PairExample], tie_weight: float) -> PairTensors:
        xc, g = self.embed([p.items[0] for p in pairs])
        xr, _ = self.embed([p.items[1] for p in pairs])
        delta = (self._rewards(heads, xc) - self._rewards(heads, xr)) @ t
        weight = np.array([tie_weight if p.tie else 1.0 for p in pairs])
        return PairTensors(delta, g, weight)

    def debiasing(self, stage1: RewardHeads) -> tuple[np.ndarray, dict, np.ndarray]:
        """(T, the λ per objective, the raw rewards of the reference responses) for stage 1's heads."""
        names = [o.name for o in stage1.cfg.objectives]
        items, _ = self.reference_responses()
        ref = self._rewards(stage1, self.embed(items)[0])
        verbosity = names.index(VERBOSITY) if VERBOSITY in names else None
        return (*debias_transform(ref, verbosity, self.cfg.stage2.threshold), ref)

    def gating_pairs(self, salt: str = "stage2") -> tuple[list[PairExample], list[PairExample]]:
        """The training pairs stage 2 (and the mixtures) fit on, and the ones held out for early stopping."""
        cfg = self.cfg.stage2
        pairs = [p for p in self.examples.pairs if p.split == "train" and (cfg.tie_weight > 0 or not p.tie)]
        if len(pairs) < 10:
            raise ValueError(f"{self.cfg.source}: stage 2 needs preference pairs; found {len(pairs)}")
        val = [subsplit(p.id, cfg.validation, salt) for p in pairs]
        return [p for p, v in zip(pairs, val, strict=True) if not v], [
            p for p, v in zip(pairs, val, strict=True) if v
        ]

    def assemble(
        self, stage1: RewardHeads, t: np.ndarray, cfg: HeadsConfig, state: dict, path: Path
    ) -> RewardHeads:
        """Stage 1's regression and uncertainty with `state` (the gating's or mixture's tensors) and T, saved."""
        heads = RewardHeads(cfg)
        merged = {k: v for k, v in stage1.state_dict().items() if k != "transform"}
        merged.update(state, transform=torch.tensor(t, dtype=torch.float32))
        heads.load_state_dict({**heads.state_dict(), **merged})
        save_heads(heads, path)
        return heads

    def stage2(self) -> dict:
        """Debiasing transform + gating network; writes heads.safetensors and stage2.json (with baselines)."""
        cfg = self.cfg.stage2
        stage1 = load_heads(self.out / STAGE1_FILE)
        names = [o.name for o in stage1.cfg.objectives]
        t, lambdas, ref = self.debiasing(stage1)
        fit_pairs, val_pairs = self.gating_pairs()
        net, gating_report = train_gating(
            self._pair_tensors(stage1, t, fit_pairs, cfg.tie_weight),
            self._pair_tensors(stage1, t, val_pairs, cfg.tie_weight),
            stage1.cfg.hidden_size, cfg, progress=self.progress,
        )  # fmt: skip
        heads_cfg = HeadsConfig(
            objectives=stage1.cfg.objectives, hidden_size=stage1.cfg.hidden_size, kind="moe",
            gating=GatingConfig(temperature=cfg.temperature, hidden_dim=cfg.hidden_dim, n_hidden=cfg.n_hidden),
            uncertainty_rank=stage1.cfg.uncertainty_rank, normalize=stage1.cfg.normalize,
        )  # fmt: skip
        state = {f"gating.{k}": v for k, v in net.state_dict().items()}
        self.assemble(stage1, t, heads_cfg, state, self.out / HEADS_FILE)

        after = ref @ t
        report = {
            "debias": {
                names[j]: {
                    "lambda": lam,
                    "spearman_before": spearman(ref[:, j], ref[:, names.index(VERBOSITY)]),
                    "spearman_after": spearman(after[:, j], ref[:, names.index(VERBOSITY)]),
                }
                for j, lam in lambdas.items()
            },
            "gating": gating_report,
            **calibration(names, ref, t),
            "held_out": held_out(self, stage1, t, {"gated": net}),
        }
        _write_json(self.out / "stage2.json", report)
        return report

    # -- export and eval -----------------------------------------------------------------------------

    def export(self, work: Path | None = None, report: str = "stage2.json", name: str | None = None) -> Path:
        """The heads in `work` (default: OUT, stage 2's) exported to `work`/artifact, with the calibration
        stats and held-out metrics of its `report`."""
        from polyreward.models.torch.export import ExportOptions, export_artifact

        work = work or self.out
        stage2 = json.loads((work / report).read_text())

        def stats(key: str) -> dict[str, CalibrationStat] | None:
            return {n: CalibrationStat(**c) for n, c in stage2[key].items()} if key in stage2 else None

        uncertainty = self.out / UNCERTAINTY_FILE
        uncertainty = (
            {n: ObjectiveUncertainty(**u) for n, u in json.loads(uncertainty.read_text()).items()}
            if uncertainty.exists() else None
        )  # fmt: skip
        metrics = {
            "stage1": json.loads((self.out / "stage1.json").read_text()),
            "held_out": stage2.get("held_out", {}),
        }
        e = self.cfg.export
        options = ExportOptions(
            precisions=e.precisions, name=name or e.name, version=e.version, max_length=self.cache.policy.max_length,
            overwrite=True, calibration=stats("calibration"), debiased_calibration=stats("debiased_calibration"),
            group_calibration=stats("group_calibration"),
            uncertainty=uncertainty, metrics=metrics,
            provenance={"training_config": self.cfg.source, "datasets": [d.name for d in self.cfg.datasets]},
        )  # fmt: skip
        export_artifact(self.backbone, work / HEADS_FILE, work / ARTIFACT_DIR, options)
        return work / ARTIFACT_DIR

    def evaluate(self, work: Path | None = None, report: str = "stage2.json") -> dict:
        from polyreward.training.evaluate import evaluate

        work = work or self.out
        return evaluate(
            work / ARTIFACT_DIR, self.examples.where("test"), precision=self.cfg.eval.precision,
            scales=self.scales(), progress=self.progress,
            baselines=json.loads((work / report).read_text()).get("held_out"),
        )  # fmt: skip
