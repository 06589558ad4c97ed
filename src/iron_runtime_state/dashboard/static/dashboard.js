// iron-state dashboard: keeps a server-rendered page live. No framework, no build step.
//
// The page says what to follow in data-* attributes of <body>:
//   data-after     the newest audit seq the page was rendered with (the stream starts after it)
//   data-agent     only this agent's records (an agent's page)
// The server sends "audit" events (one record each, id = seq, so a reconnecting browser resumes
// where it stopped), "totals"/"verify" (reload the live parts: elements with data-part="<address>"),
// "store" (up or down).
"use strict";

(function () {
  const body = document.body;
  const MAX_ROWS = 100;
  const DETAILS_SHOWN = 160;
  const SYSTEM_AGENT = "agent_00000000-0000-0000-0000-000000000000";

  function cell(text, className) {
    const td = document.createElement("td");
    if (className) td.className = className;
    td.textContent = text;
    return td;
  }

  function agentCell(agentId) {
    const td = document.createElement("td");
    if (agentId === SYSTEM_AGENT) {
      const span = document.createElement("span");
      span.className = "muted";
      span.textContent = "system";
      td.appendChild(span);
      return td;
    }
    const a = document.createElement("a");
    a.href = "/agents/" + encodeURIComponent(agentId);
    a.className = "mono";
    a.title = agentId;
    a.textContent = body.dataset.agent ? agentId : agentId.slice(0, 14) + "\u2026";
    td.appendChild(a);
    return td;
  }

  function addRecord(record) {
    const tbody = document.querySelector("#feed tbody");
    if (!tbody || tbody.querySelector('tr[data-seq="' + record.seq + '"]')) return;
    const tr = document.createElement("tr");
    tr.dataset.seq = String(record.seq);
    tr.className = "fresh";
    tr.appendChild(cell(String(record.seq), "num"));
    tr.appendChild(cell(record.time, "nowrap"));
    tr.appendChild(agentCell(record.agent_id));
    const type = document.createElement("td");
    const badge = document.createElement("span");
    badge.className = "event event-" + record.event_type;
    badge.textContent = record.event_type;
    type.appendChild(badge);
    tr.appendChild(type);
    const details = cell(record.details.slice(0, DETAILS_SHOWN), "details");
    details.title = record.details;
    tr.appendChild(details);
    tbody.insertBefore(tr, tbody.firstChild);
    while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(tbody.rows.length - 1);
    body.dataset.after = String(record.seq);
  }

  // Reload the page's live parts (elements with data-part="<address>"), one request at a time
  // for each; a change while one is under way reloads it once more after.
  const loads = {};
  function reloadPart(address) {
    const busy = loads[address];
    if (busy) {
      loads[address] = "again";
      return;
    }
    loads[address] = "loading";
    fetch(address, { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        const current = document.querySelector('[data-part="' + address + '"]');
        if (html !== null && current) current.outerHTML = html;
      })
      .catch(function () {
        /* the store or the server is away: the next event reloads it */
      })
      .finally(function () {
        const again = loads[address] === "again";
        loads[address] = null;
        if (again) reloadPart(address);
      });
  }

  // Live parts reload on every change; lazy ones (data-lazy: a sort of the whole fleet) load
  // once, after the page shows.
  function reloadParts() {
    document.querySelectorAll("[data-part]:not([data-lazy])").forEach(function (element) {
      reloadPart(element.dataset.part);
    });
  }
  document.querySelectorAll("[data-part][data-lazy]").forEach(function (element) {
    reloadPart(element.dataset.part);
  });

  function showStore(status) {
    const line = document.getElementById("store-status");
    const state = document.getElementById("store-state");
    const banner = document.getElementById("banner");
    const text = document.getElementById("banner-text");
    const name = status.up === true ? "up" : status.up === false ? "down" : "unknown";
    if (line) {
      line.className = "store store-" + name;
      line.title = status.error || "";
    }
    if (state) state.textContent = { up: "up", down: "DOWN", unknown: "connecting" }[name];
    if (banner) banner.hidden = status.up !== false;
    if (text && status.error) text.textContent = status.error;
  }

  function feedState(text) {
    const span = document.getElementById("feed-state");
    if (span) span.textContent = text;
  }

  function connect() {
    if (!window.EventSource || !document.getElementById("feed")) return;
    const params = new URLSearchParams();
    if (body.dataset.after) params.set("after", body.dataset.after);
    if (body.dataset.agent) params.set("agent", body.dataset.agent);
    const source = new EventSource("/events?" + params.toString());
    source.addEventListener("open", function () {
      feedState("live");
    });
    source.addEventListener("error", function () {
      feedState("reconnecting\u2026"); // the browser retries by itself, with Last-Event-ID
    });
    source.addEventListener("audit", function (event) {
      addRecord(JSON.parse(event.data));
    });
    source.addEventListener("totals", reloadParts);
    source.addEventListener("verify", reloadParts);
    source.addEventListener("store", function (event) {
      showStore(JSON.parse(event.data));
      reloadParts();
    });
  }

  // The agents filter: a new status applies at once (Enter in the labels box submits the form).
  const labels = document.getElementById("filter-labels");
  if (labels && labels.form) {
    document.getElementById("filter-status").addEventListener("change", function () {
      labels.form.submit();
    });
  }

  connect();
})();
