// The demo page: vanilla JS, no build step, no framework. It calls the public API only
// (/ready, /items/search, /recommend), relative to the page, so it works behind a path prefix.
// Text from the service is always set with textContent, never parsed as HTML.
"use strict";

const API = new URL("../", window.location.href); // the page lives at <api>/demo/
const SEARCH_DELAY_MS = 200; // one request per pause in typing, not per key
const READY_RETRY_MS = 2000;

const $ = (id) => document.getElementById(id);
const state = { history: [], domains: [], searchAbort: null, searchTimer: null };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

// -- talking to the service ------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

async function call(path, options = {}) {
  let resp;
  try {
    resp = await fetch(new URL(path, API), options);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "unreachable", `cannot reach the service (${err.message})`, null);
  }
  const text = await resp.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!resp.ok) {
    const e = body && body.error;
    if (e && typeof e.code === "string") {
      throw new ApiError(resp.status, e.code, e.message || "", e.details);
    }
    throw new ApiError(resp.status, "http_error", text.slice(0, 300) || resp.statusText, null);
  }
  return body;
}

// The error envelope {"error": {code, message, details}} as a readable block.
function showError(err) {
  const box = $("error");
  box.replaceChildren();
  const head = el("p", { class: "error-head" });
  head.append(el("strong", { text: err.code }));
  if (err.status) head.append(` (HTTP ${err.status})`);
  head.append(": ", err.message);
  box.append(head);
  const lines = detailLines(err.details);
  if (lines.length) box.append(el("ul", {}, ...lines.map((t) => el("li", { text: t }))));
  box.hidden = false;
  box.focus();
}

function detailLines(details) {
  if (details == null) return [];
  if (Array.isArray(details)) {
    return details.map((d) =>
      d && typeof d === "object" && "field" in d
        ? `${d.field}: ${d.reason ?? JSON.stringify(d)}`
        : JSON.stringify(d),
    );
  }
  if (typeof details === "object") {
    return Object.entries(details).map(
      ([k, v]) => `${k}: ${typeof v === "string" ? v : JSON.stringify(v)}`,
    );
  }
  return [String(details)];
}

function clearError() {
  $("error").hidden = true;
  $("error").replaceChildren();
}

// -- readiness and domains --------------------------------------------------------------------

async function loadReady() {
  const status = $("status");
  try {
    const ready = await call("ready");
    state.domains = Object.keys(ready.domains).sort();
    status.replaceChildren(
      "Model ",
      el("code", { text: ready.model_version }),
      " · index ",
      el("code", { text: ready.index_version }),
      " · ",
      Object.entries(ready.domains)
        .map(([d, n]) => `${d} (${n})`)
        .join(", "),
    );
    status.classList.remove("warn");
    fillDomains(ready.domains);
  } catch (err) {
    status.textContent = `Service not ready: ${err.code}: ${err.message}. Retrying…`;
    status.classList.add("warn");
    setTimeout(loadReady, READY_RETRY_MS);
  }
}

function fillDomains(sizes) {
  const select = $("search-domain");
  const keep = select.value;
  select.replaceChildren(el("option", { value: "", text: "All domains" }));
  const list = $("target-list");
  const ticked = new Set(
    [...list.querySelectorAll("input:checked")].map((i) => i.value),
  );
  const first = list.children.length === 0;
  list.replaceChildren();
  $("domain-list").replaceChildren();
  for (const d of state.domains) {
    select.append(el("option", { value: d, text: `${d} (${sizes[d]})` }));
    $("domain-list").append(el("option", { value: d }));
    const id = `target-${d.replace(/[^A-Za-z0-9_-]/g, "_")}`;
    const box = el("input", { type: "checkbox", id, value: d, name: "target" });
    box.checked = first || ticked.has(d);
    list.append(el("label", { class: "check", for: id }, box, ` ${d}`));
  }
  select.value = state.domains.includes(keep) ? keep : "";
}

// -- search -----------------------------------------------------------------------------------

function scheduleSearch() {
  clearTimeout(state.searchTimer);
  state.searchTimer = setTimeout(runSearch, SEARCH_DELAY_MS);
}

async function runSearch() {
  const q = $("q").value.trim();
  const info = $("search-info");
  const list = $("search-results");
  if (state.searchAbort) state.searchAbort.abort();
  if (!q) {
    list.replaceChildren();
    info.textContent = "";
    return;
  }
  const params = new URLSearchParams({ q, limit: "10" });
  if ($("search-domain").value) params.set("domain", $("search-domain").value);
  state.searchAbort = new AbortController();
  try {
    const res = await call(`items/search?${params}`, { signal: state.searchAbort.signal });
    renderMatches(res);
  } catch (err) {
    if (err.name === "AbortError") return;
    list.replaceChildren();
    info.textContent = `Search failed: ${err.code}: ${err.message}`;
  }
}

function renderMatches(res) {
  const list = $("search-results");
  list.replaceChildren();
  const shown = res.items.length;
  $("search-info").textContent = shown
    ? `${res.matches} match${res.matches === 1 ? "" : "es"}` +
      (res.matches > shown ? `, the best ${shown} shown` : "")
    : `No title contains “${$("q").value.trim()}”.`;
  for (const it of res.items) {
    const button = el(
      "button",
      {
        type: "button",
        class: "match",
        "data-item-id": it.item_id,
        onclick: () => addHistory({ item_id: it.item_id, domain: it.domain, title: it.title }),
        onkeydown: (ev) => moveFocus(ev, list),
      },
      el("span", { class: "tag", text: it.domain }),
      el("span", { class: "title", text: it.title }),
      el("span", { class: "id", text: it.item_id }),
    );
    button.setAttribute("aria-label", `Add ${it.title} (${it.domain}) to the history`);
    list.append(el("li", {}, button));
  }
}

// Arrow keys between the matches; up from the first one goes back to the search box.
function moveFocus(ev, list) {
  if (ev.key !== "ArrowDown" && ev.key !== "ArrowUp") return;
  ev.preventDefault();
  const buttons = [...list.querySelectorAll("button")];
  const i = buttons.indexOf(document.activeElement);
  if (ev.key === "ArrowDown" && i < buttons.length - 1) buttons[i + 1].focus();
  if (ev.key === "ArrowUp") (i > 0 ? buttons[i - 1] : $("q")).focus();
}

// Enter in the search box: search now (no waiting for the pause) and add the best match.
async function addBestMatch() {
  clearTimeout(state.searchTimer);
  await runSearch();
  const first = $("search-results").querySelector("button");
  if (first) first.click();
}

// -- history ----------------------------------------------------------------------------------

function addHistory(entry) {
  state.history.push(entry);
  renderHistory();
  $("search-info").textContent = `Added “${entry.title}” (${entry.domain}) to the history.`;
}

function renderHistory() {
  const ol = $("history");
  ol.replaceChildren();
  state.history.forEach((h, i) => {
    const remove = el("button", {
      type: "button",
      class: "secondary small",
      text: "Remove",
      "aria-label": `Remove ${h.title} from the history`,
      onclick: () => {
        state.history.splice(i, 1);
        renderHistory();
        const next = $("history").querySelectorAll("button")[Math.min(i, state.history.length - 1)];
        (next || $("q")).focus();
      },
    });
    ol.append(
      el(
        "li",
        {},
        el("span", { class: "tag", text: h.domain }),
        el("span", { class: "title", text: h.title }),
        el("span", { class: "id", text: h.item_id || "text only" }),
        remove,
      ),
    );
  });
  const n = state.history.length;
  $("history-count").textContent = n ? `(${n})` : "";
  $("history-empty").hidden = n > 0;
  $("clear-history").disabled = n === 0;
}

// -- recommend --------------------------------------------------------------------------------

function requestBody() {
  const history = state.history.map((h) =>
    h.item_id ? { item_id: h.item_id } : { domain: h.domain, title: h.title },
  );
  const body = { history };
  const targets = [...$("target-list").querySelectorAll("input:checked")].map((i) => i.value);
  if (targets.length) body.target_domains = targets;
  const k = $("k").value.trim();
  // The service owns the limits: whatever was typed is sent, and its answer says what is wrong.
  if (k !== "") body.k = /^-?\d+$/.test(k) ? Number(k) : k;
  body.exclude_history = $("exclude").checked;
  return body;
}

async function recommend(ev) {
  ev.preventDefault();
  clearError();
  const body = requestBody();
  const json = JSON.stringify(body);
  $("request").textContent =
    `curl -s ${new URL("recommend", API)} -H 'content-type: application/json' ` +
    `-d '${json.replaceAll("'", "'\\''")}'`; // quoted for a POSIX shell
  $("request-box").hidden = false;
  const button = $("recommend");
  button.disabled = true;
  $("meta").textContent = "Asking…";
  const t0 = performance.now();
  try {
    const rec = await call("recommend", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: json,
    });
    renderResults(rec, performance.now() - t0);
  } catch (err) {
    $("meta").textContent = "";
    $("results").replaceChildren();
    showError(err);
  } finally {
    button.disabled = false;
  }
}

function renderResults(rec, ms) {
  const meta = $("meta");
  meta.replaceChildren(
    el("span", {}, "model ", el("code", { text: rec.model_version })),
    el("span", {}, "index ", el("code", { text: rec.index_version })),
    el("span", {
      class: rec.cached ? "flag on" : "flag",
      text: rec.cached ? "user vector from the cache" : "user vector computed",
    }),
  );
  if (rec.cold_start) {
    meta.append(el("span", { class: "flag on", text: "cold start: most popular items" }));
  }
  meta.append(el("span", { text: `${Math.round(ms)} ms` }));
  const out = $("results");
  out.replaceChildren();
  for (const [domain, items] of Object.entries(rec.results)) {
    const rows = items.map((it, i) =>
      el(
        "tr",
        {},
        el("td", { class: "num", text: String(i + 1) }),
        el("td", { text: it.title }),
        el("td", { class: "id", text: it.item_id }),
        el("td", { class: "num", text: it.score.toFixed(4) }),
        el(
          "td",
          {},
          el("button", {
            type: "button",
            class: "secondary small",
            text: "Add",
            "aria-label": `Add ${it.title} to the history`,
            onclick: () => addHistory({ item_id: it.item_id, domain, title: it.title }),
          }),
        ),
      ),
    );
    const head = el(
      "tr",
      {},
      ...["#", "Title", "Item id", "Score", ""].map((h) => el("th", { scope: "col", text: h })),
    );
    out.append(
      el(
        "section",
        { class: "domain", "data-domain": domain, "aria-label": `Top ${items.length} in ${domain}` },
        el("h3", { text: `${domain} (${items.length})` }),
        el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows)),
      ),
    );
  }
}

// -- wiring -----------------------------------------------------------------------------------

function init() {
  const q = $("q");
  q.addEventListener("input", scheduleSearch);
  q.addEventListener("keydown", (ev) => {
    if (ev.key === "ArrowDown") {
      const first = $("search-results").querySelector("button");
      if (first) {
        ev.preventDefault();
        first.focus();
      }
    } else if (ev.key === "Enter") {
      ev.preventDefault();
      addBestMatch();
    } else if (ev.key === "Escape") {
      q.value = "";
      runSearch();
    }
  });
  $("search-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    addBestMatch();
  });
  $("search-domain").addEventListener("change", runSearch);
  $("free-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const title = $("free-title").value.trim();
    const domain = $("free-domain").value.trim();
    if (!title || !domain) {
      $("search-info").textContent = "A text entry needs both a title and a domain.";
      return;
    }
    addHistory({ domain, title });
    $("free-title").value = "";
  });
  $("clear-history").addEventListener("click", () => {
    state.history = [];
    renderHistory();
    $("q").focus();
  });
  $("rec-form").addEventListener("submit", recommend);
  document.addEventListener("keydown", (ev) => {
    const typing = ev.target instanceof Element && ev.target.closest("input, select, textarea");
    if (ev.key === "/" && !typing) {
      ev.preventDefault();
      q.focus();
    }
  });
  renderHistory();
  loadReady();
}

init();
