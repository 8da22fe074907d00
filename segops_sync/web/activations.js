// The Activations page: plain JavaScript against the HTTP API (/v1/connectors...).
// The API token lives in sessionStorage (this tab only) and goes out as a bearer token.
// Every text from the API is put in the page with textContent, never as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "segops.apiToken";
  const FAST_MS = 2000; // while a sync runs or something just changed
  const SLOW_MS = 10000; // otherwise: syncs started by recomputes still show up soon
  const BUSY_AFTER_ACTION_MS = 30000; // a run may take a moment to start after a click

  const $ = (id) => document.getElementById(id);
  const rows = new Map(); // connector id -> <tr>
  const latestRun = new Map(); // connector id -> newest run (or null)
  let token = sessionStorage.getItem(TOKEN_KEY);
  let timer = null;
  let generation = 0;
  let busyUntil = 0;
  let lastSnapshot = "";
  let refreshAlertShown = false;
  let connectors = [];

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(method, path, body, bearer = token) {
    const headers = { Authorization: `Bearer ${bearer}`, Accept: "application/json" };
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, `The API cannot be reached (${err.message}).`);
    }
    let doc = null;
    const text = response.status === 204 ? "" : await response.text();
    try {
      doc = text ? JSON.parse(text) : null;
    } catch {
      doc = null;
    }
    if (!response.ok) {
      const reason = doc && typeof doc.error === "string" ? doc.error : `HTTP ${response.status}`;
      throw new ApiError(response.status, reason);
    }
    return { status: response.status, doc, headers: response.headers };
  }

  // -- messages -------------------------------------------------------------------------

  function show(el, message) {
    el.textContent = message;
    el.hidden = !message;
  }

  function pageAlert(message) {
    refreshAlertShown = false;
    show($("page-alert"), message);
    if (message) show($("page-status"), ""); // the refusal, not an older success, is news
  }

  let statusTimer = null;
  function say(message) {
    show($("page-status"), message);
    clearTimeout(statusTimer);
    statusTimer = setTimeout(() => show($("page-status"), ""), 8000);
  }

  // -- sign in / out --------------------------------------------------------------------

  async function signIn(candidate) {
    const { doc } = await api("GET", "/v1/connectors", undefined, candidate);
    token = candidate;
    sessionStorage.setItem(TOKEN_KEY, candidate);
    $("token").value = "";
    show($("sign-in-alert"), "");
    $("sign-in").hidden = true;
    $("activations").hidden = false;
    $("sign-out").hidden = false;
    connectors = doc.connectors;
    render();
    tick();
  }

  function signOut(reason) {
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    clearTimeout(timer);
    generation += 1;
    rows.clear();
    latestRun.clear();
    $("connectors").tBodies[0].replaceChildren();
    $("activations").hidden = true;
    $("sign-out").hidden = true;
    $("sign-in").hidden = false;
    show($("sign-in-alert"), reason || "");
    $("token").focus();
  }

  $("sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const candidate = $("token").value.trim();
    if (!candidate) {
      show($("sign-in-alert"), "Enter the API token.");
      return;
    }
    const button = event.submitter || $("sign-in-form").querySelector("button");
    button.disabled = true;
    try {
      await signIn(candidate);
    } catch (err) {
      const prefix = err.status === 401 ? "Sign-in refused: " : "Cannot sign in: ";
      show($("sign-in-alert"), prefix + err.message);
    } finally {
      button.disabled = false;
    }
  });

  $("sign-out").addEventListener("click", () => signOut(""));

  // -- refresh --------------------------------------------------------------------------

  async function refresh() {
    const mine = ++generation;
    const { doc } = await api("GET", "/v1/connectors");
    const list = doc.connectors;
    // Only connectors that can be syncing need their newest run.
    const watched = list.filter(
      (c) => c.status !== "inactive" || latestRun.get(c.id)?.status === "running",
    );
    await Promise.all(
      watched.map(async (c) => {
        try {
          const { doc: runs } = await api("GET", `/v1/connectors/${encodeURIComponent(c.id)}/runs`);
          latestRun.set(c.id, runs.runs[0] || null);
        } catch (err) {
          if (err.status !== 404) throw err; // deleted meanwhile: gone at the next refresh
        }
      }),
    );
    if (mine !== generation) return false; // a newer refresh owns the table
    connectors = list;
    render();
    const snapshot = JSON.stringify(
      list.map((c) => [c.id, c.status, c.last_synced_at, c.last_error, latestRun.get(c.id)?.status]),
    );
    const changed = snapshot !== lastSnapshot;
    lastSnapshot = snapshot;
    const running = list.some((c) => latestRun.get(c.id)?.status === "running");
    const count = `${list.length} connector${list.length === 1 ? "" : "s"}`;
    const syncing = running ? " · a sync is running" : "";
    $("refreshed").textContent = `${count} · updated ${new Date().toLocaleTimeString()}${syncing}`;
    return running || changed;
  }

  function schedule(fast) {
    clearTimeout(timer);
    if (!token) return;
    const soon = fast || Date.now() < busyUntil;
    timer = setTimeout(tick, soon ? FAST_MS : SLOW_MS);
  }

  async function tick() {
    clearTimeout(timer);
    if (!token) return;
    if (document.hidden) {
      schedule(false);
      return;
    }
    let fast = false;
    try {
      fast = await refresh();
      if (refreshAlertShown) pageAlert("");
    } catch (err) {
      if (err.status === 401) {
        signOut("The API token was refused (it may have changed): sign in again.");
        return;
      }
      show($("page-alert"), `Could not refresh: ${err.message}`);
      refreshAlertShown = true;
    }
    schedule(fast);
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) tick();
  });

  // -- table ----------------------------------------------------------------------------

  const present = (nodes) => nodes.filter((n) => n !== null && n !== undefined);

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    Object.assign(node, props);
    node.append(...present(children));
    return node;
  }

  function put(cell, ...children) {
    cell.replaceChildren(...present(children));
  }

  function ago(iso) {
    const seconds = (Date.now() - Date.parse(iso)) / 1000;
    if (seconds < 45) return "just now";
    const minutes = Math.round(seconds / 60);
    if (minutes < 60) return `${minutes} min ago`;
    const hours = Math.round(minutes / 60);
    if (hours < 36) return `${hours} h ago`;
    const days = Math.round(hours / 24);
    return days === 1 ? "yesterday" : `${days} days ago`;
  }

  function newRow(c) {
    const tr = el("tr");
    tr.dataset.connectorId = c.id;
    const toggle = el("button", { type: "button", className: "small" });
    toggle.addEventListener("click", () => {
      const current = connectors.find((x) => x.id === c.id);
      setStatus(current || c, toggle);
    });
    const resync = el("button", { type: "button", className: "small ghost", textContent: "Resync" });
    resync.addEventListener("click", () => startResync(c, resync));
    // Pause or Resume, as the connector's status says (hidden while inactive).
    const hold = el("button", { type: "button", className: "small ghost" });
    hold.addEventListener("click", () => {
      const current = connectors.find((x) => x.id === c.id);
      pauseOrResume(current || c, hold);
    });
    tr.append(
      el("td", { className: "segment" }),
      el("td", { className: "list" }),
      el("td", { className: "status" }),
      el("td", { className: "synced" }),
      el("td", { className: "error" }),
      el("td", { className: "actions" }, toggle, hold, resync),
    );
    tr._toggle = toggle;
    tr._hold = hold;
    return tr;
  }

  function fillRow(tr, c) {
    const [segment, list, status, synced, error] = tr.cells;
    segment.replaceChildren(el("span", { className: "mono strong", textContent: c.segment_id }));
    list.replaceChildren(
      el("span", { className: "mono", textContent: c.list_id }),
      el("small", { className: "muted block", textContent: `key ${c.api_key}` }),
    );

    const badge = el("span", { className: `badge badge-status status-${c.status}`, textContent: c.status });
    const run = latestRun.get(c.id);
    let runNote = null;
    if (run && run.status === "running") {
      runNote = el("span", { className: "badge syncing", textContent: "syncing…" });
    } else if (run && run.status === "held") {
      runNote = el("small", { className: "muted block", textContent: "last run held: needs approval" });
    } else if (run && run.status === "cancelled") {
      runNote = el("small", { className: "muted block", textContent: "last run cancelled by a pause" });
    }
    put(status, badge, runNote);

    if (c.last_synced_at) {
      const when = el("time", { dateTime: c.last_synced_at, textContent: ago(c.last_synced_at) });
      when.title = new Date(c.last_synced_at).toLocaleString();
      const counts =
        run && run.status === "succeeded"
          ? el("small", { className: "muted block", textContent: `+${run.added} −${run.removed}${run.rejected ? ` · ${run.rejected} rejected` : ""}` })
          : null;
      put(synced, when, counts);
    } else {
      synced.replaceChildren(el("span", { className: "muted", textContent: "never" }));
    }

    if (c.last_error) {
      error.replaceChildren(el("span", { className: "error-text", textContent: c.last_error, title: c.last_error }));
    } else {
      error.replaceChildren(el("span", { className: "muted", textContent: "—" }));
    }

    const hold = tr._hold;
    hold.textContent = c.status === "paused" ? "Resume" : "Pause";
    hold.hidden = c.status === "inactive";

    const toggle = tr._toggle;
    const activate = c.status === "inactive";
    toggle.textContent = activate ? "Activate" : "Deactivate";
    toggle.className = activate ? "small primary" : "small";
    tr.className = `row-${c.status}`;
  }

  function render() {
    const tbody = $("connectors").tBodies[0];
    const seen = new Set();
    connectors.forEach((c, index) => {
      seen.add(c.id);
      let tr = rows.get(c.id);
      if (!tr) {
        tr = newRow(c);
        rows.set(c.id, tr);
      }
      fillRow(tr, c);
      if (tbody.children[index] !== tr) tbody.insertBefore(tr, tbody.children[index] || null);
    });
    for (const [id, tr] of rows) {
      if (!seen.has(id)) {
        tr.remove();
        rows.delete(id);
        latestRun.delete(id);
      }
    }
    $("empty").hidden = connectors.length > 0;
  }

  // -- actions --------------------------------------------------------------------------

  // One connector action from its row's button: the button waits for the answer, the answer
  // is said in the live region, and the table refreshes at once.
  async function rowAction(c, button, method, path, body, saying) {
    button.disabled = true;
    try {
      const { doc } = await api(method, `/v1/connectors/${encodeURIComponent(c.id)}${path}`, body);
      pageAlert("");
      say(`${c.segment_id}: ${saying(doc)}.`);
      busyUntil = Date.now() + BUSY_AFTER_ACTION_MS;
      await tick();
    } catch (err) {
      if (err.status === 401) return signOut("The API token was refused: sign in again.");
      pageAlert(`${c.segment_id}: ${err.message}`);
    } finally {
      button.disabled = false;
    }
  }

  function setStatus(c, button) {
    const status = c.status === "inactive" ? "active" : "inactive";
    return rowAction(c, button, "PATCH", "", { status }, () =>
      status === "active" ? "activated; the next recompute syncs it" : "deactivated",
    );
  }

  const OUTCOMES = {
    started: "resync started",
    coalesced: "a sync is already running; it will run once more when it ends",
    duplicate: "this sync was already requested",
    inactive: "the connector is inactive: activate it first",
    paused: "the connector is paused: resume it first",
  };

  function pauseOrResume(c, button) {
    const action = c.status === "paused" ? "resume" : "pause";
    return rowAction(c, button, "POST", `/${action}`, undefined, () =>
      action === "pause"
        ? "paused; a running sync stops at its next batch boundary"
        : "resumed; a sync catches up now",
    );
  }

  function startResync(c, button) {
    return rowAction(c, button, "POST", "/resync", undefined, (doc) => OUTCOMES[doc && doc.outcome] || "resync requested");
  }

  // -- creation -------------------------------------------------------------------------

  function openCreate(open) {
    $("create-panel").hidden = !open;
    $("new-connector").setAttribute("aria-expanded", String(open));
    show($("create-alert"), "");
    if (open) $("segment").focus();
    else {
      $("create-form").reset();
      forgetLists();
    }
  }

  // -- list picker: once a key is pasted, the List ID field offers that key's lists ------------

  const LIST_HINT = $("list-id-hint").textContent;
  let listsAskedFor = ""; // the key whose lists are offered (or being fetched)
  let listsAlertShown = false; // the form's alert holds a lookup error, not a refused Create

  function offerLists(lists) {
    $("key-lists").replaceChildren(
      ...lists.map((l) => {
        const members = l.profile_count === null ? "" : ` · ${l.profile_count} member${l.profile_count === 1 ? "" : "s"}`;
        // the value is what the field gets; the label is what a person recognises
        return el("option", { value: l.id, label: `${l.name} (${l.id}${members})` });
      }),
    );
  }

  async function fetchLists() {
    const key = $("api-key").value.trim();
    if (!key || key === listsAskedFor) return;
    listsAskedFor = key;
    offerLists([]);
    $("list-id-hint").textContent = "Looking up the key's lists in Klaviyo…";
    let lists;
    try {
      // the names first, at once; the member counts (Klaviyo counts one list a second) follow
      ({ lists } = (await api("POST", "/v1/klaviyo/lists", { api_key: key, counts: false })).doc);
    } catch (err) {
      if (listsAskedFor !== key) return;
      listsAskedFor = ""; // a fixed key (or a second try) asks again
      $("list-id-hint").textContent = LIST_HINT;
      if (err.status === 401) return signOut("The API token was refused: sign in again.");
      show($("create-alert"), `Cannot list the key's lists: ${err.message}`);
      listsAlertShown = true;
      return;
    }
    if (listsAskedFor !== key) return; // another key was pasted meanwhile
    offerLists(lists);
    if (listsAlertShown) show($("create-alert"), "");
    listsAlertShown = false;
    $("list-id-hint").textContent = lists.length
      ? `${lists.length} list${lists.length === 1 ? "" : "s"} of this key: pick one in List ID (or type an id).`
      : "This key has no lists in Klaviyo: create one there first.";
    if (!lists.length) return;
    try {
      const { doc } = await api("POST", "/v1/klaviyo/lists", { api_key: key });
      if (listsAskedFor === key) offerLists(doc.lists);
    } catch {
      // a count is a courtesy: the names stay offered
    }
  }

  $("api-key").addEventListener("change", fetchLists);
  // a paste changes the value only after the event: read it on the next turn
  $("api-key").addEventListener("paste", () => setTimeout(fetchLists, 0));

  function forgetLists() {
    listsAskedFor = "";
    offerLists([]);
    $("list-id-hint").textContent = LIST_HINT;
  }

  $("new-connector").addEventListener("click", () => openCreate($("create-panel").hidden));
  $("create-cancel").addEventListener("click", () => openCreate(false));

  $("create-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {
      type: "klaviyo",
      segment_id: $("segment").value.trim(),
      list_id: $("list-id").value.trim(),
      api_key: $("api-key").value.trim(),
    };
    // The key is never shown again, not even after a refusal: it is typed or pasted anew.
    $("api-key").value = "";
    const button = event.submitter || $("create-form").querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const { doc, headers } = await api("POST", "/v1/connectors", body);
      body.api_key = "";
      openCreate(false);
      const warning = headers.get("Warning");
      say(
        `Connector for ${doc.segment_id} created (inactive): activate it to start syncing.` +
          (warning ? " Klaviyo could not be reached, so the key and list were saved unchecked." : ""),
      );
      connectors = connectors.concat([doc]);
      render();
      rows.get(doc.id)?.classList.add("fresh");
      tick();
    } catch (err) {
      body.api_key = "";
      if (err.status === 401) return signOut("The API token was refused: sign in again.");
      // say so: the key field was emptied above, and must be filled again before a retry
      show($("create-alert"), `${err.message} (the API key field was emptied: enter the key again)`);
      listsAlertShown = false;
    } finally {
      button.disabled = false;
    }
  });

  // Relative times age even when nothing is polled.
  setInterval(() => token && render(), 30000);

  // -- start ----------------------------------------------------------------------------

  if (token) {
    signIn(token).catch((err) => {
      signOut(err.status === 401 ? "The saved API token was refused: sign in again." : `Cannot load: ${err.message}`);
    });
  } else {
    $("token").focus();
  }
})();
