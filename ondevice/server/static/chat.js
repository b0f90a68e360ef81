// ondevice's chat page: talks to the server it came from (relative URLs, OpenAI's
// /v1/chat/completions streamed as server-sent events), renders replies as Markdown built from
// DOM nodes (model output is untrusted: it only ever becomes text nodes, never HTML), and keeps
// conversations in this browser.
//
// Storage (all in this browser, nothing on the server):
//   localStorage "ondevice.chat.v1"        {"current": id|null, "conversations": [conversation]}
//       conversation = {"id", "title", "created", "updated" (ms since 1970),
//                       "messages": [{"role": "user"|"assistant", "content": text,
//                                     "model"?, "stats"?, "notes"?: [text], "stopped"?: true,
//                                     "error"?: text}]}
//   localStorage "ondevice.chat.settings"  {"system", "temperature", "maxTokens"}
//   the API key: sessionStorage "ondevice.apiKey" (until the tab closes), or localStorage
//       "ondevice.apiKey" when "Remember on this device" is ticked.
"use strict";

(() => {
  const STORE = "ondevice.chat.v1";
  const SETTINGS = "ondevice.chat.settings";
  const KEY = "ondevice.apiKey";

  const $ = (id) => document.getElementById(id);
  const ui = {
    toggle: $("chats-toggle"), closeDrawer: $("close-drawer"), newChat: $("new-chat"), modelName: $("model-name"),
    sidebar: $("sidebar"), scrim: $("scrim"), list: $("conversations"),
    none: $("no-conversations"), system: $("system-prompt"), temperature: $("temperature"),
    maxTokens: $("max-tokens"), forgetKey: $("forget-key"), transcript: $("transcript"),
    empty: $("empty"), composer: $("composer"), prompt: $("prompt"), send: $("send"),
    stop: $("stop"), status: $("status"), dialog: $("key-dialog"), keyForm: $("key-form"),
    keyInput: $("api-key"), remember: $("remember-key"), keyError: $("key-error"),
  };

  let store = loadStore();
  let modelName = "";
  let busy = null; // the reply being streamed: {controller, conv, reply, view}

  // --- storage ----------------------------------------------------------------------------
  function readJSON(storage, name) {
    try {
      return JSON.parse(storage.getItem(name) || "null");
    } catch (err) {
      return null;
    }
  }

  function loadStore() {
    const raw = readJSON(localStorage, STORE) || {};
    const convs = Array.isArray(raw.conversations) ? raw.conversations : [];
    const clean = convs
      .filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages))
      .map((c) => ({
        id: c.id,
        title: String(c.title || "Untitled"),
        created: Number(c.created) || Date.now(),
        updated: Number(c.updated) || Date.now(),
        messages: c.messages.filter((m) => m && (m.role === "user" || m.role === "assistant"))
          .map((m) => ({ ...m, content: String(m.content ?? "") })),
      }));
    const current = clean.some((c) => c.id === raw.current) ? raw.current : null;
    return { current, conversations: clean };
  }

  function save() {
    try {
      localStorage.setItem(STORE, JSON.stringify(store));
    } catch (err) {
      say("Could not save the conversation: this browser's storage is full or off.");
    }
  }

  function currentConv() {
    return store.conversations.find((c) => c.id === store.current) || null;
  }

  function newId() {
    // crypto.randomUUID needs a secure context, which a phone reaching a LAN address over
    // plain HTTP does not have.
    return Date.now().toString(36) + "-" + Math.random().toString(36).slice(2, 10);
  }

  function titleFrom(text) {
    const one = text.trim().replace(/\s+/g, " ");
    return one.length > 48 ? one.slice(0, 47) + "…" : one || "Untitled";
  }

  function loadSettings() {
    const s = readJSON(localStorage, SETTINGS) || {};
    if (typeof s.system === "string") ui.system.value = s.system;
    if (s.temperature !== undefined) ui.temperature.value = s.temperature;
    if (s.maxTokens !== undefined) ui.maxTokens.value = s.maxTokens;
  }

  function saveSettings() {
    const s = { system: ui.system.value, temperature: ui.temperature.value,
                maxTokens: ui.maxTokens.value };
    try {
      localStorage.setItem(SETTINGS, JSON.stringify(s));
    } catch (err) { /* settings are a convenience; the chat works without them */ }
  }

  function apiKey() {
    return sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || "";
  }

  function setKey(key, remember) {
    sessionStorage.removeItem(KEY);
    localStorage.removeItem(KEY);
    if (key) (remember ? localStorage : sessionStorage).setItem(KEY, key);
    ui.forgetKey.hidden = !key;
  }

  // --- safe Markdown: every piece of model text becomes a text node -----------------------
  function node(tag, text) {
    const n = document.createElement(tag);
    if (text !== undefined) n.textContent = text;
    return n;
  }

  const FENCE = /^\s{0,3}(`{3,}|~{3,})/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
  const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
  const NUMBERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
  const QUOTE = /^\s{0,3}>\s?(.*)$/;

  function startsBlock(line) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || BULLET.test(line) ||
      NUMBERED.test(line) || QUOTE.test(line);
  }

  function renderMarkdown(src) {
    const out = document.createDocumentFragment();
    const lines = src.replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (!line.trim()) {
        i++;
      } else if ((m = line.match(FENCE))) {
        // A fence still open (the reply is streaming) runs to the end.
        const body = [];
        for (i++; i < lines.length && !lines[i].trim().startsWith(m[1]); i++) body.push(lines[i]);
        i++;
        const pre = node("pre");
        pre.append(node("code", body.join("\n")));
        out.append(pre);
      } else if ((m = line.match(HEADING))) {
        const h = node("h" + Math.min(m[1].length + 2, 6));
        inline(m[2], h);
        out.append(h);
        i++;
      } else if (RULE.test(line)) {
        out.append(node("hr"));
        i++;
      } else if (BULLET.test(line) || NUMBERED.test(line)) {
        i = list(lines, i, out);
      } else if (QUOTE.test(line)) {
        const inner = [];
        for (; i < lines.length && (m = lines[i].match(QUOTE)); i++) inner.push(m[1]);
        const q = node("blockquote");
        q.append(renderMarkdown(inner.join("\n")));
        out.append(q);
      } else {
        const p = node("p");
        for (let first = true; i < lines.length && lines[i].trim(); i++, first = false) {
          if (!first && startsBlock(lines[i])) break;
          if (!first) p.append(node("br"));
          inline(lines[i].trim(), p);
        }
        out.append(p);
      }
    }
    return out;
  }

  // While a reply streams, a last line that is only the start of a block marker ("2", "-",
  // "``") would show as text for a frame and then jump into a list or a code block: it waits
  // for the next token.
  const PARTIAL = /(^|\n)[ \t]*(\d{1,9}[.)]?|[-*+>#]{1,6}|`{1,2}|~{1,2})[ \t]*$/;

  function list(lines, i, out) {
    const ordered = NUMBERED.test(lines[i]);
    const pattern = ordered ? NUMBERED : BULLET;
    const el = node(ordered ? "ol" : "ul");
    const first = lines[i].match(NUMBERED);
    if (ordered && first[1] !== "1") el.start = parseInt(first[1], 10);
    let item = null;
    for (; i < lines.length; i++) {
      const line = lines[i];
      const m = line.match(pattern);
      if (m) {
        item = node("li");
        inline(m[ordered ? 2 : 1], item);
        el.append(item);
      } else if (line.trim() && /^\s+/.test(line) && !startsBlock(line.trim())) {
        item.append(node("br")); // an indented continuation line of the item
        inline(line.trim(), item);
      } else {
        break;
      }
    }
    out.append(el);
    return i;
  }

  // Code spans, bold, italics and links; anything else is text. Links only with an http(s)
  // address: `javascript:` and the rest stay visible as text.
  const INLINE = new RegExp([
    /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source,
    /\*\*(\S(?:[\s\S]*?\S)?)\*\*/.source,
    /(?<![\w])__(\S(?:[\s\S]*?\S)?)__(?![\w])/.source,
    /\*(\S(?:[\s\S]*?[^\s*])?)\*/.source,
    /(?<![\w])_([^\s_](?:[\s\S]*?[^\s_])?)_(?![\w])/.source,
    /\[([^\]\n]+)\]\(\s*([^)\s]+)\s*\)/.source,
  ].join("|"));

  function inline(text, parent) {
    while (text) {
      const m = INLINE.exec(text);
      if (!m) {
        parent.append(text);
        return;
      }
      if (m.index) parent.append(text.slice(0, m.index));
      if (m[1] !== undefined) {
        parent.append(node("code", m[2]));
      } else if (m[3] !== undefined || m[4] !== undefined) {
        const b = node("strong");
        inline(m[3] ?? m[4], b);
        parent.append(b);
      } else if (m[5] !== undefined || m[6] !== undefined) {
        const e = node("em");
        inline(m[5] ?? m[6], e);
        parent.append(e);
      } else {
        link(m[7], m[8], m[0], parent);
      }
      text = text.slice(m.index + m[0].length);
    }
  }

  function link(label, href, whole, parent) {
    let url = null;
    try {
      url = new URL(href);
    } catch (err) { /* not an absolute URL: shown as text */ }
    if (!url || (url.protocol !== "http:" && url.protocol !== "https:")) {
      parent.append(whole);
      return;
    }
    const a = node("a");
    a.href = url.href;
    a.rel = "noopener noreferrer nofollow";
    a.target = "_blank";
    inline(label, a);
    parent.append(a);
  }

  // --- the transcript ---------------------------------------------------------------------
  function messageView(msg) {
    const article = node("article");
    article.className = "msg " + msg.role;
    const role = node("p", msg.role === "user" ? "You" : msg.model || modelName || "Assistant");
    role.className = "role";
    const text = node("div");
    text.className = "text";
    article.append(role, text);
    const view = { article, text, stats: null, notes: null };
    if (msg.role === "assistant") {
      view.stats = node("p");
      view.stats.className = "stats";
      view.notes = node("p");
      view.notes.className = "notes";
      view.notes.hidden = true;
      article.append(view.stats, view.notes);
    }
    fill(view, msg);
    return view;
  }

  function fill(view, msg) {
    if (msg.role === "user") {
      view.text.textContent = msg.content;
      return;
    }
    const streaming = Boolean(busy && busy.reply === msg);
    const shown = streaming ? msg.content.replace(PARTIAL, "$1") : msg.content;
    view.text.replaceChildren(renderMarkdown(shown));
    view.article.setAttribute("aria-busy", streaming ? "true" : "false");
    view.stats.classList.toggle("error", Boolean(msg.error));
    if (msg.error) view.stats.textContent = msg.error;
    else if (msg.stopped) view.stats.textContent = "[stopped]";
    else view.stats.textContent = streaming ? "" : msg.stats || "";
    const notes = [...(msg.notes || [])];
    if (msg.finish === "length") notes.push("reply cut at max tokens; raise Max tokens to allow more");
    view.notes.textContent = notes.map((n) => `[${n}]`).join(" ");
    view.notes.hidden = notes.length === 0;
  }

  function pinnedToBottom() {
    const t = ui.transcript;
    return t.scrollHeight - t.scrollTop - t.clientHeight < 48;
  }

  function scrollToBottom() {
    ui.transcript.scrollTop = ui.transcript.scrollHeight;
  }

  function renderTranscript() {
    const conv = currentConv();
    const views = (conv ? conv.messages : []).map((m) => messageView(m).article);
    ui.transcript.replaceChildren(ui.empty, ...views);
    ui.empty.hidden = views.length > 0;
    scrollToBottom();
  }

  function renderList() {
    const convs = [...store.conversations].sort((a, b) => b.updated - a.updated);
    ui.list.replaceChildren(...convs.map((c) => {
      const li = node("li");
      const open = node("button", c.title);
      open.type = "button";
      open.className = "open";
      open.title = c.title;
      open.setAttribute("aria-current", c.id === store.current ? "true" : "false");
      open.addEventListener("click", () => select(c.id));
      const del = node("button", "Delete");
      del.type = "button";
      del.className = "delete";
      del.setAttribute("aria-label", `Delete conversation: ${c.title}`);
      del.addEventListener("click", () => remove(c.id));
      li.append(open, del);
      return li;
    }));
    ui.none.hidden = convs.length > 0;
  }

  function say(text) {
    ui.status.textContent = text;
  }

  // --- conversations ----------------------------------------------------------------------
  function select(id) {
    stop();
    store.current = id;
    save();
    renderList();
    renderTranscript();
    closeDrawer();
    ui.prompt.focus();
  }

  function remove(id) {
    if (busy && busy.conv.id === id) stop();
    store.conversations = store.conversations.filter((c) => c.id !== id);
    if (store.current === id) store.current = null;
    save();
    renderList();
    renderTranscript();
    say("Conversation deleted.");
    (ui.list.querySelector("button.open") || ui.newChat).focus();
  }

  function newChat() {
    stop();
    store.current = null;
    save();
    renderList();
    renderTranscript();
    closeDrawer();
    say("");
    ui.prompt.focus();
  }

  // --- the server -------------------------------------------------------------------------
  function api(path, options = {}) {
    const headers = { ...(options.headers || {}) };
    const key = apiKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    return fetch(path, { ...options, headers, credentials: "same-origin", cache: "no-store" });
  }

  async function errorText(res) {
    try {
      const body = await res.json();
      const e = body.error;
      return (typeof e === "string" ? e : e && e.message) || `HTTP ${res.status}`;
    } catch (err) {
      return `HTTP ${res.status}`;
    }
  }

  async function* events(res) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).replace(/\r$/, "");
        buf = buf.slice(nl + 1);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }

  async function connect() {
    let res;
    try {
      res = await api("v1/models");
    } catch (err) {
      ui.modelName.textContent = "server unreachable";
      say("The server did not answer; is `ondevice serve` still running?");
      return;
    }
    if (res.status === 401) {
      ui.modelName.textContent = "API key needed";
      askForKey(apiKey() ? "The saved key was refused." : "");
      return;
    }
    if (!res.ok) {
      say(await errorText(res));
      return;
    }
    const body = await res.json();
    modelName = (body.data && body.data[0] && body.data[0].id) || "";
    ui.modelName.textContent = modelName || "(unnamed)";
    waitUntilLoaded();
  }

  async function waitUntilLoaded() {
    for (;;) {
      let state = "unreachable";
      try {
        const res = await fetch("health", { cache: "no-store" });
        state = (await res.json()).status;
      } catch (err) { /* retried below */ }
      if (state === "ok") {
        if (ui.status.dataset.loading) say("");
        delete ui.status.dataset.loading;
        return;
      }
      if (state === "failed") {
        say("The model failed to load; see the server's log.");
        return;
      }
      ui.status.dataset.loading = "1";
      say("The model is loading…");
      await new Promise((r) => setTimeout(r, 2000));
    }
  }

  function askForKey(error) {
    ui.keyError.textContent = error || "";
    ui.keyInput.value = "";
    ui.remember.checked = Boolean(localStorage.getItem(KEY));
    if (!ui.dialog.open) ui.dialog.showModal();
    ui.keyInput.focus();
  }

  async function submitKey(event) {
    event.preventDefault();
    const key = ui.keyInput.value.trim();
    if (!key) return;
    ui.keyError.textContent = "Checking…";
    let res;
    try {
      res = await fetch("v1/models", { headers: { Authorization: `Bearer ${key}` },
                                      cache: "no-store" });
    } catch (err) {
      ui.keyError.textContent = "The server did not answer.";
      return;
    }
    if (res.status === 401) {
      ui.keyError.textContent = "That key was refused.";
      ui.keyInput.select();
      return;
    }
    setKey(key, ui.remember.checked);
    ui.dialog.close();
    say("Key accepted.");
    await connect();
    ui.prompt.focus();
  }

  // --- sending and stopping ---------------------------------------------------------------
  function requestBody(conv, reply) {
    const messages = [];
    const system = ui.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    for (const m of conv.messages) {
      if (m !== reply && m.content) messages.push({ role: m.role, content: m.content });
    }
    const body = { messages, stream: true, stream_options: { include_usage: true } };
    if (modelName) body.model = modelName;
    const t = parseFloat(ui.temperature.value);
    if (Number.isFinite(t) && t >= 0) body.temperature = t;
    const n = parseInt(ui.maxTokens.value, 10);
    if (Number.isFinite(n) && n >= 1) body.max_tokens = n;
    return body;
  }

  function startReply(text) {
    let conv = currentConv();
    if (!conv) {
      conv = { id: newId(), title: titleFrom(text), created: Date.now(), updated: Date.now(),
               messages: [] };
      store.conversations.push(conv);
      store.current = conv.id;
    }
    const user = { role: "user", content: text };
    const reply = { role: "assistant", content: "", model: modelName };
    conv.messages.push(user, reply);
    conv.updated = Date.now();
    save();
    renderList();
    ui.empty.hidden = true;
    ui.transcript.append(messageView(user).article);
    const view = messageView(reply);
    busy = { controller: new AbortController(), conv, user, reply, view, frame: 0 };
    fill(view, reply);
    ui.transcript.append(view.article);
    scrollToBottom();
    return busy;
  }

  // Tokens arrive faster than the screen refreshes: render at most once per frame.
  function scheduleRender(job) {
    if (job.frame) return;
    job.frame = requestAnimationFrame(() => {
      job.frame = 0;
      const pinned = pinnedToBottom();
      fill(job.view, job.reply);
      if (pinned) scrollToBottom();
    });
  }

  async function send() {
    const text = ui.prompt.value;
    if (busy || !text.trim()) return;
    ui.prompt.value = "";
    const job = startReply(text);
    setBusy(true);
    say("Generating…");
    try {
      const res = await api("v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(requestBody(job.conv, job.reply)),
        signal: job.controller.signal,
      });
      if (res.status === 401) return unauthorized(job, text);
      if (!res.ok) job.reply.error = await errorText(res);
      else await readStream(job, res);
      say(job.reply.error ? "The reply failed." : "");
    } catch (err) {
      if (err.name === "AbortError") {
        job.reply.stopped = true;
        say("Stopped.");
      } else {
        job.reply.error = `The server could not be reached (${err.message}).`;
        say("The reply failed.");
      }
    } finally {
      finishReply(job);
    }
  }

  async function readStream(job, res) {
    for await (const ev of events(res)) {
      if (ev.error) {
        job.reply.error = ev.error.message || "The server stopped the reply.";
        break;
      }
      const choice = ev.choices && ev.choices[0];
      if (choice && choice.delta && typeof choice.delta.content === "string") {
        job.reply.content += choice.delta.content;
        scheduleRender(job);
      }
      if (choice && choice.finish_reason) job.reply.finish = choice.finish_reason;
      if (ev.ondevice) {
        job.reply.stats = ev.ondevice.summary;
        job.reply.notes = ev.ondevice.notes || [];
      }
    }
  }

  function unauthorized(job, text) {
    // Take the turn back: it was never sent. The text returns to the composer.
    job.conv.messages = job.conv.messages.filter((m) => m !== job.user && m !== job.reply);
    if (!job.conv.messages.length) {
      store.conversations = store.conversations.filter((c) => c !== job.conv);
      store.current = null;
    }
    job.discarded = true;
    ui.prompt.value = text;
    say("The server needs its API key.");
    askForKey(apiKey() ? "The key was refused." : "");
  }

  function finishReply(job) {
    if (job.frame) cancelAnimationFrame(job.frame);
    busy = null;
    if (job.discarded) {
      renderList();
      renderTranscript();
    } else {
      job.conv.updated = Date.now();
      const pinned = pinnedToBottom();
      fill(job.view, job.reply);
      if (pinned) scrollToBottom();
    }
    save();
    setBusy(false);
  }

  function stop() {
    if (busy) busy.controller.abort(); // the server sees the disconnect and frees the slot
  }

  function setBusy(on) {
    ui.send.disabled = on;
    ui.stop.disabled = !on;
    ui.composer.setAttribute("aria-busy", on ? "true" : "false");
    if (!on && document.activeElement === ui.stop) ui.prompt.focus();
  }

  // --- the drawer (narrow screens) --------------------------------------------------------
  function openDrawer() {
    ui.sidebar.classList.add("open");
    ui.scrim.hidden = false;
    ui.toggle.setAttribute("aria-expanded", "true");
    (ui.sidebar.querySelector("#conversations button.open") || ui.closeDrawer).focus();
  }

  function closeDrawer() {
    if (!ui.sidebar.classList.contains("open")) return;
    ui.sidebar.classList.remove("open");
    ui.scrim.hidden = true;
    ui.toggle.setAttribute("aria-expanded", "false");
  }

  // --- wiring -----------------------------------------------------------------------------
  ui.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  ui.prompt.addEventListener("keydown", (e) => {
    // Enter sends; Shift+Enter is a new line; Enter that finishes an IME composition doesn't.
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      send();
    }
  });
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", newChat);
  ui.toggle.addEventListener("click", () =>
    ui.sidebar.classList.contains("open") ? closeDrawer() : openDrawer());
  ui.scrim.addEventListener("click", closeDrawer);
  ui.closeDrawer.addEventListener("click", () => {
    closeDrawer();
    ui.toggle.focus();
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && ui.sidebar.classList.contains("open")) {
      closeDrawer();
      ui.toggle.focus();
    }
  });
  for (const field of [ui.system, ui.temperature, ui.maxTokens]) {
    field.addEventListener("input", saveSettings);
  }
  ui.keyForm.addEventListener("submit", submitKey);
  ui.forgetKey.addEventListener("click", () => {
    setKey("", false);
    say("The API key was forgotten in this browser.");
    connect();
  });
  // Another tab changed the conversations: show them (unless a reply streams here).
  window.addEventListener("storage", (e) => {
    if (e.key === STORE && !busy) {
      store = loadStore();
      renderList();
      renderTranscript();
    }
  });

  loadSettings();
  ui.forgetKey.hidden = !apiKey();
  renderList();
  renderTranscript();
  connect();
})();
