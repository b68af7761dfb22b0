/* Cabinet: what every signed-in page does. The live event stream (/api/events), the unread badge,
   the browser notification (asked for on a click only), and a "cabinet:event" DOM event for the
   page's own script. Events carry IDs and states only, never patient data.
   The page lock: after body[data-lock-ms] without input, the page empties itself and goes to /lock
   (the server locks the session on its own too; input tells it the practitioner is still there). */
"use strict";
(function () {
  const cabinet = window.cabinet = { events: [], notified: 0, received: 0, busy: 0 };
  const badge = document.getElementById("badge");
  const labels = document.getElementById("labels");

  cabinet.label = function (state) {
    return (labels && labels.dataset[state]) || state;
  };
  cabinet.csrf = function () {
    const meta = document.querySelector('meta[name="csrf"]');
    return meta ? meta.content : "";
  };

  function setBadge(n) {
    if (!badge) return;
    badge.textContent = String(n);
    badge.dataset.count = String(n);
    badge.classList.toggle("empty", n === 0);
    if (labels) badge.setAttribute("aria-label", labels.dataset.unread.replace("{n}", String(n)));
  }

  function notify() {
    const button = document.getElementById("notify");
    if (!("Notification" in window) || Notification.permission !== "granted" || !button) return;
    const note = new Notification(button.dataset.title, { body: button.dataset.body, tag: "cabinet-record" });
    note.onclick = function () { window.focus(); window.location.href = "/inbox"; };
    cabinet.notified += 1;
    document.body.dataset.notified = String(cabinet.notified);
  }

  function received() {
    cabinet.received += 1;
    setBadge(Number(badge ? badge.dataset.count : 0) + 1);
    const live = document.getElementById("live");
    if (live) live.hidden = false;
    notify();
  }

  function setupNotifyButton() {
    const button = document.getElementById("notify");
    if (!button) return;
    const show = function () {
      if (!("Notification" in window)) { button.hidden = true; return; }
      if (Notification.permission === "granted") button.textContent = button.dataset.done;
      if (Notification.permission === "denied") button.textContent = button.dataset.denied;
    };
    show();
    button.addEventListener("click", function () {
      if (!("Notification" in window)) return;
      Notification.requestPermission().then(show);
    });
  }

  function listen() {
    if (!badge || !("EventSource" in window)) return;
    const source = new EventSource("/api/events");
    cabinet.source = source;
    const types = ["RecordReceived", "RecordStored", "DeliveryChanged", "RecordOpened", "KeyChanged", "Missed"];
    types.forEach(function (type) {
      source.addEventListener(type, function (e) {
        let data;
        try { data = JSON.parse(e.data); } catch (err) { return; }
        data.type = data.type || type;
        cabinet.events.push(data);
        if (cabinet.events.length > 2000) cabinet.events.shift();
        if (type === "RecordReceived") received();
        document.dispatchEvent(new CustomEvent("cabinet:event", { detail: data }));
      });
    });
    source.addEventListener("open", function () { document.body.dataset.live = "on"; });
    window.addEventListener("pagehide", function () { source.close(); });
  }

  function outboxPage() {
    if (document.body.dataset.page !== "outbox" && document.body.dataset.page !== "record") return;
    document.addEventListener("cabinet:event", function (e) {
      const d = e.detail;
      if (d.type !== "DeliveryChanged" && d.type !== "RecordOpened") return;
      const rows = document.querySelectorAll('tr[data-record="' + d.record_id + '"]');
      if (!rows.length && d.type === "DeliveryChanged" && document.body.dataset.page === "outbox") {
        const live = document.getElementById("live");   // a record sent from elsewhere: offer a refresh
        if (live) { live.hidden = false; live.querySelector("a").href = "/outbox"; }
      }
      rows.forEach(function (row) {
        if (d.type === "DeliveryChanged" && row.dataset.recipient !== d.recipient) return;
        if (d.type === "RecordOpened" && d.by && row.dataset.recipient !== d.by) return;
        if (d.type === "RecordOpened" && !d.by) return;
        cabinet.showState(row, d.type === "RecordOpened" ? "opened" : d.state, d.percent);
      });
    });
  }

  cabinet.showState = function (row, state, percent) {
    const cell = row.querySelector(".state");
    if (cell && cell.dataset.state === "opened") return;      // nothing comes after "opened"
    if (cell) { cell.textContent = cabinet.label(state); cell.dataset.state = state; }
    row.dataset.state = state;
    const bar = row.querySelector("progress");
    const pct = row.querySelector(".pct");
    const value = state === "delivered" || state === "opened" ? 100 : percent;
    if (bar && typeof value === "number") bar.value = value;
    if (pct && typeof value === "number") pct.textContent = value + " %";
    const reason = row.querySelector(".reason");
    if (reason && state !== "queued" && state !== "refused") reason.textContent = "";
  };

  function pageLock() {
    const limit = Number(document.body.dataset.lockMs || 0);
    if (!(limit > 0)) return;
    const every = Math.min(60000, Math.max(1000, limit / 3));     // "still here", told to the server
    let last = Date.now(), told = last, locked = false;

    function lockNow() {
      if (locked) return;
      locked = true;
      if (cabinet.source) cabinet.source.close();
      const back = window.location.pathname + window.location.search;
      document.title = "";
      document.body.replaceChildren();        // nothing of the patient stays on screen or in the DOM
      document.body.dataset.locked = "on";
      const go = function () {            // an upload under way (cabinet.busy > 0, send.js) finishes first
        if (cabinet.busy > 0) { window.setTimeout(go, 500); return; }
        window.location.replace("/lock?next=" + encodeURIComponent(back));
      };
      go();
    }

    function tell() {
      told = Date.now();
      fetch("/api/session", { credentials: "same-origin", cache: "no-store" })
        .then(function (r) { if (r.status === 401) lockNow(); })
        .catch(function () {});
    }

    function input() {
      if (locked) return;
      const now = Date.now();
      if (now - last >= limit) { lockNow(); return; }     // input after the lock time does not undo it
      last = now;
      if (now - told >= every) tell();
    }

    function check() {
      if (!locked && Date.now() - last >= limit) lockNow();
    }

    ["keydown", "pointerdown", "pointermove", "wheel", "touchstart", "input", "scroll"].forEach(function (type) {
      window.addEventListener(type, input, { capture: true, passive: true });
    });
    document.addEventListener("visibilitychange", check);
    window.addEventListener("pageshow", check);
    window.setInterval(check, Math.min(1000, Math.max(100, limit / 10)));
    cabinet.lockNow = lockNow;
  }

  pageLock();
  setupNotifyButton();
  listen();
  outboxPage();
})();
