"""Rescore preference and rating datasets into sharded Parquet (or JSONL), resumable after any crash.

Rows are read through the trainer's adapters (`polyreward.training.data.DatasetSpec`), numbered in input order across
all inputs, and cut into shards of `shard_rows` rows. Each shard is scored, written to a temporary file and
renamed into place, then recorded in `run.json` (also replaced atomically). `run.json` is the only truth: a
shard file it does not list is recomputed, so a run killed at any instant resumes without losing or
duplicating a row, and shard boundaries never move, so a resumed run scores exactly the batches an
uninterrupted one would.

Output row: the input row's fields, then `row` (its number), `source` (file:line), `subset`, `label_objective`,
and per side (`chosen`/`rejected` for pairs, `response` for ratings, `best` for best-of-N) `<side>_score`,
`<side>_rewards` and `<side>_gating` (objective -> value). Pairs add `margin`, `p_chosen` (sigmoid of the margin)
and `agrees` (the model prefers the labelled choice; null for ties); best-of-N adds `loser_scores` and
`best_wins`.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from polyreward.models.runtime.errors import PolyrewardError
from polyreward.models.runtime.files import atomic_replace, atomic_write, sha256_tree
from polyreward.models.runtime.items import Item
from polyreward.rescore.engines import Engine, Scored
from polyreward.service.postprocess import named, sigmoid
from polyreward.training.data import DatasetSpec, Examples, conversation, dataset_rows

RUN_FILE = "run.json"
RUN_VERSION = 1
OutputFormat = Literal["parquet", "jsonl"]


class RescoreError(PolyrewardError):
    """Bad inputs, a changed input on resume, or an existing run without --resume/--overwrite."""


def fingerprint(path: Path) -> dict:
    """sha256 and size of a file, or of every file of a directory (a `datasets` save) in name order."""
    digest, size = sha256_tree(path)
    return {"path": str(path.resolve()), "sha256": digest, "size": size}


def _items(examples: Examples) -> tuple[str, list[Item], Any]:
    """(kind, items to score, the example) for one row: pairs (chosen, rejected), a rating, or best + losers."""
    if examples.pairs:
        pair = examples.pairs[0]
        return "pairs", list(pair.items), pair
    if examples.ratings:
        rating = examples.ratings[0]
        return "ratings", [rating.item], rating
    bon = examples.bon[0]
    return "bon", [conversation(bon.prompt, r) for r in (bon.best, *bon.losers)], bon


def _side(prefix: str, s: Scored, objectives: list[str]) -> dict:
    return {
        f"{prefix}_score": s.score,
        f"{prefix}_rewards": named(objectives, s.rewards),
        f"{prefix}_gating": named(objectives, s.gating) if s.gating else None,
    }


def output_row(kind: str, example, scored: list[Scored], objectives: list[str]) -> dict:
    """The columns rescoring adds for one input row."""
    out: dict[str, Any] = {"subset": example.subset, "label_objective": getattr(example, "objective", None)}
    if kind == "pairs":
        chosen, rejected = scored
        margin = chosen.score - rejected.score
        out |= _side("chosen", chosen, objectives) | _side("rejected", rejected, objectives)
        out |= {
            "margin": margin,
            "p_chosen": sigmoid(margin),
            "tie": example.tie,
            "agrees": None if example.tie else margin > 0,
        }
    elif kind == "ratings":
        out |= _side("response", scored[0], objectives)
    else:
        best, *losers = scored
        out |= _side("best", best, objectives)
        out |= {
            "loser_scores": [s.score for s in losers],
            "best_wins": all(best.score > s.score for s in losers),
        }
    return out


class Run:
    """One rescoring run in `out`: its manifest, its committed shards, and the input rows still to do."""

    def __init__(
        self,
        inputs: Sequence[Path],
        spec: DatasetSpec,
        out: Path,
        engine: Engine,
        *,
        shard_rows: int = 2048,
        output_format: OutputFormat = "parquet",
        mode: Literal["new", "resume", "overwrite"] = "new",
    ):
        self.inputs, self.spec, self.out, self.engine = [Path(p) for p in inputs], spec, Path(out), engine
        self.shard_rows, self.format = shard_rows, output_format
        self._fresh = False
        self.manifest = self._open(mode)

    # ------------------------------------------------------------------ manifest

    def _identity(self, fingerprints: list[dict]) -> dict:
        spec = self.spec.model_dump(exclude={"path", "name"}, exclude_defaults=True)
        return {
            "inputs": fingerprints,
            "spec": spec,
            "model": self.engine.identity,
            "shard_rows": self.shard_rows,
            "format": self.format,
        }

    def _open(self, mode: str) -> dict:
        for path in self.inputs:
            if not path.exists():
                raise RescoreError(f"{path}: no such file or directory")
        run_file = self.out / RUN_FILE
        identity = self._identity([fingerprint(p) for p in self.inputs])
        if run_file.exists() and mode == "new":
            raise RescoreError(
                f"{self.out}: a rescoring run is already there; pass --resume to continue it or --overwrite to "
                "start again"
            )
        if run_file.exists() and mode == "resume":
            manifest = json.loads(run_file.read_text())
            self._check_same(manifest, identity)
            return manifest
        # A new run is written only when scoring starts (`run`), so a failed validation leaves nothing behind.
        self._fresh = True
        return {"version": RUN_VERSION, **identity, "shards": [], "complete": False}

    def _start(self) -> None:
        if self.out.exists():  # --overwrite: the old run goes only now
            for f in [self.out / RUN_FILE, *self.out.glob("part-*"), *self.out.glob(".part-*")]:
                f.unlink()
        self.out.mkdir(parents=True, exist_ok=True)
        self.manifest["started"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._save(self.manifest)

    def _check_same(self, manifest: dict, identity: dict) -> None:
        before = {f["path"]: f for f in manifest["inputs"]}
        for now in identity["inputs"]:
            was = before.get(now["path"])
            if was is None or was["sha256"] != now["sha256"]:
                change = "is new" if was is None else f"changed (size {was['size']} -> {now['size']})"
                raise RescoreError(
                    f"{now['path']}: {change} since the run in {self.out} started; rescore into a new --out "
                    "or pass --overwrite"
                )
        for key in ("spec", "model", "shard_rows", "format"):
            if manifest.get(key) != identity[key]:
                raise RescoreError(
                    f"{self.out}: --resume with a different {key} than the run started with "
                    f"({manifest.get(key)} -> {identity[key]}); pass --overwrite to start again"
                )

    def _save(self, manifest: dict) -> None:
        atomic_write(self.out / RUN_FILE, json.dumps(manifest, indent=1))

    @property
    def done_rows(self) -> int:
        return sum(s["input_rows"] for s in self.manifest["shards"])

    # ------------------------------------------------------------------ rows

    def rows(self, skipped: Counter[str] | None = None) -> Iterator[tuple[str, dict, Examples]]:
        """Every input row that maps onto an example, across all inputs, in order (the others counted in
        `skipped` by reason)."""
        for path in self.inputs:
            spec = self.spec.model_copy(update={"path": str(path)})
            yield from dataset_rows(spec, where=str(path), skipped=skipped)

    def validate(self) -> int:
        """Read every row through the adapters before scoring anything; returns the number of rows to score.
        Rows the adapters leave out (e.g. identical sides) are recorded in the manifest by reason."""
        skipped: Counter[str] = Counter()
        total = sum(1 for _ in self.rows(skipped))
        self.manifest["skipped"] = dict(skipped)
        return total

    # ------------------------------------------------------------------ scoring

    def run(self, progress: bool = True, total: int | None = None) -> None:
        from tqdm import tqdm

        if self._fresh:
            self._start()
        rows = self.rows()
        start = self.done_rows
        for _ in itertools.islice(rows, start):  # committed shards: their rows are skipped, not rescored
            pass
        bar = tqdm(
            total=total, initial=start, unit="row", desc="rescoring", disable=not progress, smoothing=0.1
        )
        last = time.perf_counter()
        for (batch, planned), scored in self.engine.score_shards(self._shards(rows)):
            self._write_shard(start, batch, planned, scored, since=last)
            last = time.perf_counter()
            start += len(batch)
            bar.update(len(batch))
        bar.close()
        self.manifest["complete"] = True
        self.manifest["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._save(self.manifest)

    def _shards(self, rows: Iterator) -> Iterator[tuple[tuple[list, list], list[list[Item]]]]:
        """((rows, their plans), each row's items) per shard, for `Engine.score_shards`."""
        while batch := list(itertools.islice(rows, self.shard_rows)):
            planned = [_items(examples) for _, _, examples in batch]
            yield (batch, planned), [items for _, items, _ in planned]

    def _write_shard(self, first_row: int, batch, planned, scored: list[list[Scored]], since: float) -> None:
        """Write and commit one shard; `since` is when its reading and scoring began."""
        objectives = self.engine.objectives
        rows = [
            {**raw, "row": first_row + i, "source": where, **output_row(kind, example, mine, objectives)}
            for i, ((where, raw, _), (kind, _, example), mine) in enumerate(
                zip(batch, planned, scored, strict=True)
            )
        ]
        name = f"part-{len(self.manifest['shards']):05d}.{self.format}"
        if self.format == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            tmp = self.out / f".{name}.tmp"
            pq.write_table(pa.Table.from_pylist(rows), tmp)
            atomic_replace(tmp, self.out / name, fsync=True)
        else:
            atomic_write(
                self.out / name, (json.dumps(r, ensure_ascii=False) + "\n" for r in rows), fsync=True
            )
        self.manifest["shards"].append(
            {"file": name, "first_row": first_row, "input_rows": len(batch),
             "items": sum(len(items) for _, items, _ in planned), "seconds": round(time.perf_counter() - since, 2)}
        )  # fmt: skip
        self._save(self.manifest)


def read_output(out: str | os.PathLike):
    """All committed shards of a run as one pyarrow Table (Parquet runs) or list of dicts (JSONL runs)."""
    out = Path(out)
    manifest = json.loads((out / RUN_FILE).read_text())
    files = [out / s["file"] for s in manifest["shards"]]
    if manifest["format"] == "jsonl":
        return [json.loads(line) for f in files for line in f.read_text(encoding="utf-8").splitlines()]
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")
