// gainrag playground: POST /answer with stream=true, read the Server-Sent Events with fetch and a
// ReadableStream (EventSource cannot POST or send a key), render as events arrive.
// Every server-provided string goes into the page as text (textContent), never as HTML.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const app = $("app");
  const STAGES = ["retrieve", "pseudo", "select_retrieved", "select_pseudo", "select", "generate"];
  let controller = null; // AbortController of the request in flight
  let lastDone = null; // the last done event's data (re-rendered when the expected answer changes)

  // ---- text helpers --------------------------------------------------------------------------

  // DPR's has_answer, as gainrag.evaluation.qa_metrics: NFD, uncased tokens that are runs of
  // letters/numbers/marks or any other non-space character; an answer's token sequence occurs.
  const TOKEN = /[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]/gu;
  function tokens(text) {
    return (text.normalize("NFD").match(TOKEN) || []).map((t) => t.toLowerCase());
  }
  function hasAnswer(text, answers) {
    const t = tokens(text);
    return answers.some((answer) => {
      const a = tokens(answer);
      if (a.length === 0) return false;
      for (let i = 0; i + a.length <= t.length; i++) {
        if (a.every((tok, j) => t[i + j] === tok)) return true;
      }
      return false;
    });
  }
  function expectedAnswers() {
    return $("expected").value.split("|").map((s) => s.trim()).filter((s) => s.length > 0);
  }
  function fmt(x, digits) {
    return typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) : "—";
  }
  function el(tag, props, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children || []) node.append(c);
    return node;
  }

  // ---- state ---------------------------------------------------------------------------------

  function setState(state, message) {
    app.dataset.state = state;
    $("status").textContent = message;
    const busy = state === "waiting" || state === "streaming";
    $("submit").disabled = busy;
    $("stop").disabled = !busy;
  }
  function reset() {
    $("answer").textContent = "";
    $("meta").textContent = "";
    $("error").hidden = true;
    $("degraded").hidden = true;
    $("degraded-list").replaceChildren();
    $("selected").replaceChildren(el("p", { class: "muted", text: "Waiting…" }));
    $("timings").replaceChildren(el("p", { class: "muted", text: "Waiting…" }));
    $("pseudo").textContent = "Waiting…";
    $("pseudo").classList.add("muted");
    document.querySelector("#candidates tbody").replaceChildren();
  }
  function showError(status, body) {
    const err = body && body.error ? body.error : {};
    $("error").hidden = false;
    $("error-code").textContent =
      [status ? "HTTP " + status : "", err.code || ""].filter(Boolean).join(" · ");
    $("error-message").textContent = err.message || "the request failed";
    setState("error", "Failed: " + (err.message || "the request failed"));
  }

  // ---- rendering -----------------------------------------------------------------------------

  function selectorDown(degraded) {
    return (degraded || []).some((d) => d.kind === "selector_down");
  }

  function renderDegraded(degraded) {
    const list = $("degraded-list");
    list.replaceChildren(
      ...(degraded || []).map((d) =>
        el("li", {}, [el("code", { text: d.kind }), " " + d.message]))
    );
    $("degraded").hidden = list.children.length === 0;
  }

  function passageLabel(p) {
    return p.pseudo ? "pseudo-passage" : p.id + (p.title ? " · " + p.title : "");
  }

  function renderSelected(selected, degraded) {
    const scoreName = selectorDown(degraded)
      ? "score (selector down: retrieval order) "
      : "score ";
    const box = $("selected");
    if (!selected || selected.length === 0) {
      box.replaceChildren(el("p", { class: "muted", text: "No passage: answered closed-book." }));
      return;
    }
    box.replaceChildren(
      ...selected.map((p) =>
        el("article", { class: "chosen" + (p.pseudo ? " pseudo" : ""), "data-id": p.id }, [
          el("h3", {}, [
            p.pseudo ? el("span", { class: "badge pseudo", text: "pseudo" }) : "",
            passageLabel(p),
          ]),
          el("p", {
            class: "small muted",
            text:
              scoreName + fmt(p.score, 3) +
              (p.selector_score != null && p.selector_score !== p.score
                ? " · selector score " + fmt(p.selector_score, 3) : "") +
              (p.retrieval_rank != null ? " · retrieval rank " + (p.retrieval_rank + 1) : "") +
              (p.retrieval_score != null ? " · retrieval score " + fmt(p.retrieval_score, 3) : ""),
          }),
          el("p", { class: "passage-text", text: p.text }),
        ]))
    );
  }

  function renderCandidates(candidates, selected, degraded) {
    const chosen = new Set((selected || []).map((p) => p.id));
    const answers = expectedAnswers();
    const known = answers.length > 0;
    document.querySelectorAll(".has-answer-col").forEach((th) => (th.hidden = !known));
    const noSelector = selectorDown(degraded);
    const rows = (candidates || []).map((p, i) => {
      const isSelected = chosen.has(p.id);
      const cls = [isSelected ? "selected" : "", p.pseudo ? "pseudo" : ""].join(" ").trim();
      const cells = [
        el("td", { class: "num", text: String(i + 1) }),
        el("td", { class: "num", text: p.retrieval_rank != null ? String(p.retrieval_rank + 1) : "—" }),
        el("td", { class: "num", text: fmt(p.retrieval_score, 3) }),
        el("td", {
          class: "num",
          text: noSelector ? "—" : fmt(p.score, 3),
          title: noSelector ? "selector down: ranked by retrieval score" : "",
        }),
      ];
      if (known) {
        const hit = hasAnswer(p.text, answers);
        cells.push(el("td", { class: "has-answer " + (hit ? "yes" : "no"), text: hit ? "yes" : "no" }));
      }
      const summary = el("summary", {}, [
        isSelected ? el("span", { class: "badge chosen", text: "selected" }) : "",
        p.pseudo ? el("span", { class: "badge pseudo", text: "pseudo" }) : "",
        passageLabel(p),
      ]);
      cells.push(el("td", { class: "passage" }, [
        el("details", {}, [summary, el("p", { class: "passage-text", text: p.text })]),
      ]));
      return el("tr", {
        class: cls,
        "data-id": p.id,
        "data-selected": isSelected ? "true" : "false",
      }, cells);
    });
    document.querySelector("#candidates tbody").replaceChildren(...rows);
  }

  // A horizontal bar chart in inline SVG (built with DOM calls: nothing inline to allow in CSP).
  function renderTimings(timings, cached) {
    const box = $("timings");
    const SVG = "http://www.w3.org/2000/svg";
    const shown = STAGES.filter((s) => s in timings && (timings[s] > 0 || !s.startsWith("select_")));
    const max = Math.max(1, ...shown.map((s) => timings[s]));
    const row = 22, labelW = 118, barW = 240, valueW = 70;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("id", "timings-chart");
    svg.setAttribute("viewBox", `0 0 ${labelW + barW + valueW} ${row * shown.length + 4}`);
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", "stage timings in milliseconds");
    shown.forEach((stage, i) => {
      const y = i * row + 2;
      const label = document.createElementNS(SVG, "text");
      label.setAttribute("x", "0");
      label.setAttribute("y", String(y + 15));
      label.textContent = stage;
      const bar = document.createElementNS(SVG, "rect");
      bar.setAttribute("x", String(labelW));
      bar.setAttribute("y", String(y + 3));
      bar.setAttribute("height", "14");
      bar.setAttribute("width", String(Math.max(1, (barW * timings[stage]) / max)));
      bar.setAttribute("class", "bar " + stage);
      bar.setAttribute("data-stage", stage);
      const value = document.createElementNS(SVG, "text");
      value.setAttribute("x", String(labelW + barW + 6));
      value.setAttribute("y", String(y + 15));
      value.textContent = fmt(timings[stage], 0);
      svg.append(label, bar, value);
    });
    const notes = [];
    if ("total" in timings) notes.push("total " + fmt(timings.total, 0) + " ms");
    else notes.push("so far; generating…");
    if (cached) notes.push("cached answer: no stage ran");
    box.replaceChildren(svg, el("p", { class: "small muted", text: notes.join(" · ") }));
  }

  function renderContext(data) {
    renderSelected(data.selected, data.degraded);
    renderCandidates(data.candidates, data.selected, data.degraded);
    renderTimings(data.timings_ms || {}, data.cached);
    renderDegraded(data.degraded);
    const pseudo = $("pseudo");
    if (data.pseudo_passage) {
      pseudo.textContent = data.pseudo_passage;
      pseudo.classList.remove("muted");
    } else {
      pseudo.textContent = data.pseudo_passage === "" ? "N/A (dropped)" : "Not used.";
    }
    if (data.models) {
      $("models").textContent = Object.entries(data.models).map(([k, v]) => k + ": " + v).join(" · ");
    }
  }

  function renderDone(data, cacheHeader) {
    lastDone = data;
    $("answer").textContent = data.answer;
    renderSelected(data.passages, data.degraded);
    if (data.candidates) renderCandidates(data.candidates, data.passages, data.degraded);
    renderTimings(data.timings_ms || {}, data.cached);
    renderDegraded(data.degraded);
    $("meta").textContent =
      "request " + data.request_id + " · " + (data.cached ? "from the cache" : "computed") +
      (cacheHeader ? " (X-Cache: " + cacheHeader + ")" : "");
    app.dataset.requestId = data.request_id;
    app.dataset.selectedIds = (data.passages || []).map((p) => p.id).join(",");
  }

  // ---- Server-Sent Events over fetch ---------------------------------------------------------

  // Yields {event, data} for each event in the body (the SSE framing: lines, blank-line ended;
  // "event:" names it, "data:" lines join with newlines, ":" lines are comments).
  async function* readEvents(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.search(/\r\n\r\n|\n\n|\r\r/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^(\r\n\r\n|\n\n|\r\r)/, "");
        let event = "message";
        const data = [];
        for (const line of block.split(/\r\n|\n|\r/)) {
          if (line === "" || line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? "" : line.slice(colon + 1);
          if (val.startsWith(" ")) val = val.slice(1);
          if (field === "event") event = val;
          else if (field === "data") data.push(val);
        }
        if (data.length > 0) yield { event, data: data.join("\n") };
      }
    }
  }

  async function ask(event) {
    event.preventDefault();
    const question = $("question").value.trim();
    if (!question) return;
    reset();
    lastDone = null;
    setState("waiting", "Retrieving, writing the pseudo-passage and selecting…");
    const headers = { "content-type": "application/json", accept: "text/event-stream" };
    const key = $("api-key").value.trim();
    if (key) headers.authorization = "Bearer " + key;
    if ($("no-cache").checked) headers["cache-control"] = "no-cache";
    const body = {
      question,
      top_n: Number($("top-n").value) || undefined,
      stream: true,
      return_candidates: true,
    };
    controller = new AbortController();
    let finished = false;
    try {
      const response = await fetch("/answer", {
        method: "POST",
        headers,
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) {
        let parsed = null;
        try {
          parsed = await response.json();
        } catch (_) {
          parsed = { error: { message: response.statusText || "HTTP " + response.status } };
        }
        showError(response.status, parsed);
        return;
      }
      const cacheHeader = response.headers.get("x-cache");
      for await (const { event: name, data } of readEvents(response.body)) {
        const payload = JSON.parse(data);
        if (name === "passages") {
          renderContext(payload);
          setState("streaming", "Generating the answer…");
        } else if (name === "token") {
          $("answer").textContent += payload.text;
        } else if (name === "done") {
          renderDone(payload, cacheHeader);
          finished = true;
          setState("done", "Done.");
        } else if (name === "error") {
          finished = true;
          showError(null, payload);
        }
      }
      if (!finished) showError(null, { error: { message: "the stream ended without a result" } });
    } catch (exc) {
      if (exc.name === "AbortError") setState("stopped", "Stopped: the generation was cancelled.");
      else showError(null, { error: { message: String(exc.message || exc) } });
    } finally {
      controller = null;
    }
  }

  function init() {
    $("key-row").hidden = document.body.dataset.auth !== "key";
    $("ask").addEventListener("submit", ask);
    $("stop").addEventListener("click", () => controller && controller.abort());
    $("expected").addEventListener("input", () => {
      // Re-evaluate "contains answer" on the candidates already shown.
      if (app.dataset.state === "done" && lastDone && lastDone.candidates) {
        renderCandidates(lastDone.candidates, lastDone.passages, lastDone.degraded);
      }
    });
    setState("idle", "Ready.");
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
