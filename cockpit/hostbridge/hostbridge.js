/*
 * The host bridge's Cockpit page (docs/cockpit.md). Plain JavaScript on cockpit.js: no build step.
 *
 * It talks to the bridge's HTTP API (docs/api.md) with cockpit.http on the API's unix socket,
 * named by the manifest's config.api_socket (an operator overrides it in
 * /etc/cockpit/hostbridge.override.json), and follows the bridge's change stream
 * (GET /v1/events/stream) to update what it shows without a reload.
 *
 * Guest data is untrusted: a guest chooses its keys' names and values. Everything from the API
 * reaches the page through textContent and attribute properties only, never as markup (no
 * innerHTML, no insertAdjacentHTML, no document.write), and nothing here builds code from text.
 */
(function () {
    "use strict";

    const DEFAULTS = { api_socket: "/run/hostbridge/api.sock", superuser: "try" };
    const AUDIT_ROWS = 50;
    const RETRY_FIRST = 1000; // ms before the first reconnection of the stream, doubled up to
    const RETRY_MAX = 10000; // this while the bridge stays away
    const STREAM_SILENCE = 45000; // ms without a byte (keepalives come every 15 s): reconnect
    const REFRESH_DELAY = 250; // ms to gather a burst of events into one re-read

    const manifest = (cockpit.manifests && cockpit.manifests.hostbridge) || {};
    const config = Object.assign({}, DEFAULTS, manifest.config || {});
    const httpOptions = config.superuser ? { superuser: config.superuser } : {};
    const api = cockpit.http(String(config.api_socket), httpOptions);

    const state = {
        vms: new Map(), // name -> VmInfo, as GET /v1/vms gives it (updated by events)
        selected: null, // the VM whose details are shown
        keys: new Map(), // its keys: key -> {value, hidden, ts, origin}
        keysStale: false,
        keysLastSeen: null,
        audit: [],
        lastEvent: null, // id of the last event read: where a new stream resumes
    };

    // What cockpit-bridge's problem codes mean for the API socket (docs/cockpit.md, "The API socket").
    const PROBLEMS = {
        "not-found": "nothing listens on the socket (is hostbridge running? is api_socket right?)",
        "access-denied": "permission denied on the socket (join its group, hostbridge, or turn on administrative access)",
    };

    /* ---- DOM helpers: text only ---- */

    function $(id) {
        return document.getElementById(id);
    }

    // An element with ``text`` as its text content and ``cls`` as its class.
    function el(tag, text, cls) {
        const node = document.createElement(tag);
        if (text !== undefined && text !== null) node.textContent = String(text);
        if (cls) node.className = cls;
        return node;
    }

    function clear(node) {
        while (node.firstChild) node.removeChild(node.firstChild);
    }

    function showError(text) {
        const node = $("error");
        node.textContent = text || "";
        node.hidden = !text;
    }

    function setConnection(stateName, text) {
        const node = $("connection");
        node.dataset.state = stateName;
        node.textContent = text;
    }

    function formatTime(ts) {
        if (ts === null || ts === undefined) return "never";
        const d = new Date(ts * 1000);
        const pad = (n) => String(n).padStart(2, "0");
        return (
            d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
            pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds())
        );
    }

    function formatAgo(ts) {
        if (ts === null || ts === undefined) return "never";
        const s = Math.max(0, Math.round(Date.now() / 1000 - ts));
        if (s < 60) return s + " s ago";
        if (s < 3600) return Math.floor(s / 60) + " min ago";
        if (s < 86400) return Math.floor(s / 3600) + " h ago";
        return formatTime(ts);
    }

    // The one-line message of a failed API call: the bridge's JSON error, else cockpit's words.
    function failure(ex, body) {
        if (body) {
            try {
                const doc = JSON.parse(body);
                if (doc && doc.error && doc.error.message) return String(doc.error.message);
            } catch (e) {
                // not JSON: fall through
            }
        }
        if (ex && ex.status) return ex.status + " " + (ex.message || ex.reason || "");
        if (ex && PROBLEMS[ex.problem]) return PROBLEMS[ex.problem];
        return cockpit.message(ex);
    }

    function vmPath(vm) {
        return "/v1/vms/" + encodeURIComponent(vm);
    }

    function getJson(path) {
        return new Promise(function (resolve, reject) {
            api.get(path).then(
                function (body) {
                    try {
                        resolve(JSON.parse(body));
                    } catch (e) {
                        reject(new Error("the bridge answered something that is not JSON"));
                    }
                },
                function (ex, body) {
                    reject(new Error(failure(ex, body)));
                }
            );
        });
    }

    // A request with a JSON answer, success or error alike: {ok, status, doc, message}.
    function call(method, path, payload) {
        return new Promise(function (resolve) {
            const opts = { method: method, path: path, body: "" };
            if (payload !== undefined) {
                opts.body = JSON.stringify(payload);
                opts.headers = { "Content-Type": "application/json" };
            }
            api.request(opts).then(
                function (body) {
                    let doc = null;
                    try {
                        doc = JSON.parse(body);
                    } catch (e) {
                        doc = null;
                    }
                    resolve({ ok: true, doc: doc });
                },
                function (ex, body) {
                    resolve({ ok: false, message: failure(ex, body) });
                }
            );
        });
    }

    /* ---- the VM list ---- */

    // In a pool of hosts (docs/pool.md) the list holds the whole pool's VMs, each with the host
    // that runs it (null: none does); on a single host every VM's host is null.
    function inPool() {
        return Array.from(state.vms.values()).some(function (vm) {
            return typeof vm.host === "string";
        });
    }

    // A VM's host as a cell's text and class: muted when no host runs it.
    function hostText(vm) {
        return typeof vm.host === "string" ? [vm.host, "host"] : ["none", "host hb-hidden"];
    }

    function renderVms() {
        const tbody = $("vms").tBodies[0];
        clear(tbody);
        const names = Array.from(state.vms.keys()).sort();
        const pooled = inPool();
        $("no-vms").hidden = names.length > 0;
        $("vms-host").hidden = !pooled;
        names.forEach(function (name) {
            const vm = state.vms.get(name);
            const tr = document.createElement("tr");
            tr.dataset.vm = name;
            if (name === state.selected) tr.className = "hb-selected";
            const nameCell = el("td", null, "name");
            const link = el("a", name);
            link.href = "#/" + encodeURIComponent(name);
            link.addEventListener("click", function (ev) {
                ev.preventDefault();
                cockpit.location.go([name]);
            });
            nameCell.appendChild(link);
            tr.appendChild(nameCell);
            if (pooled) {
                const host = hostText(vm);
                tr.appendChild(el("td", host[0], host[1]));
            }
            const run = el("td", vm.run_state || "unknown", "run-state");
            run.dataset.state = vm.run_state || "unknown";
            tr.appendChild(run);
            const agent = el("td", vm.agent, "agent");
            agent.dataset.state = vm.agent;
            if (vm.agent_version) agent.title = vm.agent_version;
            tr.appendChild(agent);
            const seen = el("td", formatAgo(vm.last_seen), "last-seen");
            if (vm.last_seen) seen.title = formatTime(vm.last_seen);
            tr.appendChild(seen);
            tr.appendChild(el("td", vm.queued, "queued"));
            tbody.appendChild(tr);
        });
    }

    function loadVms() {
        return getJson("/v1/vms").then(function (doc) {
            state.vms = new Map();
            (doc.vms || []).forEach(function (vm) {
                state.vms.set(vm.name, vm);
            });
            renderVms();
            renderSummary();
            const selected = state.vms.get(state.selected);
            if (selected) renderFacts(selected.facts);
        });
    }

    function loadVm(name) {
        return getJson(vmPath(name)).then(
            function (vm) {
                state.vms.set(vm.name, vm);
                renderVms();
                if (name === state.selected) {
                    renderSummary();
                    renderFacts(vm.facts);
                }
            },
            function (err) {
                showError(name + ": " + err.message);
            }
        );
    }

    /* ---- the selected VM ---- */

    function summaryRow(dl, label, text, cls) {
        dl.appendChild(el("dt", label));
        dl.appendChild(el("dd", text, cls));
    }

    function renderSummary() {
        const vm = state.vms.get(state.selected);
        const dl = $("summary");
        clear(dl);
        if (!vm) return;
        if (inPool()) {
            const host = hostText(vm);
            summaryRow(dl, "Host", host[0], host[1]);
        }
        summaryRow(dl, "Run state", vm.run_state || "unknown", "run-state");
        summaryRow(dl, "Agent", vm.agent + (vm.agent_version ? " (" + vm.agent_version + ")" : ""), "agent");
        summaryRow(dl, "Channel", vm.channel, "channel");
        summaryRow(dl, "Last seen", formatTime(vm.last_seen), "last-seen");
        summaryRow(dl, "Connected since", formatTime(vm.connected_since), "connected-since");
        summaryRow(dl, "Queued messages", vm.queued, "queued");
    }

    // The guest's facts (GET /v1/vms/{vm} "facts", docs/api.md): {} when it published none.
    const FACTS = [
        ["hostname", "Host name"],
        ["os_name", "OS"],
        ["os_version", "OS version"],
        ["agent_version", "Agent"],
    ];

    function renderFacts(facts) {
        const block = $("facts-block");
        const dl = $("facts");
        const ifTable = $("interfaces");
        const tbody = ifTable.tBodies[0];
        clear(dl);
        clear(tbody);
        facts = facts && typeof facts === "object" ? facts : {};
        FACTS.forEach(function (pair) {
            const value = facts[pair[0]];
            if (typeof value === "string") summaryRow(dl, pair[1], value, "fact-" + pair[0]);
        });
        const interfaces = facts.interfaces && typeof facts.interfaces === "object" ? facts.interfaces : {};
        const names = Object.keys(interfaces).sort();
        names.forEach(function (name) {
            const addresses = interfaces[name];
            const tr = document.createElement("tr");
            tr.dataset.interface = name;
            tr.appendChild(el("td", name, "interface"));
            tr.appendChild(el("td", Array.isArray(addresses) ? addresses.join(" ") : "", "addresses"));
            tbody.appendChild(tr);
        });
        ifTable.hidden = names.length === 0;
        if (typeof facts.updated === "number") summaryRow(dl, "Reported", formatTime(facts.updated), "fact-updated");
        block.hidden = dl.childNodes.length === 0 && names.length === 0;
    }

    function renderKeys() {
        const tbody = $("keys").tBodies[0];
        clear(tbody);
        const note = $("keys-note");
        if (state.keysStale) {
            note.textContent =
                "The agent is not connected: these are the bridge's copy of its keys as of " +
                formatTime(state.keysLastSeen) + ".";
            note.hidden = false;
        } else {
            note.hidden = true;
        }
        const names = Array.from(state.keys.keys()).sort();
        $("no-keys").hidden = names.length > 0;
        names.forEach(function (key) {
            const entry = state.keys.get(key);
            const tr = document.createElement("tr");
            tr.dataset.key = key;
            tr.appendChild(el("td", key, "key"));
            if (entry.hidden) {
                tr.appendChild(el("td", "(sent with logging off: not shown)", "value hb-hidden"));
            } else {
                tr.appendChild(el("td", entry.value, "value"));
            }
            tr.appendChild(el("td", formatTime(entry.ts), "set-time"));
            tr.appendChild(el("td", entry.origin, "origin"));
            const actions = el("td", null, "actions");
            actions.appendChild(deleteButton(key));
            tr.appendChild(actions);
            tbody.appendChild(tr);
        });
    }

    // Delete asks once more on the button itself (no dialog): a second click within 5 s deletes.
    function deleteButton(key) {
        const button = el("button", "Delete", "delete");
        button.type = "button";
        let armed = null;
        button.addEventListener("click", function () {
            if (!armed) {
                button.textContent = "Really delete?";
                button.classList.add("hb-armed");
                armed = window.setTimeout(function () {
                    armed = null;
                    button.textContent = "Delete";
                    button.classList.remove("hb-armed");
                }, 5000);
                return;
            }
            window.clearTimeout(armed);
            armed = null;
            button.disabled = true;
            const vm = state.selected;
            call("DELETE", vmPath(vm) + "/keys/" + encodeURIComponent(key)).then(function (r) {
                if (!r.ok) {
                    showError("Deleting " + key + ": " + r.message);
                    button.disabled = false;
                    button.textContent = "Delete";
                    button.classList.remove("hb-armed");
                    return;
                }
                showError("");
                if (r.doc && r.doc.outcome === "delivered" && vm === state.selected) {
                    state.keys.delete(key);
                    renderKeys();
                } else {
                    button.textContent = "Queued";
                }
            });
        });
        return button;
    }

    // The key events that arrive while a listing is under way are kept and applied again to its
    // answer: the listing may predate them, and replaying changes made after the request began,
    // in order, leaves the table as the last of them did.
    const keyReads = { pending: 0, replay: [] };

    function loadKeys(name) {
        keyReads.pending += 1;
        function done() {
            keyReads.pending -= 1;
            const replay = keyReads.replay;
            if (keyReads.pending === 0) keyReads.replay = [];
            return replay;
        }
        return getJson(vmPath(name) + "/keys").then(
            function (doc) {
                const replay = done();
                if (name !== state.selected) return;
                state.keys = new Map();
                (doc.entries || []).forEach(function (e) {
                    state.keys.set(e.key, { value: e.value, hidden: false, ts: e.ts, origin: e.origin });
                });
                replay.forEach(function (ev) {
                    if (ev.vm === name) applyKeyEvent(ev);
                });
                state.keysStale = !!doc.stale;
                state.keysLastSeen = doc.last_seen;
                renderKeys();
            },
            function (err) {
                done();
                if (name === state.selected) showError("Keys of " + name + ": " + err.message);
            }
        );
    }

    // A key event of the selected VM, on the keys table's contents (not rendered here).
    function applyKeyEvent(ev) {
        if (ev.type === "key.set") {
            state.keys.set(ev.key, {
                value: ev.hidden ? null : ev.value,
                hidden: !!ev.hidden,
                ts: ev.set_time,
                origin: ev.origin,
            });
        } else if (ev.type === "key.deleted") {
            state.keys.delete(ev.key);
        } else if (ev.type === "keys.cleared") {
            state.keys = new Map();
        }
    }

    function renderAudit() {
        const tbody = $("audit").tBodies[0];
        clear(tbody);
        $("no-audit").hidden = state.audit.length > 0;
        state.audit.forEach(function (row) {
            const tr = document.createElement("tr");
            tr.dataset.id = String(row.id);
            tr.appendChild(el("td", formatTime(row.ts), "time"));
            tr.appendChild(el("td", row.key, "key"));
            tr.appendChild(el("td", row.size, "size"));
            tr.appendChild(el("td", row.outcome, "outcome"));
            if (row.value === null || row.value === undefined) {
                tr.appendChild(el("td", "(not logged)", "value hb-hidden"));
            } else {
                tr.appendChild(el("td", row.value, "value"));
            }
            tbody.appendChild(tr);
        });
    }

    function loadAudit(name) {
        return getJson(vmPath(name) + "/audit?limit=" + AUDIT_ROWS).then(
            function (doc) {
                if (name !== state.selected) return;
                state.audit = doc.entries || [];
                renderAudit();
            },
            function (err) {
                if (name === state.selected) showError("Audit of " + name + ": " + err.message);
            }
        );
    }

    function loadSelected() {
        const name = state.selected;
        if (!name) return Promise.resolve();
        return Promise.all([loadVm(name), loadKeys(name), loadAudit(name)]);
    }

    function select(name) {
        if (name === state.selected) return;
        state.selected = name || null;
        state.keys = new Map();
        state.keysStale = false;
        state.audit = [];
        $("detail").hidden = !state.selected;
        $("detail-title").textContent = state.selected || "";
        $("send-result").textContent = "";
        renderVms();
        renderSummary();
        renderFacts(null);
        renderKeys();
        renderAudit();
        loadSelected();
    }

    function onLocation() {
        const path = cockpit.location.path;
        select(path.length > 0 ? path[0] : null);
    }

    /* ---- sending ---- */

    function onSend(ev) {
        ev.preventDefault();
        const vm = state.selected;
        const key = $("send-key").value;
        const value = $("send-value").value;
        const log = !$("send-nolog").checked;
        const result = $("send-result");
        const button = $("send-button");
        if (!vm || !key) return;
        button.disabled = true;
        result.dataset.outcome = "sending";
        result.textContent = "Sending…";
        call("POST", vmPath(vm) + "/messages", { key: key, value: value, log: log }).then(function (r) {
            button.disabled = false;
            if (!r.ok) {
                result.dataset.outcome = "error";
                result.textContent = r.message;
                return;
            }
            const doc = r.doc || {};
            result.dataset.outcome = doc.outcome || "";
            if (doc.outcome === "delivered") {
                result.textContent = "Delivered (message " + doc.seq + ").";
            } else {
                result.textContent =
                    "Queued (message " + doc.seq + "): it is delivered when the agent connects.";
            }
            if (!log) $("send-value").value = "";
            loadAudit(vm);
            loadVm(vm);
        });
    }

    /* ---- the change stream ---- */

    const pending = { vms: new Set(), list: false, keys: false, audit: false, timer: null };

    // Re-read what a burst of events touched, once, a moment later.
    function schedule(what, vm) {
        if (what === "vm") pending.vms.add(vm);
        else pending[what] = true;
        if (pending.timer) return;
        pending.timer = window.setTimeout(function () {
            const vms = pending.vms;
            const list = pending.list;
            const keys = pending.keys;
            const audit = pending.audit;
            pending.vms = new Set();
            pending.list = pending.keys = pending.audit = false;
            pending.timer = null;
            if (list) loadVms();
            else vms.forEach(loadVm);
            if (state.selected && keys) loadKeys(state.selected);
            if (state.selected && audit) loadAudit(state.selected);
        }, REFRESH_DELAY);
    }

    function applyEvent(ev) {
        const vm = ev.vm;
        const known = vm !== null && vm !== undefined ? state.vms.get(vm) : null;
        const selected = vm !== null && vm !== undefined && vm === state.selected;
        switch (ev.type) {
        case "overflow":
            // Events were missed: everything shown may be out of date.
            schedule("list");
            schedule("keys");
            schedule("audit");
            return;
        case "vm.added":
            schedule("list");
            return;
        case "vm.state":
            if (known) known.run_state = ev.run_state;
            break;
        case "vm.placed":
            // In a pool: another host delivers this VM's messages now (a migration, a claim).
            if (known) known.host = ev.host;
            break;
        case "agent.state":
            if (known) {
                known.agent = ev.agent;
                known.agent_version = ev.agent_version;
            }
            // The keys listing comes from the agent, or from the bridge's copy while it is away.
            if (selected) schedule("keys");
            break;
        case "key.set":
        case "key.deleted":
        case "keys.cleared":
            if (selected) {
                if (keyReads.pending > 0) keyReads.replay.push(ev);
                applyKeyEvent(ev);
                renderKeys();
            }
            break;
        case "keys.refreshed":
            if (selected) schedule("keys");
            break;
        default:
            if (selected && ev.type.indexOf("message.") === 0) schedule("audit");
            break;
        }
        if (known) {
            renderVms();
            if (selected) renderSummary();
            schedule("vm", vm); // queue length, last seen: re-read
        } else if (vm !== null && vm !== undefined) {
            schedule("list"); // a VM this page does not know yet
        }
    }

    // One Server-Sent Events block: "id:", "event:", "data:" lines (comments start with ":").
    function handleBlock(block) {
        let data = "";
        let id = null;
        block.split("\n").forEach(function (line) {
            line = line.replace(/\r$/, "");
            if (line === "" || line[0] === ":") return;
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            let value = colon < 0 ? "" : line.slice(colon + 1);
            if (value[0] === " ") value = value.slice(1);
            if (field === "data") data += (data ? "\n" : "") + value;
            else if (field === "id") id = value;
        });
        if (!data) return;
        let ev;
        try {
            ev = JSON.parse(data);
        } catch (e) {
            return;
        }
        if (id !== null && /^[0-9]+$/.test(id)) state.lastEvent = id;
        if (ev && typeof ev.type === "string") applyEvent(ev);
    }

    const stream = { request: null, retry: RETRY_FIRST, watchdog: null, generation: 0 };

    function resetWatchdog(generation) {
        window.clearTimeout(stream.watchdog);
        stream.watchdog = window.setTimeout(function () {
            if (generation === stream.generation && stream.request) stream.request.close();
        }, STREAM_SILENCE);
    }

    // Follow the stream from the last event read (or from now, then read everything); every
    // (re)connection re-reads what is shown, since events may have been missed while away.
    function openStream() {
        const generation = ++stream.generation;
        const path = "/v1/events/stream" + (state.lastEvent !== null ? "?since=" + state.lastEvent : "");
        let buffer = "";
        const req = api.get(path);
        stream.request = req;
        req.response(function (status) {
            if (generation !== stream.generation || status < 200 || status > 299) return;
            stream.retry = RETRY_FIRST;
            setConnection("connected", "Live: following the host bridge's changes.");
            showError("");
            resetWatchdog(generation);
            loadVms().then(loadSelected, function (err) {
                showError(err.message);
            });
        });
        req.stream(function (chunk) {
            if (generation !== stream.generation) return;
            resetWatchdog(generation);
            buffer += chunk;
            let end;
            while ((end = buffer.indexOf("\n\n")) >= 0) {
                const block = buffer.slice(0, end);
                buffer = buffer.slice(end + 2);
                handleBlock(block);
            }
        });
        req.then(
            function () {
                reconnect(generation, "the host bridge ended the stream");
            },
            function (ex, body) {
                reconnect(generation, failure(ex, body));
            }
        );
    }

    function reconnect(generation, why) {
        if (generation !== stream.generation) return;
        window.clearTimeout(stream.watchdog);
        stream.request = null;
        setConnection(
            "disconnected",
            "Not connected to the host bridge (" + config.api_socket + "): " + why + ". Retrying…"
        );
        window.setTimeout(openStream, stream.retry);
        stream.retry = Math.min(stream.retry * 2, RETRY_MAX);
    }

    // Learn where the stream stands now, then follow it from there: nothing between the first
    // read of the lists and the stream's start is missed.
    function start() {
        getJson("/v1/events?timeout=0").then(
            function (doc) {
                if (typeof doc.last === "number" || /^[0-9]+$/.test(String(doc.last))) {
                    state.lastEvent = String(doc.last);
                }
                openStream();
            },
            function () {
                openStream(); // the stream's own failure says what is wrong, and retries
            }
        );
    }

    function init() {
        $("send").addEventListener("submit", onSend);
        cockpit.addEventListener("locationchanged", onLocation);
        // "Last seen" is relative: keep it current.
        window.setInterval(function () {
            document.querySelectorAll("#vms td.last-seen").forEach(function (cell) {
                const name = cell.parentNode.dataset.vm;
                const vm = state.vms.get(name);
                if (vm) cell.textContent = formatAgo(vm.last_seen);
            });
        }, 5000);
        onLocation();
        start();
    }

    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
    else init();
})();
