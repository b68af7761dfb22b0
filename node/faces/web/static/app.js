/* Cabinet: what every signed-in page does. The live event stream (/api/events), the unread badge,
   the browser notification (asked for on a click only), and a "cabinet:event" DOM event for the
   page's own script. Events carry IDs and states only, never patient data. */
"use strict";
(function () {
  const cabinet = window.cabinet = { events: [], notified: 0, received: 0 };
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

  setupNotifyButton();
  listen();
  outboxPage();
})();
