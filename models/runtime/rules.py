"""Rule objectives: verifiable checks of a reply, declared in a file, joined to the learned objectives.

A rule file (YAML or JSON) is what `polyreward serve --rules`, `polyreward score --rules`, `polyreward rescore
--rules` and `polyreward eval --rules` load; it attaches to any artifact, an imported ArmoRM included:

    strip:                     # optional: removed from the reply before the learned heads read it
      pattern: '(?s)<think>.*?</think>\\s*'
    time_limit: 2.0            # seconds per item for the rules that run in worker processes (json, math)
    rules:
      format:  {kind: format, pattern: '(?s)^<think>.+</think>\\s*\\S', input: original}
      length:  {kind: length, unit: words, min: 20, max: 400, tolerance: 200}
      json:    {kind: json, schema: {type: object, required: [answer]}}
      exact:   {kind: exact, extract: 'answer is (.+)'}
      correct: {kind: math}

Every value is in [0, 1], 1 = satisfied (docs/rewards.md has the reasons):

    format   1 if the pattern occurs in the text (RE2 search; anchor with ^…$ for the whole reply), else 0
    length   n = words (whitespace-separated) or the model's tokens of the text; 1 inside [min, max], outside
             max(0, 1 − d / tolerance) with d the distance to the band (tolerance 0: 0 outside)
    json     1 if the text parses as JSON (and validates against `schema`, when given), else 0
    exact    1 if normalize(answer) == normalize(label): lower case, punctuation and the articles a/an/the
             dropped, whitespace collapsed (SQuAD's answer normalisation)
    math     1 if Hugging Face's math-verify finds the answer mathematically equal to the label, else 0

The text a rule reads is the reply after `strip` (`input: reply`, the default) or before it (`input:
original`); `extract`, a pattern with one group, narrows json/exact/math to the group of its last match (no
match: the value is 0). exact and math need each item's `label` (the reference answer). Patterns are RE2:
linear in the input, so no pattern/input pair can backtrack for ever (no backreferences or lookaround). json
and math run in worker processes, all of an item's together, killed past `time_limit`: the values of a rule
that did not finish are 0 and the item's `errors` says why. No rule executes code from a request.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import string
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from polyreward.models.runtime.errors import PolyrewardError
from polyreward.models.runtime.files import read_yaml_file
from polyreward.models.runtime.items import Item
from polyreward.models.runtime.rule_file import (
    POOLED,
    LengthRule,
    Rule,
    RuleError,
    RuleFile,
    compile_pattern,
)
from polyreward.models.runtime.scorer import ScoreResult

__all__ = ["Evaluation", "MissingLabel", "RuleError", "RuleFile", "RuleSet", "append_rules", "length_value"]


class MissingLabel(PolyrewardError, ValueError):
    """An item without the reference answer a correctness rule needs."""

    def __init__(self, index: int, rule: str):
        self.index, self.rule = index, rule
        self.reason = f"rule {rule!r} compares the reply with a reference answer; this item has none"
        super().__init__(f"label: {self.reason}")


@dataclass
class Evaluation:
    """Rule values of a list of items: `values` [N, R] in the rule set's order; per item the rules that
    could not finish and why."""

    values: np.ndarray
    errors: list[dict[str, str]]


class RuleSet:
    """A loaded rule file: strips replies, checks labels, evaluates every rule of a list of items."""

    def __init__(self, file: RuleFile | None = None, source: str = ""):
        self.file, self.source = file or RuleFile(), source
        self._strip = compile_pattern(self.file.strip.pattern) if self.file.strip else None
        self._pool = None
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path | None) -> RuleSet:
        """Read a YAML (or JSON) rule file; a bad one is an error naming the file, the rule and the field."""
        if path is None:
            return cls()
        return cls(read_yaml_file(Path(path), RuleFile, "rules", RuleError), str(path))

    @property
    def names(self) -> list[str]:
        return list(self.file.rules)

    @property
    def kinds(self) -> dict[str, str]:
        return {n: r.kind for n, r in self.file.rules.items()}

    def __bool__(self) -> bool:
        return bool(self.file.rules or self.file.strip)

    def check(self, learned: Sequence[str]) -> None:
        """Refuse rule names that are also a model's learned objectives."""
        if clash := sorted(set(self.names) & set(learned)):
            raise RuleError(
                f"rules: {self.source}: rules {clash} have the names of the model's learned objectives"
            )

    def check_labels(self, items: Sequence[Item]) -> None:
        """MissingLabel for the first item without the label a correctness rule needs (before any scoring)."""
        needs = next((n for n, r in self.file.rules.items() if r.kind in ("exact", "math")), None)
        if needs is not None:
            for i, item in enumerate(items):
                if item.label is None:
                    raise MissingLabel(i, needs)

    def strip(self, items: Sequence[Item]) -> tuple[list[Item], list[int]]:
        """(what the learned heads read, characters removed per item)."""
        if self._strip is None:
            return list(items), [0] * len(items)
        out, removed = [], []
        for item in items:
            reply = item.reply()
            kept = self._strip.sub("", reply)
            out.append(item.with_reply(kept) if kept != reply else item)
            removed.append(len(reply) - len(kept))
        return out, removed

    def evaluate(
        self,
        originals: Sequence[Item],
        stripped: Sequence[Item],
        count_tokens: Callable[[list[str]], list[int]] | None = None,
    ) -> Evaluation:
        """Every rule on every item; blocking (the service calls it off the event loop)."""
        n, names = len(originals), self.names
        values = np.zeros((n, len(names)))
        errors: list[dict[str, str]] = [{} for _ in range(n)]
        if not names:
            return Evaluation(values, errors)
        texts = {
            "reply": [it.reply() for it in stripped],
            "original": [it.reply() for it in originals],
        }
        labels = [it.label for it in originals]
        rules = self.rules
        pooled = [j for j, r in enumerate(rules) if r.kind in POOLED]
        futures = []
        if pooled:
            pool = self._workers()
            for i in range(n):
                jobs = [(names[j], texts[rules[j].input][i]) for j in pooled]
                futures.append(pool.schedule(_pooled, (jobs, labels[i]), timeout=self.file.time_limit))
        for j, rule in enumerate(rules):
            column = texts[rule.input]
            if rule.kind == "format":
                pattern = compile_pattern(rule.pattern)
                values[:, j] = [pattern.search(t) is not None for t in column]
            elif rule.kind == "length":
                sizes = count_tokens(column) if rule.unit == "tokens" and count_tokens else None
                if rule.unit == "tokens" and sizes is None:
                    raise RuleError(
                        f"rules: {self.source}: rule {names[j]!r} counts tokens; no tokenizer given"
                    )
                sizes = sizes if sizes is not None else [len(t.split()) for t in column]
                values[:, j] = [length_value(rule, s) for s in sizes]
            elif rule.kind == "exact":
                values[:, j] = [
                    float(a is not None and normalize_answer(a) == normalize_answer(str(lab)))
                    for a, lab in zip((_extract(rule, t) for t in column), labels, strict=True)
                ]
        for i, future in enumerate(futures):
            try:
                for name, value in future.result().items():
                    values[i, names.index(name)] = value
            except TimeoutError:
                errors[i] = {names[j]: f"timed out after {self.file.time_limit:g} s" for j in pooled}
            except Exception as e:  # the worker died (e.g. out of memory): a failed check, said so
                errors[i] = {names[j]: f"failed: {type(e).__name__}: {e}" for j in pooled}
        return Evaluation(values, errors)

    def score(
        self, scorer, items: Sequence[Item], **options
    ) -> tuple[list[ScoreResult], list[int], Evaluation]:
        """Offline (`polyreward score`, `rescore`, `eval`): strip, score with `scorer` (Scorer.score's
        options), evaluate; returns the results with the rule values appended, the characters stripped and
        the evaluation."""
        stripped, removed = self.strip(items)
        results = scorer.score(stripped, **options)
        evaluation = self.evaluate(items, stripped, scorer.builder.count_tokens)
        return append_rules(results, evaluation.values), removed, evaluation

    @property
    def rules(self) -> list[Rule]:
        return list(self.file.rules.values())

    def _workers(self):
        """The worker processes (started on first use; `spawn`: the parent holds ONNX Runtime threads)."""
        with self._lock:
            if self._pool is None:
                from pebble import ProcessPool

                self._pool = ProcessPool(
                    max_workers=self.file.workers,
                    initializer=_init_worker,
                    initargs=(self.file.model_dump(by_alias=True),),
                    context=multiprocessing.get_context("spawn"),
                )
            return self._pool

    def warm(self) -> None:
        """Start the worker processes and load what they import, so the first request does not wait."""
        if any(r.kind in POOLED for r in self.rules):
            self._workers().schedule(_pooled, ([], None)).result(timeout=120)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.stop()
                self._pool.join(timeout=10)
                self._pool = None


def append_rules(results: Sequence[ScoreResult], values: np.ndarray | None) -> list[ScoreResult]:
    """Results with rule values [N, R] appended to their rewards (gating weight 0, uncertainty 0), in the order
    the rule set names them."""
    if values is None or not values.shape[-1]:
        return list(results)
    zeros = [0.0] * values.shape[-1]
    return [
        replace(
            r,
            rewards=[*r.rewards, *v],
            gating=[*r.gating, *zeros],
            uncertainty=None if r.uncertainty is None else [*r.uncertainty, *zeros],
        )
        for r, v in zip(results, values.tolist(), strict=True)
    ]


def length_value(rule: LengthRule, size: int) -> float:
    """1 inside [min, max]; outside, 1 − distance / tolerance, at least 0."""
    hi = rule.max if rule.max is not None else float("inf")
    d = max(rule.min - size, size - hi, 0)
    if d == 0:
        return 1.0
    return max(0.0, 1.0 - d / rule.tolerance) if rule.tolerance else 0.0


_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(w for w in text.lower().translate(_PUNCTUATION).split() if w not in _ARTICLES)


def _extract(rule, text: str) -> str | None:
    """The group of the last match of `extract` (the whole text without one); None if it does not match."""
    if rule.extract is None:
        return text
    last = None
    for last in compile_pattern(rule.extract).finditer(text):  # noqa: B007
        pass
    return None if last is None else last.group(1)


# -- in the worker processes -----------------------------------------------------------------------------

_WORKER_RULES: dict[str, Rule] = {}


def _init_worker(file: dict) -> None:
    _WORKER_RULES.update(RuleFile.model_validate(file).rules)
    if any(r.kind == "math" for r in _WORKER_RULES.values()):
        import math_verify  # noqa: F401  (sympy and the LaTeX parser: seconds, once)

        # it warns that its signal-based timeouts are off: here the pool kills a check past the time limit
        logging.getLogger("math_verify").setLevel(logging.ERROR)


def _pooled(jobs: list[tuple[str, str]], label: str | None) -> dict[str, float]:
    return {name: _check(_WORKER_RULES[name], text, label) for name, text in jobs}


def _check(rule: Rule, text: str, label: str | None) -> float:
    answer = _extract(rule, text)
    if answer is None:
        return 0.0
    if rule.kind == "json":
        try:
            value = json.loads(answer)
        except ValueError:
            return 0.0
        if rule.schema_ is not None:
            from jsonschema import Draft202012Validator

            return float(Draft202012Validator(rule.schema_).is_valid(value))
        return 1.0
    return float(math_equal(answer, str(label)))


def math_equal(answer: str, label: str) -> bool:
    """math-verify's verdict on `answer` against the reference `label` (a bare label is read as LaTeX math
    too). Its own signal-based timeouts are off: the worker pool enforces the time limit."""
    from math_verify import parse, verify

    gold = parse(label, parsing_timeout=None) or parse(f"${label}$", parsing_timeout=None)
    return bool(gold) and verify(gold, parse(answer, parsing_timeout=None), timeout_seconds=None)
