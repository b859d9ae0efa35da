"""Reward recipes over HTTP (in process, the shipped default model): server-side profiles, the default profile
behind /get_reward, and every bad option answered 422 naming its field."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from polyreward.models.runtime.artifact import load_manifest
from polyreward.models.runtime.errors import PolyrewardError
from polyreward.models.runtime.items import parse_item
from polyreward.models.runtime.scorer import Scorer
from polyreward.service.app import create_app
from polyreward.service.postprocess import Recipe, prompt_key
from polyreward.service.profiles import Profiles
from polyreward.service.recipe import RecipeSpec
from polyreward.service.settings import Settings

GROUP = [
    {"prompt": "Name a prime number.", "response": "7."},
    {"prompt": "Name a prime number.", "response": "Seven is prime: it has no divisors but 1 and itself."},
    {"prompt": "Name a prime number.", "response": "I don't know."},
]
PROFILES = """
default: careful
profiles:
  careful:
    description: helpfulness and safety, both needed, pessimistic
    weights: {helpfulness: 1.0, safety: 1.0}
    aggregate: and
    transform: {reference: group}
    pessimism: {kappa: 1.0}
  floor:
    constraints: {min: {safety: 25.0}, penalty: 2.0}
"""


@pytest.fixture(scope="module")
def profiled(default_artifact, in_process, tmp_path_factory):
    path = tmp_path_factory.mktemp("profiles") / "profiles.yaml"
    path.write_text(PROFILES)
    with in_process(create_app([default_artifact], Settings(profiles=path, drain_seconds=0))) as c:
        yield c


def test_profiles_are_listed_chosen_by_name_and_overridden_by_the_request(profiled, default_artifact):
    listing = profiled.get("/v1/models").json()
    assert listing["default"] == "careful" and set(listing["profiles"]) == {"careful", "floor"}
    assert listing["profiles"]["careful"]["aggregate"] == "and"
    (model,) = listing["models"]
    assert model["spaces"] == ["debiased", "raw"] and model["uncertainty"] is True
    manifest = load_manifest(default_artifact)
    names, t = manifest.objective_names, np.array(manifest.transform)
    raw = Scorer(default_artifact, precision="fp32", device="cpu").score(GROUP)
    x = np.array([r.rewards for r in raw]) @ t
    sigma = np.array([r.uncertainty for r in raw])

    body = profiled.post("/v1/score", json={"items": GROUP}).json()  # no profile named: the default
    assert body["profile"] == "careful" and body["recipe"]["aggregate"] == "and"
    h, s = names.index("helpfulness"), names.index("safety")
    for i, got in enumerate(body["results"]):
        ref = x[[j for j in range(3) if j != i]].mean(0)
        z = x[i] - ref
        log_sig = -np.logaddexp(0, -z)
        jac = 1 / (1 + np.exp(z))
        beta = t[:, [h, s]] @ jac[[h, s]]
        want = log_sig[h] + log_sig[s] - np.sqrt(((beta * sigma[i]) ** 2).sum())
        assert got["score"] == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert got["raw"]["score"] == pytest.approx(raw[i].score, abs=1e-5)  # the model's own, beside
    floor = profiled.post("/v1/score", json={"items": GROUP, "profile": "floor"}).json()
    for got, r, xi in zip(floor["results"], raw, x, strict=True):
        assert got["slack"]["safety"] == pytest.approx(xi[s] - 25.0, rel=1e-4)
        assert got["score"] == pytest.approx(r.score - 2.0 * max(0.0, 25.0 - xi[s]), rel=1e-4, abs=1e-5)
    override = profiled.post("/v1/score", json={"items": GROUP, "profile": "careful", "pessimism": None})
    assert "pessimism" not in override.json()["recipe"]

    # /get_reward uses the default profile: its group transform groups recognised queries by their prompt
    query = ["User: Name a prime number.\n\nAssistant: 7.", "User: Name a prime number.\n\nAssistant: 9."]
    r = profiled.post("/get_reward", json={"query": query[:1]})
    assert r.status_code == 422 and "items[0] is the only item of its prompt" in r.text
    both = profiled.post("/get_reward", json={"query": query}).json()["rewards"]
    as_items = [{"prompt": "Name a prime number.", "response": reply} for reply in ("7.", "9.")]
    assert both == pytest.approx(
        [row["score"] for row in profiled.post("/v1/score", json={"items": as_items}).json()["results"]],
        abs=1e-5,
    )
    r = profiled.post("/get_reward", json={"query": ["7 is prime.", "9 is not."]})  # no known chat format
    assert r.status_code == 422 and "items[0]: a text item has no prompt to group by" in r.text


def test_a_profile_that_does_not_fit_the_model_fails_its_load(default_artifact, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("profiles:\n  x:\n    weights: {nope: 1}\n")
    with pytest.raises(
        PolyrewardError,
        match=r"profile 'x' on model 'polyreward-default': weights: unknown objectives \['nope'\]",
    ):
        Profiles.load(path).check(load_manifest(default_artifact))
    path.write_text("default: y\nprofiles:\n  x: {normalize: true}\n")
    with pytest.raises(PolyrewardError, match="default: 'y' is not one of the profiles"):
        Profiles.load(path)
    path.write_text("profiles:\n  x: {pessimism: {kapa: 1}}\n")
    with pytest.raises(PolyrewardError, match="kapa"):
        Profiles.load(path)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"weights": {"helpfulness": 1.0}, "aggregate": "and"}, "transform:"),
        (
            {"transform": {"reference": "group"}, "items": [GROUP[0]]},
            "transform.reference: items[0] is the only item",
        ),
        ({"transform": {"reference": "references"}}, "references:"),
        ({"references": [GROUP[0]]}, "references:"),
        (
            {"transform": {"reference": "group"}, "items": [{"text": "a"}, {"text": "b"}]},
            "items[0]: a text item",
        ),
        ({"pessimism": {"kappa": -1}}, "pessimism.kappa"),
        ({"constraints": {"min": {"safety": "NaN"}}}, "constraints.min"),
        ({"constraints": {"min": {"nope": 1.0}}}, "constraints.min: unknown objectives ['nope']"),
        ({"level": 1.5}, "level"),
        ({"space": "cooked"}, "space"),
        ({"profile": "nope"}, "profile: 'nope' is not loaded"),
        ({"aggregate": "min"}, "weights: aggregate 'min' needs weights"),
        (
            {"aggregate": "min", "weights": {"safety": 0}},
            "weights: aggregate 'min' needs at least one non-zero",
        ),
        ({"weights": {"safety": 1e300}}, "weights.safety: Input should be less than or equal to 1000000"),
        ({"items": [{"prompt": "a\ud800", "response": "b"}]}, "items[0].prompt: not valid Unicode"),
    ],
)
def test_every_bad_option_is_a_422_naming_it(profiled, error_of, body, field):
    payload = {"items": GROUP, "profile": "floor", **body}
    content = json.dumps(payload)  # the lone surrogate goes out as the escape "\ud800", as a client sends it
    r = profiled.post("/v1/score", content=content, headers={"content-type": "application/json"})
    assert field in error_of(r, 422)


def test_a_lone_surrogate_is_refused_on_every_route(profiled, error_of):
    pair = {"prompt": "hi", "chosen": "a\udc00", "rejected": "b"}
    r = profiled.post(
        "/v1/compare",
        content=json.dumps({"pairs": [pair], "profile": "floor"}),
        headers={"content-type": "application/json"},
    )
    assert "pairs[0].chosen: not valid Unicode" in error_of(r, 422)
    r = profiled.post(
        "/get_reward",
        content=json.dumps({"query": ["x\ud800"]}),
        headers={"content-type": "application/json"},
    )
    assert "query[0]: not valid Unicode" in error_of(r, 422)


def test_the_score_command_applies_the_same_recipes(default_artifact, cli, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": i, **it}) + "\n" for i, it in enumerate(GROUP)))
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(PROFILES)
    manifest = load_manifest(default_artifact)
    names = manifest.objective_names
    raw = Scorer(default_artifact, precision="fp32", device="cpu").score(GROUP)
    for args, spec in [
        ((), RecipeSpec()),
        (
            ("--weights", "helpfulness=1,safety=-2", "--normalize"),
            RecipeSpec(weights={"helpfulness": 1, "safety": -2}, normalize=True),
        ),
        (
            ("--profiles", profiles),
            RecipeSpec(
                **{
                    k: v
                    for k, v in yaml.safe_load(PROFILES)["profiles"]["careful"].items()
                    if k != "description"
                }
            ),
        ),
        (("--profiles", profiles, "--profile", "floor", "--space", "raw", "--pessimism", "0.5"), None),
    ]:
        rows = [
            json.loads(line)
            for line in cli(
                "score", default_artifact, "--input", items, "--precision", "fp32", *args
            ).stdout.splitlines()
        ]
        if spec is None:  # the floor profile with the command's own fields on top
            spec = RecipeSpec(
                constraints={"min": {"safety": 25.0}, "penalty": 2.0}, space="raw", pessimism={"kappa": 0.5}
            )
        want = Recipe.build(manifest, spec).apply(
            raw, [prompt_key(parse_item(it)) for it in GROUP], extras=["uncertainty"]
        )
        for row, w in zip(rows, want, strict=True):
            assert row["score"] == pytest.approx(w["score"], rel=1e-5, abs=1e-6)
            assert [row["rewards"][n] for n in names] == pytest.approx(w["rewards"], rel=1e-5, abs=1e-6)
            assert row["uncertainty"]["score"] == pytest.approx(w["uncertainty"]["score"], rel=1e-5)
    bad = cli("score", default_artifact, "--input", items, "--weights", "helpfulness", check=False)
    assert bad.returncode == 2 and "--weights" in bad.stderr and "OBJECTIVE=WEIGHT" in bad.stderr
    unknown = cli("score", default_artifact, "--input", items, "--weights", "nope=1", check=False)
    assert unknown.returncode == 2 and "weights: unknown objectives ['nope']" in unknown.stderr
