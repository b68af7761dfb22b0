/* Cabinet: sending a referral (compose page) or a report (record page) through the local API.
   Recipients are picked from the contacts' <datalist> by any part of a name or city; files come
   from the picker or by drag and drop; the form goes as one streamed multipart upload
   (XMLHttpRequest, for its upload progress), then each recipient's row follows the real transfer
   through the event stream until "delivered". Closing the page after the upload changes nothing:
   the node carries on. */
"use strict";
(function () {
  const form = document.getElementById("send-form");
  if (!form) return;
  const cabinet = window.cabinet;
  const chosen = [];                    // attachments: File objects, in order
  const recipients = new Map();         // node ID -> display name

  function fold(text) {
    return text.normalize("NFD").replace(/[\u0300-\u036f]/g, "").toLowerCase().trim();
  }

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (cls) node.className = cls;
    return node;
  }

  // --- recipients (compose only) ---------------------------------------------------
  const pick = document.getElementById("to-pick");
  const toList = document.getElementById("to-list");

  function findContact(text) {
    const want = fold(text);
    if (!want) return null;
    const options = Array.from(document.querySelectorAll("#contact-list option"));
    const exact = options.filter(function (o) { return fold(o.value) === want; });
    if (exact.length === 1) return exact[0];
    const words = want.split(/\s+/);
    const some = options.filter(function (o) {
      const hay = fold(o.value + " " + o.textContent);
      return words.every(function (w) { return hay.indexOf(w) >= 0; });
    });
    return some.length === 1 ? some[0] : null;
  }

  function drawRecipients() {
    toList.textContent = "";
    recipients.forEach(function (name, id) {
      const li = el("li", name + " ");
      li.dataset.id = id;
      const remove = el("button", toList.dataset.remove);
      remove.type = "button";
      remove.setAttribute("aria-label", toList.dataset.remove + " " + name);
      remove.addEventListener("click", function () { recipients.delete(id); drawRecipients(); pick.focus(); });
      li.appendChild(remove);
      toList.appendChild(li);
    });
    document.getElementById("to-none").hidden = recipients.size > 0;
  }

  function addRecipient() {
    const option = findContact(pick.value);
    if (!option) { say(form.dataset.unknown, true); return; }
    recipients.set(option.dataset.id, option.value);
    pick.value = "";
    say("");
    drawRecipients();
  }

  if (pick) {
    document.getElementById("to-add").addEventListener("click", addRecipient);
    pick.addEventListener("keydown", function (e) {
      if (e.key === "Enter") { e.preventDefault(); addRecipient(); }
    });
  }

  // --- attachments -------------------------------------------------------------------
  const picker = form.querySelector('input[type="file"][multiple]');
  const fileList = document.getElementById("file-list");
  const drop = document.getElementById("drop");

  function drawFiles() {
    if (!fileList) return;
    fileList.textContent = "";
    chosen.forEach(function (file, i) {
      const li = el("li", file.name + " (" + Math.ceil(file.size / 1024) + " Kio) ");
      const remove = el("button", fileList.dataset.remove);
      remove.type = "button";
      remove.setAttribute("aria-label", fileList.dataset.remove + " " + file.name);
      remove.addEventListener("click", function () { chosen.splice(i, 1); drawFiles(); picker.focus(); });
      li.appendChild(remove);
      fileList.appendChild(li);
    });
  }

  if (picker && fileList) {
    picker.addEventListener("change", function () {
      Array.from(picker.files).forEach(function (f) { chosen.push(f); });
      picker.value = "";
      drawFiles();
    });
  }
  if (drop) {
    ["dragenter", "dragover"].forEach(function (type) {
      drop.addEventListener(type, function (e) { e.preventDefault(); drop.classList.add("over"); });
    });
    drop.addEventListener("dragleave", function () { drop.classList.remove("over"); });
    drop.addEventListener("drop", function (e) {
      e.preventDefault();
      drop.classList.remove("over");
      Array.from(e.dataTransfer.files).forEach(function (f) { chosen.push(f); });
      drawFiles();
    });
  }

  // --- sending -----------------------------------------------------------------------
  const msg = document.getElementById("send-msg");
  const bar = document.getElementById("upload-bar");
  const pct = document.getElementById("upload-pct");
  const perList = document.getElementById("per-recipient");

  function say(text, bad) {
    msg.textContent = text;
    msg.classList.toggle("error", !!bad);
  }

  function isoDay(text) {              // jj/mm/aaaa, as typed in France, to the API's YYYY-MM-DD
    const m = /^\s*(\d{1,2})[\/.-](\d{1,2})[\/.-](\d{4})\s*$/.exec(text);
    if (!m) return text.trim();
    return m[3] + "-" + m[2].padStart(2, "0") + "-" + m[1].padStart(2, "0");
  }

  function body() {
    const data = new FormData();
    recipients.forEach(function (name, id) { data.append("to", id); });
    ["patient", "born", "subject"].forEach(function (name) {
      const input = form.querySelector('[name="' + name + '"]');
      if (input) data.append(name, name === "born" ? isoDay(input.value) : input.value);
    });
    const letterFile = document.getElementById("letter-file");
    const letterText = form.querySelector('textarea[name="letter"]');
    if (letterFile && letterFile.files.length) data.append("letter", letterFile.files[0]);
    else data.append("letter", letterText.value);
    const files = fileList ? chosen : Array.from(picker ? picker.files : []);
    files.forEach(function (f) { data.append("attachments", f, f.name); });
    return data;
  }

  function follow(recordId, deliveries) {
    const title = form.querySelector(".per-title");
    if (title) title.hidden = false;
    Object.keys(deliveries).forEach(function (id) {
      const li = el("li");
      li.dataset.record = recordId;
      li.dataset.recipient = id;
      li.appendChild(el("span", recipients.get(id) || form.dataset.recipientName || id, "who"));
      const progress = document.createElement("progress");
      progress.max = 100;
      progress.value = 0;
      progress.setAttribute("aria-label", recipients.get(id) || id);
      li.appendChild(progress);
      li.appendChild(el("span", "0 %", "pct"));
      li.appendChild(el("span", "", "state"));
      perList.appendChild(li);
      cabinet.showState(li, deliveries[id], 0);
    });
    const apply = function (d) {
      if (d.record_id !== recordId) return;
      const target = d.type === "RecordOpened" ? d.by : d.recipient;
      perList.querySelectorAll("li").forEach(function (li) {
        if (li.dataset.recipient === target) {
          cabinet.showState(li, d.type === "RecordOpened" ? "opened" : d.state, d.percent);
        }
      });
    };
    document.addEventListener("cabinet:event", function (e) { apply(e.detail); });
    cabinet.events.forEach(apply);            // what arrived before the answer did
    fetch("/api/outbox", { credentials: "same-origin" }).then(function (r) { return r.json(); }).then(function (j) {
      (j.deliveries || []).forEach(function (d) {
        if (d.record_id === recordId && d.state !== "queued") {
          apply({ type: "DeliveryChanged", record_id: d.record_id, recipient: d.recipient, state: d.state,
                  percent: d.percent });
        }
      });
    }).catch(function () {});
  }

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    if (pick && recipients.size === 0) {
      if (pick.value) addRecipient();
      if (recipients.size === 0) { say(form.dataset.pick, true); pick.focus(); return; }
    }
    const button = form.querySelector('button[type="submit"]');
    button.disabled = true;
    form.querySelector(".progress-line").hidden = false;
    say("");
    const xhr = new XMLHttpRequest();
    xhr.open("POST", form.dataset.action);
    xhr.setRequestHeader("X-CSRF-Token", cabinet.csrf());
    xhr.upload.addEventListener("progress", function (p) {
      if (!p.lengthComputable) return;
      const value = Math.floor(p.loaded * 100 / p.total);
      bar.value = value;
      pct.textContent = value + " %";
    });
    xhr.addEventListener("load", function () {
      let answer = {};
      try { answer = JSON.parse(xhr.responseText); } catch (err) { answer = {}; }
      if (xhr.status === 202) {
        bar.value = 100;
        pct.textContent = "100 %";
        form.dataset.recordId = answer.record_id;
        say(form.dataset.ok);
        follow(answer.record_id, answer.deliveries || {});
      } else {
        button.disabled = false;
        say(form.dataset.fail.replace("{why}", answer.error || String(xhr.status)), true);
      }
    });
    xhr.addEventListener("error", function () {
      button.disabled = false;
      say(form.dataset.fail.replace("{why}", "network"), true);
    });
    cabinet.busy += 1;                   // the page lock (app.js) lets a running upload finish first
    xhr.addEventListener("loadend", function () { cabinet.busy -= 1; });
    xhr.send(body());
  });
})();
