"""The playground page at ``GET /``: how it is served (in process), and the page itself in a real
headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by Selenium) against a real
gateway process (in-process SmolLM2, the small test index, API keys on).

The browser test writes a full-page screenshot to ``var/test-artifacts/playground.png``.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gainrag.api.app import create_app
from gainrag.api.playground import CSP
from gainrag.config import REPO_ROOT, Settings
from gainrag.evaluation.qa_metrics import has_answer
from gainrag_harness import Service, gainrag_service
from gainrag_harness.browser import chromium, fill, screenshot, wait_for
from tests.conftest import keyed_gateway_env, keys_file

ARTIFACTS = REPO_ROOT / "var" / "test-artifacts"


# ---- served in process (no models: the page and its assets need none) -------------------------


@pytest.fixture
async def client(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    settings: Settings = getattr(request, "param", None) or Settings()
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


async def test_page_and_assets_are_served_with_a_strict_csp(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-security-policy"] == CSP
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP
    assert page.headers["x-content-type-options"] == "nosniff"
    html = page.text
    # Nothing inline that the CSP would block: scripts by src only, no handlers, no style attrs.
    assert re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S) == [
        (' src="/static/playground.js" defer', "")
    ]
    assert not re.search(r"\son[a-z]+\s*=", html) and " style=" not in html
    assert 'data-auth="none"' in html and "{{" not in html  # keys off: no key field
    assert 'max="10"' in html and 'maxlength="1000"' in html  # from the settings
    for path, media in (
        ("/static/playground.js", "text/javascript; charset=utf-8"),
        ("/static/playground.css", "text/css; charset=utf-8"),
    ):
        r = await client.get(path)
        assert r.status_code == 200 and r.headers["content-type"] == media and r.content
    # Nothing else under /static, and the API's own routes are untouched.
    assert (await client.get("/static/index.html")).status_code == 404
    assert (await client.get("/static/../config.py")).status_code == 404
    assert (await client.get("/health")).json() == {"status": "ok"}
    spec = (await client.get("/openapi.json")).json()
    assert "/" not in spec["paths"] and not any(p.startswith("/static") for p in spec["paths"])


@pytest.mark.parametrize(
    "client", [Settings.model_validate({"api": {"playground": False}})], indirect=True
)
async def test_playground_off_is_404(client: httpx.AsyncClient) -> None:
    assert (await client.get("/")).status_code == 404
    assert (await client.get("/static/playground.js")).status_code == 404


# ---- the page in a real browser against a real gateway ----------------------------------------


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return keys_file(tmp_path_factory, "browser")


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    index_dir: Path,
    small_corpus: Path,
    llm_dir: Path,
    key: tuple[Path, str],
) -> Iterator[Service]:
    env = keyed_gateway_env(index_dir, small_corpus, key[0], pseudo_tokens=24, answer_tokens=24)
    logs = tmp_path_factory.mktemp("gateway")
    # Launched now, waited on only after the browser started: the two start side by side.
    svc = gainrag_service("gateway", ["serve"], logs, env, threads=1).launch()
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


def _state(driver: Any) -> str:
    return str(driver.find_element("id", "app").get_attribute("data-state"))


def _events(text: str) -> list[tuple[str, Any]]:
    """(event, JSON data) of each server-sent event in ``text``."""
    out = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            out.append((fields.get("event", "message"), json.loads(fields["data"])))
    return out


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def test_playground_streams_an_answer_and_highlights_the_selected_passage(
    browser: Any, gateway: Service, key: tuple[Path, str], dev_questions: list[dict]
) -> None:
    gateway.wait_up()
    q = dev_questions[0]
    driver = browser
    driver.get(gateway.url + "/")
    assert driver.title == "gainrag playground"
    assert driver.find_element("id", "key-row").is_displayed()  # keys are on in this gateway

    # A wrong key: the 401 is shown with the API's message and code.
    fill(driver, "question", q["question"])
    fill(driver, "api-key", "gr-not-a-key")
    driver.find_element("id", "submit").click()
    wait_for(driver, lambda d: _state(d) == "error", 30)
    assert driver.find_element("id", "error").is_displayed()
    assert driver.find_element("id", "error-message").text == "the API key is not valid"
    assert "401" in driver.find_element("id", "error-code").text

    # The real question, with its gold answer for the "contains answer" column.
    fill(driver, "api-key", key[1])
    fill(driver, "expected", " | ".join(q["answers"]))
    # Record every state the page goes through and the answer's text at each change.
    driver.execute_script(
        """
        window.seen = [];
        const app = document.getElementById('app'), answer = document.getElementById('answer');
        const rows = () => document.querySelectorAll('#candidates tbody tr').length;
        const record = () => window.seen.push([app.dataset.state, answer.textContent, rows()]);
        new MutationObserver(record).observe(app, {attributeFilter: ['data-state']});
        """
    )
    driver.find_element("id", "submit").click()
    wait_for(driver, lambda d: _state(d) in ("done", "error"), 240)
    assert _state(driver) == "done", driver.find_element("id", "error-message").text
    assert not driver.find_element("id", "error").is_displayed()
    seen = driver.execute_script("return window.seen")
    # The citation (state 'streaming', after the passages event) came before any token.
    assert [s for s, _, _ in seen] == ["waiting", "streaming", "done"]
    assert seen[1][1] == "" and seen[1][2] > 0  # the candidates were shown, no answer yet

    # The same question, streamed to this test (greedy decoding, no cache in this gateway).
    with httpx.stream(
        "POST",
        gateway.url + "/answer",
        json={"question": q["question"], "stream": True, "return_candidates": True},
        headers={"authorization": f"Bearer {key[1]}"},
        timeout=240,
    ) as r:
        assert r.status_code == 200, r.read()
        events = _events(r.read().decode())
    assert events[0][0] == "passages" and events[-1][0] == "done"
    expected = events[-1][1]
    answer = driver.find_element("id", "answer").text
    assert answer and answer == expected["answer"].strip()

    rows = driver.find_elements("css selector", "#candidates tbody tr")
    assert [row.get_attribute("data-id") for row in rows] == [
        c["id"] for c in expected["candidates"]
    ]
    selected_ids = [p["id"] for p in expected["passages"]]
    highlighted = driver.find_elements("css selector", "#candidates tbody tr.selected")
    assert [row.get_attribute("data-id") for row in highlighted] == selected_ids
    assert len(selected_ids) == 1  # top_n defaults to 1
    assert driver.find_element("id", "app").get_attribute("data-selected-ids") == ",".join(
        selected_ids
    )
    # The highlight is visible: a selected row's background differs from the others'.
    backgrounds = {
        row.get_attribute("data-id"): row.find_element("css selector", "td").value_of_css_property(
            "background-color"
        )
        for row in rows
    }
    others = {bg for i, bg in backgrounds.items() if i not in selected_ids}
    assert backgrounds[selected_ids[0]] not in others

    # Scores and ranks as the API gave them; "contains answer" as the evaluation computes it.
    for row, cand in zip(rows, expected["candidates"], strict=True):
        cells = [td.text for td in row.find_elements("css selector", "td")]
        rank, retrieval_score, selector_score, contains = cells[1:5]
        if cand["pseudo"]:
            assert rank == "—" and retrieval_score == "—"
            assert "pseudo" in row.get_attribute("class")
        else:
            assert rank == str(cand["retrieval_rank"] + 1)
            assert retrieval_score == f"{cand['retrieval_score']:.3f}"
        assert selector_score == f"{cand['score']:.3f}"
        assert contains == ("yes" if has_answer(cand["text"], q["answers"]) else "no")
    pseudo_rows = [c for c in expected["candidates"] if c["pseudo"]]
    if expected.get("pseudo_passage"):
        assert driver.find_element("id", "pseudo").text == expected["pseudo_passage"]
        assert len(pseudo_rows) == 1
    chosen = driver.find_elements("css selector", "#selected article.chosen")
    assert [a.get_attribute("data-id") for a in chosen] == selected_ids

    # The timings chart: one bar per stage that ran, generate included, and the total.
    bars = driver.find_elements("css selector", "#timings-chart rect.bar")
    stages = {b.get_attribute("data-stage") for b in bars}
    assert {"retrieve", "pseudo", "select", "generate"} <= stages
    assert all(float(b.get_attribute("width")) > 0 for b in bars)
    assert "total" in driver.find_element("id", "timings").text
    assert not driver.find_element("id", "degraded").is_displayed()
    assert expected["degraded"] == []

    # No script error and no Content-Security-Policy violation in the console.
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    # The deliberate 401 above is logged by Chromium as a failed resource load.
    errors = [e for e in errors if "401" not in e["message"]]
    assert errors == [], json.dumps(errors, indent=1)

    screenshot(driver, ARTIFACTS / "playground.png")
    assert (ARTIFACTS / "playground.png").stat().st_size > 10_000

    # A degraded answer whose generation fails mid-stream, which this gateway cannot be made to
    # do on demand: the real stream's passages event with a selector_down degradation added,
    # one token, then an error event, replayed to the page through its fetch.
    passages = dict(events[0][1])
    passages["degraded"] = [{"kind": "selector_down", "message": "selector unreachable"}]
    error = {"error": {"message": "the generate stage failed", "type": "upstream_error",
                       "code": "generate_failed"}}  # fmt: skip
    replay = _sse("passages", passages) + _sse("token", {"text": "Wil"}) + _sse("error", error)
    driver.execute_script(
        """
        const body = arguments[0];
        window.fetch = async () => new Response(body, {
          status: 200, headers: {'content-type': 'text/event-stream'}});
        """,
        replay,
    )
    driver.find_element("id", "submit").click()
    wait_for(driver, lambda d: _state(d) == "error", 30)
    assert driver.find_element("id", "error-message").text == "the generate stage failed"
    assert "generate_failed" in driver.find_element("id", "error-code").text
    assert driver.find_element("id", "answer").text == "Wil"
    degraded = driver.find_element("id", "degraded")
    assert degraded.is_displayed() and "selector_down selector unreachable" in degraded.text
    rows = driver.find_elements("css selector", "#candidates tbody tr")
    # Selector down: the scores are not the selector's, so that column shows none.
    assert [row.find_elements("css selector", "td")[3].text for row in rows] == ["—"] * len(rows)
