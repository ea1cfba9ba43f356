// The virt-consoled web page: lists the consoles and opens one in an xterm.js
// terminal over a WebSocket. No framework; everything is served by the service.
"use strict";

(() => {
  const TOKEN_KEY = "virt-consoled-token";
  const REFRESH_MS = 3000;
  // In-band commands of the viewer protocol: Ctrl-] (0x1d), the word, a line end.
  const COMMANDS = { take: "\x1dtake\n", ro: "\x1dro\n", rw: "\x1drw\n" };
  const encoder = new TextEncoder();
  const $ = (id) => document.getElementById(id);

  let token = readToken();
  // The open console: { name, ws, term, fit }, or null.
  let current = null;
  // The list's items by console name, kept across refreshes so they stay put.
  const items = new Map();

  // The token comes in the URL fragment (never sent to the server) or from the
  // form; it is kept for this tab only.
  function readToken() {
    const fromUrl = new URLSearchParams(location.hash.slice(1)).get("token");
    if (fromUrl) {
      sessionStorage.setItem(TOKEN_KEY, fromUrl);
      // Keep the secret out of the address bar and the history.
      history.replaceState(null, "", location.pathname + location.search);
      return fromUrl;
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function askToken(why) {
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    $("token-form").hidden = false;
    $("token").focus();
    listStatus(why, true);
  }

  function listStatus(text, isError) {
    const el = $("list-status");
    el.textContent = text;
    el.classList.toggle("error", isError);
  }

  function setStatus(state, text) {
    const el = $("status");
    el.dataset.state = state;
    el.textContent = text;
  }

  async function refresh() {
    if (!token) {
      askToken("enter the service's token");
      return;
    }
    let response;
    try {
      response = await fetch("api/consoles", {
        headers: { Authorization: "Bearer " + token },
        cache: "no-store",
      });
    } catch (err) {
      listStatus("cannot reach the service", true);
      return;
    }
    if (response.status === 401) {
      askToken("the token was refused");
      return;
    }
    if (!response.ok) {
      listStatus(`listing failed: HTTP ${response.status}`, true);
      return;
    }
    try {
      render(await response.json());
    } catch (err) {
      listStatus("listing failed: bad answer", true);
    }
  }

  async function refreshLoop() {
    await refresh();
    setTimeout(refreshLoop, REFRESH_MS);
  }

  function render(consoles) {
    const list = $("consoles");
    const seen = new Set();
    consoles.forEach((c, i) => {
      seen.add(c.name);
      let li = items.get(c.name);
      if (!li) {
        li = newItem(c.name);
        items.set(c.name, li);
      }
      if (list.children[i] !== li) {
        list.insertBefore(li, list.children[i] || null);
      }
      li.dataset.state = c.state;
      li.dataset.viewers = c.viewers;
      li.querySelector(".state").textContent = c.state;
      li.querySelector(".viewers").textContent =
        c.viewers === 1 ? "1 viewer" : `${c.viewers} viewers`;
      li.classList.toggle("current", current !== null && current.name === c.name);
    });
    for (const [name, li] of items) {
      if (!seen.has(name)) {
        li.remove();
        items.delete(name);
      }
    }
    const n = consoles.length;
    listStatus(n === 0 ? "no consoles" : n === 1 ? "1 console" : `${n} consoles`, false);
  }

  function newItem(name) {
    const li = document.createElement("li");
    li.dataset.name = name;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "name";
    button.textContent = name;
    const state = document.createElement("span");
    state.className = "state";
    const viewers = document.createElement("span");
    viewers.className = "viewers";
    li.append(button, state, viewers);
    li.addEventListener("click", () => open(name));
    return li;
  }

  function setButtons(enabled) {
    for (const id of ["take", "ro", "rw", "disconnect"]) {
      $(id).disabled = !enabled;
    }
  }

  function send(session, bytes) {
    if (session.ws.readyState === WebSocket.OPEN) {
      session.ws.send(bytes);
    }
  }

  function closeReason(ev) {
    if (ev.reason) {
      return ev.reason;
    }
    switch (ev.code) {
      case 1000:
        return "closed by the service";
      case 1006:
        // A refused upgrade (bad token, unknown console) looks the same to a page.
        return "refused or lost";
      default:
        return `code ${ev.code}`;
    }
  }

  function leave(reason) {
    if (current === null) {
      return;
    }
    const session = current;
    current = null;
    session.ws.close(1000, reason);
    session.term.dispose();
    setButtons(false);
  }

  function open(name) {
    leave("switched console");
    const term = new Terminal({ cursorBlink: true, scrollback: 5000 });
    const fit = new FitAddon.FitAddon();
    term.loadAddon(fit);
    const box = $("terminal");
    box.replaceChildren();
    box.dataset.console = name;
    term.open(box);
    fit.fit();
    $("console-name").textContent = name;
    for (const [n, li] of items) {
      li.classList.toggle("current", n === name);
    }

    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}/ws/${encodeURIComponent(name)}`;
    let ws;
    try {
      ws = new WebSocket(url, ["virt-consoled", "token." + token]);
    } catch (err) {
      // The constructor refuses a token that is not a valid protocol name.
      term.dispose();
      setStatus("closed", `${name}: ${err.message}`);
      return;
    }
    ws.binaryType = "arraybuffer";
    const session = { name, ws, term, fit };
    current = session;
    setStatus("connecting", `${name}: connecting…`);

    ws.onopen = () => {
      if (current === session) {
        setStatus("open", `${name}: open`);
        setButtons(true);
      }
    };
    ws.onmessage = (ev) => {
      term.write(typeof ev.data === "string" ? ev.data : new Uint8Array(ev.data));
    };
    ws.onclose = (ev) => {
      if (current === session) {
        setButtons(false);
        setStatus("closed", `${name}: closed, ${closeReason(ev)}`);
        refresh();
      }
    };
    term.onData((data) => send(session, encoder.encode(data)));
    // Some mouse reports come as binary strings, one byte per char.
    term.onBinary((data) => send(session, Uint8Array.from(data, (c) => c.charCodeAt(0))));
    term.focus();
  }

  function command(name) {
    if (current !== null) {
      send(current, encoder.encode(COMMANDS[name]));
      current.term.focus();
    }
  }

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const given = $("token").value.trim();
    if (given) {
      token = given;
      sessionStorage.setItem(TOKEN_KEY, token);
      $("token").value = "";
      $("token-form").hidden = true;
      refresh();
    }
  });
  // A new #token=... pasted into this tab's address bar does not reload the page.
  window.addEventListener("hashchange", () => {
    const given = readToken();
    if (given) {
      token = given;
      $("token-form").hidden = true;
      refresh();
    }
  });
  for (const name of Object.keys(COMMANDS)) {
    $(name).addEventListener("click", () => command(name));
  }
  $("disconnect").addEventListener("click", () => {
    const name = current && current.name;
    leave("viewer left");
    if (name) {
      setStatus("closed", `${name}: closed, you left`);
    }
  });
  window.addEventListener("resize", () => {
    if (current !== null) {
      current.fit.fit();
    }
  });

  // For tests and the curious: the open terminal's text, wrapped rows joined.
  window.virtConsoled = {
    terminalText() {
      if (current === null) {
        return "";
      }
      const buffer = current.term.buffer.active;
      const lines = [];
      for (let i = 0; i < buffer.length; i++) {
        const line = buffer.getLine(i);
        const text = line.translateToString(false);
        if (line.isWrapped && lines.length > 0) {
          lines[lines.length - 1] += text;
        } else {
          lines.push(text);
        }
      }
      return lines.map((l) => l.trimEnd()).join("\n").trimEnd();
    },
  };

  refreshLoop();
})();
