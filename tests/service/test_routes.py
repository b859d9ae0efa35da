"""The routes in process (httpx's ASGITransport, asgi-lifespan): errors that name the field, what each number
means, background loading, auth and the error documentation — on real exported artifacts, no server process."""

from __future__ import annotations

import math
import re
import threading
import time

import numpy as np
import pytest

from polyreward.models.runtime.artifact import load_manifest
from polyreward.models.runtime.errors import PolyrewardError
from polyreward.models.runtime.scorer import Scorer
from polyreward.service.app import create_app
from polyreward.service.errors import RULES, SCORING
from polyreward.service.settings import Settings

ITEM = {"prompt": "What is 2 + 2?", "response": "4."}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def client(minilm_artifact, in_process):
    with in_process(create_app([minilm_artifact], Settings(drain_seconds=0))) as c:
        yield c


@pytest.fixture(scope="module")
def default_client(default_artifact, in_process):
    with in_process(create_app([default_artifact], Settings(drain_seconds=0))) as c:
        yield c


def test_bad_requests_get_named_4xx_errors(client, error_of):
    post = lambda body: client.post("/v1/score", json=body)  # noqa: E731
    assert "not valid JSON" in error_of(client.post("/v1/score", content=b"{bad", headers=JSON), 400)
    assert error_of(client.post("/v1/score", content=b"\xff\xfe", headers=JSON), 400)
    message = error_of(client.post("/v1/score", content=b'{"items": []}'), 415)  # no content-type
    assert "send JSON with the header 'content-type: application/json'" in message
    form = client.post("/v1/score", data={"items": "x"})  # what curl -d sends without -H
    assert "application/x-www-form-urlencoded" in error_of(form, 415)
    assert "items" in error_of(post({}), 422)
    assert "items" in error_of(post({"items": []}), 422)
    assert (
        error_of(post({"items": [{"prompt": "hi"}]}), 422)
        == "items[0]: response: required together with prompt"
    )
    assert error_of(post({"items": [{"prompt": "hi", "respnse": "yo"}]}), 422) == (
        "items[0].respnse: unknown field; did you mean 'response'?"
    )
    assert error_of(post({"itmes": [ITEM]}), 422) == "itmes: unknown field; did you mean 'items'?"
    assert (
        error_of(post({"items": [ITEM], "wieghts": {}}), 422)
        == "wieghts: unknown field; did you mean 'weights'?"
    )
    assert "'nope'" in error_of(post({"model": "nope", "items": [ITEM]}), 404)
    assert "items[0].messages" in error_of(post({"items": [{"messages": []}]}), 422)
    assert "query" in error_of(client.post("/get_reward", json={"prompts": ["x"]}), 422)
    assert "query[0]" in error_of(client.post("/get_reward", json={"query": [""]}), 422)
    assert error_of(client.get("/nope"), 404) == "Not Found"
    assert "give exactly one of prompt or messages" in error_of(
        client.post("/v1/compare", json={"pairs": [{"chosen": "a", "rejected": "b"}]}), 422
    )
    long = {"prompt": "word " * 2000, "response": "ok"}
    assert post({"items": [ITEM, long]}).json()["results"][1]["truncated"] is True  # the default policy
    message = error_of(post({"items": [ITEM, long], "truncation": "error"}), 422)
    assert re.match(r"items\[1\]: \d+ tokens exceeds max_length \d+ and truncation is 'error'", message)
    pair = {"prompt": "hi", "chosen": "fine", "rejected": "word " * 2000}
    message = error_of(client.post("/v1/compare", json={"pairs": [pair], "truncation": "error"}), 422)
    assert message.startswith("pairs[0].rejected: ")


def test_weights_must_name_known_objectives_and_be_finite(client, error_of):
    for body in ('{"nope": 1.0}', '{"objective0": NaN}', '{"objective0": Infinity}'):
        r = client.post(
            "/v1/score", content=f'{{"items": [{{"text": "x"}}], "weights": {body}}}', headers=JSON
        )
        assert "weights" in error_of(r, 422)
    r = client.post("/v1/score", json={"items": [ITEM], "weights": {"nope": 1.0}})
    assert r.json()["error"]["type"] == "unknown_objective"
    r = client.post("/v1/score", json={"items": [ITEM], "normalize": True})  # random heads: no calibration
    assert r.status_code == 422 and r.json()["error"]["type"] == "no_calibration"


def test_gating_comes_back_whenever_it_aggregates(client, minilm_artifact, error_of):
    want = Scorer(minilm_artifact, precision="fp32", device="cpu").score([ITEM])[0]
    for extras in ([], ["gating"]):
        (got,) = client.post("/v1/score", json={"items": [ITEM], "return": extras}).json()["results"]
        assert np.allclose(got["gating"], want.gating, atol=1e-5) and "uncertainty" not in got
    assert want.uncertainty is None  # random heads: asking for uncertainty is an error, not a silent omission
    r = client.post("/v1/score", json={"items": [ITEM], "return": ["uncertainty"]})
    assert error_of(r, 422) == "return: this model's heads carry no uncertainty output"
    weighted = client.post("/v1/score", json={"items": [ITEM], "weights": {"objective1": 1.0}}).json()
    assert "gating" not in weighted["results"][0]


def test_every_number_is_its_documented_formula(default_client, default_artifact):
    """Debiased objectives r @ T; normalize: (x − mean) / std with the space's stats; weights: Σ w·x in the
    debiased or the raw space; uncertainty: √(Σ_k β_k² σ_k²); compare: σ(margin) and its probit form;
    get_reward: the gated score, and each debiased objective in extra_logs."""
    manifest = load_manifest(default_artifact)
    names = manifest.objective_names
    t = np.array(manifest.transform)
    mean = np.array([manifest.debiased_calibration[n].mean for n in names])
    std = np.array([manifest.debiased_calibration[n].std for n in names])
    residual = np.array([manifest.uncertainty[n].residual_variance for n in names])
    good, bad = ITEM, {"prompt": ITEM["prompt"], "response": "5."}
    raw = Scorer(default_artifact, precision="fp32", device="cpu").score([good, bad])
    weights = {names[0]: 0.5, names[-1]: -2.0}
    w = np.array([weights.get(n, 0.0) for n in names])

    body = default_client.post(
        "/v1/score", json={"items": [good, bad], "normalize": True, "return": ["uncertainty"]}
    ).json()
    assert body["space"] == "debiased" and body["recipe"] == {"normalize": True}
    for got, r in zip(body["results"], raw, strict=True):
        assert np.allclose(got["rewards"], (np.array(r.rewards) @ t - mean) / std, atol=1e-4)
        assert got["raw"]["rewards"] == pytest.approx(r.rewards, abs=1e-5)
        assert got["score"] == pytest.approx(r.score, abs=1e-5)  # normalize alone leaves the gated score
        sigma = np.array(r.uncertainty)
        assert got["uncertainty"]["epistemic"] == pytest.approx(
            np.sqrt((t**2 * sigma[:, None] ** 2).sum(0)) / std, rel=1e-4
        )
        beta = t @ np.array(r.gating)
        predictive = np.sqrt(((beta**2) * (sigma**2 + residual)).sum())
        assert got["uncertainty"]["score"]["predictive"] == pytest.approx(predictive, rel=1e-4)
    for space, normalize in (("debiased", False), ("debiased", True), ("raw", False)):
        body = default_client.post(
            "/v1/score", json={"items": [good], "weights": weights, "normalize": normalize, "space": space}
        )
        r = np.array(raw[0].rewards)
        x = r if space == "raw" else r @ t
        want = ((x - mean) / std if normalize else x) @ w
        assert body.json()["results"][0]["score"] == pytest.approx(want, rel=1e-5, abs=1e-5)

    # transform against sent references: u = log σ(x − x_ref), x_ref the reference answer's own objectives
    body = default_client.post(
        "/v1/score",
        json={
            "items": [good],
            "weights": weights,
            "transform": {"reference": "references"},
            "references": [bad],
        },
    )
    assert body.status_code == 200, body.text
    u = -np.logaddexp(0, -(np.array(raw[0].rewards) @ t - np.array(raw[1].rewards) @ t))
    assert body.json()["results"][0]["score"] == pytest.approx(u @ w, abs=1e-4)

    pair = {"prompt": ITEM["prompt"], "chosen": good["response"], "rejected": bad["response"]}
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    (cmp,) = default_client.post("/v1/compare", json={"pairs": [pair]}).json()["results"]
    assert cmp["p_chosen"] == pytest.approx(sigmoid(raw[0].score - raw[1].score), abs=1e-5)
    x0, x1 = np.array(raw[0].rewards) @ t, np.array(raw[1].rewards) @ t
    for k, n in enumerate(names):
        assert cmp["objectives"][n] == pytest.approx(sigmoid(x0[k] - x1[k]), abs=1e-5)
    (cmp,) = default_client.post("/v1/compare", json={"pairs": [pair], "uncertainty": True}).json()["results"]
    sigmas = [np.sqrt(((t @ np.array(r.gating)) ** 2 * np.array(r.uncertainty) ** 2).sum()) for r in raw]
    assert cmp["margin_std"] == pytest.approx(math.hypot(*sigmas), rel=1e-4)
    m = raw[0].score - raw[1].score
    assert cmp["p_chosen"] == pytest.approx(
        sigmoid(m / math.sqrt(1 + math.pi * cmp["margin_std"] ** 2 / 8)), abs=1e-5
    )

    query = "User: What is 2 + 2?\n\nAssistant: 4."
    (text,) = Scorer(default_artifact, precision="fp32", device="cpu").score([{"text": query}])
    reward = default_client.post("/get_reward", json={"query": [query]}).json()
    assert reward["rewards"] == reward["scores"] == pytest.approx([text.score], abs=1e-5)
    assert [reward["extra_logs"][n][0] for n in names] == pytest.approx(np.array(text.rewards) @ t, abs=1e-4)
    assert reward["extra_logs"]["model_score"] == pytest.approx([text.score], abs=1e-5)


def test_models_load_in_the_background(minilm_artifact, in_process, error_of):
    """The app answers /health at once; /ready and the scoring routes answer 503 until the models are loaded."""
    release = threading.Event()

    def sources():
        assert release.wait(30)
        return [minilm_artifact]

    with in_process(create_app(sources, Settings(drain_seconds=0)), ready=False) as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert error_of(c.get("/ready"), 503) == "models are loading"
        assert error_of(c.post("/v1/score", json={"items": [ITEM]}), 503) == "models are loading"
        release.set()
        for _ in range(600):  # bounded: 30 s
            if c.get("/ready").status_code == 200:
                break
            time.sleep(0.05)
        assert c.post("/v1/score", json={"items": [ITEM]}).status_code == 200


def test_a_failed_load_is_named_by_ready(in_process, error_of, tmp_path):
    def sources():
        raise PolyrewardError(f"{tmp_path}: damaged")

    app = create_app(sources, Settings(drain_seconds=0))
    failures: list[str] = []
    app.state.registry.on_failure = failures.append
    with in_process(app, ready=False) as c:
        for _ in range(100):  # bounded: 5 s
            if failures:
                break
            time.sleep(0.05)
        assert error_of(c.get("/ready"), 503) == f"loading the models failed: {tmp_path}: damaged"
        assert failures == [f"{tmp_path}: damaged"]


def test_bearer_keys(minilm_artifact, in_process, error_of):
    with in_process(create_app([minilm_artifact], Settings(api_keys=["k1", "k2"], drain_seconds=0))) as c:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic k1"}):
            assert "Authorization: Bearer" in error_of(
                c.post("/v1/score", json={"items": [ITEM]}, headers=headers), 401
            )
        assert (
            c.post("/v1/score", json={"items": [ITEM]}, headers={"Authorization": "Bearer k2"}).status_code
            == 200
        )
        assert (
            c.get("/health").status_code
            == c.get("/ready").status_code
            == c.get("/metrics").status_code
            == 200
        )
        assert 'polyreward_rejections_total{reason="unauthorized"} 3.0' in c.get("/metrics").text


def test_the_error_documentation_comes_from_the_table(client):
    spec = client.get("/openapi.json").json()
    documented = {int(s) for s in spec["paths"]["/v1/score"]["post"]["responses"]} - {200}
    assert documented == {r.status for r in RULES if r.error in SCORING and r.status != 499}
    score_422 = spec["paths"]["/v1/score"]["post"]["responses"]["422"]["description"]
    assert "invalid_request" in score_422 and "input_too_long" in score_422
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert {"503"} <= set(spec["paths"]["/ready"]["get"]["responses"])
