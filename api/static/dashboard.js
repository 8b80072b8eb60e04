// StyleInject dashboard: a little plain JS over the JSON API (no build step, no CDN).
// The pages authenticate with the dashboard cookie, so fetch() and EventSource need no header.
"use strict";

const SI = (() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const el = (tag, attrs = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c);
    return node;
  };
  const fmt = (v, digits = 4) => (v === null || v === undefined ? "–" : Number(v).toPrecision(digits));
  const svgEl = (tag, attrs) => {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    return node;
  };

  async function api(method, url, body) {
    const init = { method, headers: {} };
    if (body !== undefined) {
      init.headers["content-type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(url, init);
    let data = null;
    try { data = await response.json(); } catch (e) { /* not JSON */ }
    if (!response.ok) {
      const message = (data && data.message) || `${response.status} ${response.statusText}`;
      throw new Error(message);
    }
    return data;
  }

  // -- a small SVG line chart (linear axes, "nice" ticks) -------------------------------------------
  function niceTicks(lo, hi, count = 5) {
    if (!(hi > lo)) { const d = Math.abs(lo) * 0.1 || 1; lo -= d; hi += d; }
    const raw = (hi - lo) / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw);
    const first = Math.floor(lo / step + 1e-9) * step, last = Math.ceil(hi / step - 1e-9) * step, ticks = [];
    for (let i = 0; first + i * step <= last + step * 1e-9; i++) ticks.push(+(first + i * step).toPrecision(12));
    return { lo: first, hi: last, ticks };
  }

  // Exponential moving average, bias-corrected (like TensorBoard's smoothing): a readable trend
  // over the noisy per-step diffusion loss.
  function smooth(points, weight = 0.8) {
    let avg = 0, n = 0;
    return points.map(([x, y]) => { n++; avg = weight * avg + (1 - weight) * y; return [x, avg / (1 - Math.pow(weight, n))]; });
  }

  // One line (optionally smoothed) plus `extra` lines [{name, points, color}] on the same axes,
  // with a legend when there are several.
  function lineChart(container, points, { color = "#2a6fdb", empty = "no data yet", digits = 3, smoothed = false, xmax = 0,
                                         label = "value by step", name = null, extra = [] } = {}) {
    container.replaceChildren();
    container.dataset.points = points.length;
    const W = 560, H = 220, L = 58, R = 12, T = 10, B = 28;
    const last = points[points.length - 1];
    const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", preserveAspectRatio: "xMidYMid meet",
                               "aria-label": last ? `${label}: ${points.length} points, last ${last[1]} at step ${last[0]}` : `${label}: ${empty}` });
    container.append(svg);
    if (!points.length) {
      const t = svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" });
      t.textContent = empty;
      svg.append(t);
      return;
    }
    const all = points.concat(...extra.map(s => s.points));
    const xs = all.map(p => p[0]), ys = all.map(p => p[1]);
    const xa = niceTicks(Math.min(0, ...xs), Math.max(...xs, xmax, 1), 6), ya = niceTicks(Math.min(...ys), Math.max(...ys), 4);
    const X = x => L + (x - xa.lo) / (xa.hi - xa.lo) * (W - L - R);
    const Y = y => T + (1 - (y - ya.lo) / (ya.hi - ya.lo)) * (H - T - B);
    const tiny = Math.max(...ya.ticks.map(Math.abs)) < 1e-2;  // e.g. learning rates: one format per axis
    for (const t of ya.ticks) {
      svg.append(svgEl("line", { x1: L, x2: W - R, y1: Y(t), y2: Y(t), class: "grid" }));
      const label = svgEl("text", { x: L - 6, y: Y(t) + 4, "text-anchor": "end", class: "tick" });
      label.textContent = tiny ? (t === 0 ? "0" : t.toExponential(2)) : +t.toPrecision(digits);
      svg.append(label);
    }
    for (const t of xa.ticks) {
      svg.append(svgEl("line", { x1: X(t), x2: X(t), y1: H - B, y2: H - B + 4, class: "axis" }));
      const label = svgEl("text", { x: X(t), y: H - B + 17, "text-anchor": "middle", class: "tick" });
      label.textContent = t;
      svg.append(label);
    }
    svg.append(svgEl("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
    svg.append(svgEl("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
    const path = pts => pts.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
    if (smoothed && points.length > 2) {
      svg.append(svgEl("path", { d: path(points), fill: "none", stroke: color, "stroke-width": 1, opacity: 0.3, class: "raw" }));
      svg.append(svgEl("path", { d: path(smooth(points)), fill: "none", stroke: color, "stroke-width": 2, class: "series" }));
    } else {
      svg.append(svgEl("path", { d: path(points), fill: "none", stroke: color, "stroke-width": 2, class: "series" }));
    }
    for (const s of extra) {
      if (s.points.length) svg.append(svgEl("path", { d: path(s.points), fill: "none", stroke: s.color, "stroke-width": 1.5, class: "series" }));
    }
    svg.append(svgEl("circle", { cx: X(last[0]), cy: Y(last[1]), r: 3.5, fill: color }));
    if (extra.length) {
      const legend = el("div", { class: "legend" });
      for (const s of [{ name: name || label, color, points }, ...extra]) {
        const at = s.points[s.points.length - 1];
        legend.append(el("span", {}, el("i", { style: `background: ${s.color}` }), ` ${s.name}${at ? ` ${fmt(at[1], 3)}` : ""}`));
      }
      container.append(legend);
    }
    const title = svgEl("title", {});
    title.textContent = `step ${last[0]}: ${last[1]}`;
    svg.append(title);
  }

  // -- overview: while a job is active, poll GET /jobs and update its row in place -------------------
  function overviewPage(active) {
    if (!active) return;
    const tick = async () => {
      let jobs;
      try { jobs = await api("GET", "/jobs?limit=50"); } catch (err) { return setTimeout(tick, 10000); }
      for (const job of jobs) {
        const row = document.querySelector(`tr[data-job="${job.id}"]`);
        if (!row) { location.reload(); return; }  // a job started elsewhere: render the new table
        const p = job.progress;
        $(".c-status", row).replaceChildren(el("span", { class: `status ${job.status}`, text: job.status }));
        if (p && p.total) {
          const eta = p.eta_s != null && job.status === "running" ? ` · ETA ${Math.round(p.eta_s)} s` : "";
          const bar = el("span", { class: "bar" }, el("span", { style: `width: ${Math.round(100 * p.step / p.total)}%` }));
          $(".c-progress", row).replaceChildren(bar, ` ${p.step}/${p.total}${eta}`);
        }
        if (p && p.loss != null) $(".c-loss", row).textContent = Number(p.loss).toFixed(4);
        if (job.adapter_id) {
          $(".c-adapter", row).replaceChildren(el("a", { href: `/dashboard/playground?adapter=${job.adapter_id}` },
            el("code", { title: job.adapter_id, text: job.adapter_id.slice(0, 8) })));
        }
        if (job.error) $(".c-error", row).replaceChildren(el("span", { class: "clip", title: job.error, text: job.error }));
      }
      if (jobs.some(j => ["queued", "running"].includes(j.status))) setTimeout(tick, 3000);
    };
    setTimeout(tick, 3000);
  }

  // -- checkpoints: a card per checkpoint (sample grid, scores, best badge, promote) and one score
  // chart per metric. Scores come from the job's score events (history, kept for pruned checkpoints
  // too) and from each checkpoint of the live job snapshots; update() returns lines for the log.
  function checkpointView(jobId, container, charts, events) {
    const metric = container.dataset.metric;
    const cards = new Map(), scores = {};  // scores: metric -> Map(step -> value)
    const palette = ["#2f9e44", "#9c36b5", "#0b7285", "#c2671b"];
    const addScore = (name, step, value) => {
      if (value === null || value === undefined || step === null || step === undefined) return false;
      const series = (scores[name] ||= new Map()), had = series.get(step) === value;
      series.set(step, value);
      return !had;
    };
    for (const e of events) if (e.kind === "score" && e.data) addScore(e.data.metric, e.data.step, e.data.value);

    const promoted = (node, adapterId, name) => node.replaceChildren("adapter ",
      el("a", { href: `/dashboard/playground?adapter=${adapterId}`, title: adapterId },
        el("code", { text: name || adapterId.slice(0, 8) })));

    const card = c => {
      const grid = c.samples_url
        ? el("a", { href: c.samples_url, target: "_blank", class: "grid-link" },
            el("img", { src: c.samples_url, alt: `validation samples at step ${c.step}`, class: "grid" }))
        : el("div", { class: "no-grid muted", text: "no sample grid" });
      const info = el("figcaption", {},
        el("div", { class: "ckpt-head" }, el("strong", { text: `step ${c.step}` }), el("span", { class: "badge", text: "best" })),
        el("dl", { class: "scores" }), el("div", { class: "promote" }));
      if (c.samples && c.samples.prompts) {
        const list = el("ol", {}, ...c.samples.prompts.map(p => el("li", { text: p || "(empty prompt)" })));
        info.append(el("details", {}, el("summary", { text: `rows: ${c.samples.prompts.length} prompts · columns: seeds ${c.samples.seeds.join(", ")}` }), list));
      }
      const node = el("figure", { class: "ckpt", "data-step": c.step, "data-id": c.id }, grid, info);
      const button = el("button", { type: "button", class: "promote-button", text: "Promote to adapter" });
      button.addEventListener("click", async () => {
        button.disabled = true;
        try {
          const adapter = await api("POST", `/jobs/${jobId}/checkpoints/${c.step}/promote`, {});
          promoted($(".promote", node), adapter.id, adapter.name);
        } catch (err) {
          $(".promote", node).append(el("div", { class: "error", text: err.message }));
          button.disabled = false;
        }
      });
      $(".promote", node).append(button);
      return node;
    };

    const drawCharts = total => {
      const names = Object.keys(scores).sort((a, b) => (b === metric) - (a === metric) || a.localeCompare(b));
      names.forEach((name, i) => {
        let figure = charts.querySelector(`figure[data-metric="${name}"]`);
        if (!figure) {
          figure = el("figure", { class: "score-figure", "data-metric": name },
            el("figcaption", { text: `Checkpoint score: ${name}${name === metric ? " (picks the best)" : ""}` }),
            el("div", { class: "chart" }));
          charts.append(figure);
        }
        const points = [...scores[name].entries()].sort((a, b) => a[0] - b[0]);
        lineChart($(".chart", figure), points, { color: palette[i % palette.length], xmax: total, label: `${name} by checkpoint step` });
      });
    };

    function update(list, total, live) {  // live: the job still runs, so scores may come
      const lines = [];
      const empty = $(".empty", container);
      if (empty && list.length) empty.remove();
      const keep = new Set(list.map(c => c.id));
      for (const [id, node] of cards) if (!keep.has(id)) { node.remove(); cards.delete(id); }  // pruned
      for (const c of [...list].sort((a, b) => a.step - b.step)) {
        let node = cards.get(c.id);
        if (!node) {
          node = card(c);
          cards.set(c.id, node);
          const after = [...cards.values()].find(n => n !== node && +n.dataset.step > c.step);
          container.insertBefore(node, after || null);
          lines.push(`checkpoint at step ${c.step}`);
        }
        node.classList.toggle("best", !!c.best);
        const dl = $("dl.scores", node), entries = Object.entries(c.scores || {}).sort();
        dl.replaceChildren(...entries.flatMap(([k, v]) => [el("dt", { class: k === metric ? "chosen" : "", text: k }), el("dd", { text: fmt(v, 4) })]));
        if (!entries.length) dl.append(el("dt", { class: "muted", text: live && c.samples_url ? "scoring…" : "not scored" }));
        for (const [k, v] of entries) if (addScore(k, c.step, v)) lines.push(`score ${k} = ${fmt(v, 4)} at step ${c.step}`);
        if (c.promoted_adapter_id && !$(".promote a", node)) promoted($(".promote", node), c.promoted_adapter_id, c.promoted_adapter_name);
      }
      drawCharts(total);
      return lines;
    }
    return { update };
  }

  // -- job page ------------------------------------------------------------------------------------
  // -- webhook deliveries: one row per event sent (retries update the row); refreshed while the job
  // runs or any delivery is still being retried, and when the job's status changes.
  const DELIVERY_CLASS = { pending: "queued", delivered: "succeeded", failed: "failed" };

  function deliveryView(jobId, table, initial) {
    if (!table) return { refresh() {}, setLive() {} };
    const stamp = t => (t ? t.slice(0, 19).replace("T", " ") : "–");
    const render = list => {
      const rows = list.map(d => el("tr", { "data-delivery": d.id, "data-status": d.status },
        el("td", {}, el("code", { text: d.event })),
        el("td", {}, el("span", { class: `status ${DELIVERY_CLASS[d.status] || ""}`, text: d.status })),
        el("td", { text: `${d.attempts}` }),
        el("td", { class: d.error ? "error-cell" : "" },
          d.response_code ? `HTTP ${d.response_code}` : "", d.response_code && d.error ? " · " : "",
          d.error ? el("span", { class: "clip", title: d.error, text: d.error }) : "",
          !d.response_code && !d.error ? "–" : ""),
        el("td", {}, el("time", { text: stamp(d.created_at) })),
        el("td", {}, el("time", { text: stamp(d.finished_at) }))));
      const body = $("tbody", table);
      if (rows.length) body.replaceChildren(...rows);
      return list.some(d => d.status === "pending");
    };
    let pending = render(initial), timer = null, live = false;
    const refresh = async () => {
      try { pending = render(await api("GET", `/webhooks/deliveries?job_id=${jobId}&limit=${table.dataset.limit}`)); }
      catch (err) { table.title = `could not refresh: ${err.message}`; }
      schedule();
    };
    const schedule = () => {
      clearTimeout(timer);
      if (live || pending) timer = setTimeout(refresh, 3000);
    };
    return { refresh, setLive(value) { live = value; schedule(); } };
  }

  function jobPage(jobId) {
    const initial = JSON.parse($("#initial").textContent);
    const loss = [], lr = [], terms = {};  // terms: a multi-term loss's parts (distill), by name
    const palette = ["#2a6fdb", "#c2671b", "#2f9e44", "#9c36b5", "#e03131", "#0b7285"];
    const ckpts = checkpointView(jobId, $("#checkpoints"), $(".charts"), initial.events);
    const hooks = deliveryView(jobId, $("#deliveries"), initial.deliveries || []);
    hooks.setLive(["queued", "running"].includes(initial.job.status));
    let lastStep = -1;

    const addPoint = p => {
      if (!p || p.step === null || p.step === undefined || p.step <= lastStep) return false;
      lastStep = p.step;
      if (p.loss !== null && p.loss !== undefined) loss.push([p.step, p.loss]);
      if (p.lr !== null && p.lr !== undefined) lr.push([p.step, p.lr]);
      for (const [k, v] of Object.entries(p.terms || {})) if (v !== null && v !== undefined) (terms[k] ||= []).push([p.step, v]);
      return true;
    };
    let total = (initial.job.progress && initial.job.progress.total) || initial.job.params.steps || 0;
    const draw = () => {  // the x axis spans the whole run, so the curve grows from left to right
      const live = ["queued", "running"].includes($("#status").textContent);
      const empty = live ? "waiting for the first progress point" : "no progress points recorded";
      lineChart($("#loss-chart"), loss, { empty, smoothed: true, xmax: total, label: "training loss" });
      lineChart($("#lr-chart"), lr, { color: "#c2671b", empty, xmax: total, label: "learning rate" });
      const names = Object.keys(terms).sort();
      if (names.length) {
        $("#terms-figure").hidden = false;
        lineChart($("#terms-chart"), terms[names[0]], { name: names[0], color: palette[0], xmax: total, label: "loss terms",
          extra: names.slice(1).map((n, i) => ({ name: n, points: terms[n], color: palette[(i + 1) % palette.length] })) });
      }
      $("#loss-count").textContent = loss.length ? `(${loss.length} points; bold: smoothed)` : "";
    };
    const log = (html) => {
      const stamp = new Date().toISOString().slice(0, 19).replace("T", " ");
      const li = el("li", {}, el("time", { text: stamp }), " ");
      li.append(html);
      $("#log").append(li);
    };

    for (const e of initial.events) if (e.kind === "progress") addPoint(e.data);
    draw();
    ckpts.update(initial.job.checkpoints, total, ["queued", "running"].includes(initial.job.status));

    const update = job => {
      const p = job.progress;
      if (p && p.total) {
        total = p.total;
        $("#progress-bar").style.width = `${Math.round(100 * p.step / p.total)}%`;
        $("#progress-text").textContent = `${p.step} / ${p.total}`;
      }
      if (p) {
        $("#loss").textContent = fmt(p.loss);
        $("#lr").textContent = fmt(p.lr, 3);
        $("#speed").textContent = p.samples_per_s == null ? "–" : `${fmt(p.samples_per_s, 3)} samples/s`;
        $("#eta").textContent = p.eta_s == null || job.status !== "running" ? "–" : `${Math.round(p.eta_s)} s`;
        if (addPoint(p)) draw();
      }
      if (job.status !== "queued") $("#queue").textContent = "–";
      if (job.started_at) $("#started").textContent = job.started_at.slice(0, 19).replace("T", " ") + " UTC";
      if (job.finished_at) $("#finished").textContent = job.finished_at.slice(0, 19).replace("T", " ") + " UTC";
      const error = $("#error");
      if (job.error) { error.textContent = job.error; error.hidden = false; }
      const live = ["queued", "running"].includes(job.status);
      for (const line of ckpts.update(job.checkpoints, total, live)) log(document.createTextNode(line));
      const status = $("#status");
      if (status.textContent !== job.status) {
        log(el("span", { class: `status ${job.status}`, text: job.status }));
        status.textContent = job.status;
        status.className = `status ${job.status}`;
        draw();
        hooks.setLive(["queued", "running"].includes(job.status));
        hooks.refresh();  // a status change is an event a webhook may have been sent for
      }
      $("#attempts").replaceChildren(`${job.attempts}`, ...(job.worker_id ? [" · ", el("code", { class: "wrap", text: job.worker_id })] : []));
      if (job.adapter_id) {
        const a = el("a", { href: `/dashboard/playground?adapter=${job.adapter_id}` }, el("code", { text: job.adapter_id }));
        $("#adapter").replaceChildren(a);
      }
      if (!["queued", "running"].includes(job.status) || job.cancel_requested) $("#cancel").hidden = true;
    };

    $("#cancel").addEventListener("click", async () => {
      $("#cancel").disabled = true;
      try { update(await api("POST", `/jobs/${jobId}/cancel`)); }
      catch (err) { alert(err.message); $("#cancel").disabled = false; }
    });

    if (["queued", "running"].includes(initial.job.status)) {
      const source = new EventSource(`/jobs/${jobId}/events`);
      source.addEventListener("progress", ev => update(JSON.parse(ev.data)));
      source.addEventListener("end", ev => { update(JSON.parse(ev.data)); source.close(); });
      source.onerror = () => { $("#status").title = "live updates interrupted; reconnecting"; };
    }
  }

  // -- playground ----------------------------------------------------------------------------------
  function playgroundPage() {
    const form = $("#playground");
    const results = $("#results");
    const status = $("#pg-status");

    const chosen = () => [...form.querySelectorAll(".adapter-row")]
      .filter(row => $("input[type=checkbox]", row).checked)
      .map(row => ({ id: row.dataset.id, name: row.dataset.name, scale: parseFloat($("input[type=number]", row).value || "1") }));
    const params = () => {
      const data = new FormData(form), body = { prompt: data.get("prompt") };
      if (data.get("negative_prompt")) body.negative_prompt = data.get("negative_prompt");
      for (const name of ["seed", "steps", "width", "height", "num_images"]) {
        if (data.get(name) !== "") body[name] = parseInt(data.get(name), 10);
      }
      if (data.get("guidance_scale") !== "") body.guidance_scale = parseFloat(data.get("guidance_scale"));
      if (body.width && !body.height) body.height = body.width;
      return body;
    };
    const card = (title, subtitle) => {
      const images = el("div", { class: "images" }, el("span", { class: "muted", text: "queued…" }));
      const node = el("figure", { class: "result" }, images,
        el("figcaption", {}, el("strong", { text: title }), el("br"), el("span", { class: "muted", text: subtitle })));
      results.append(node);
      return images;
    };
    const describe = list => list.length ? list.map(a => `${a.name} × ${a.scale}`).join(" + ") : "base model, no adapter";
    const busy = on => form.querySelectorAll("button").forEach(b => { b.disabled = on; });

    form.addEventListener("submit", async ev => {
      ev.preventDefault();
      const body = params(), adapters = chosen();
      if (adapters.length) body.adapters = adapters.map(a => ({ id: a.id, scale: a.scale }));
      results.replaceChildren();
      const images = card(describe(adapters), `seed ${body.seed ?? "random"}`);
      images.replaceChildren(el("span", { class: "muted", text: "generating…" }));
      busy(true); status.textContent = "";
      const started = performance.now();
      try {
        const out = await api("POST", "/generate", body);
        images.replaceChildren(...out.images.map((b64, i) =>
          el("img", { src: `data:image/png;base64,${b64}`, alt: `image ${i + 1}`, width: out.width, height: out.height })));
        images.parentElement.querySelector(".muted").textContent =
          `seed ${out.seed} · ${out.width}×${out.height} · ${out.steps} steps · ${((performance.now() - started) / 1000).toFixed(1)} s`;
      } catch (err) {
        images.replaceChildren(el("div", { class: "error", text: err.message }));
      } finally { busy(false); }
    });

    // Compare: the same prompt and seed once per adapter (and the base model), side by side.
    // One POST /generations each; the engine batches them together.
    $("#compare").addEventListener("click", async () => {
      if (!form.reportValidity()) return;
      const body = params(), adapters = chosen();
      if (body.seed === undefined) body.seed = Math.floor(Math.random() * 1e9);
      const variants = [];
      if ($("#compare-base").checked) variants.push([]);
      for (const a of adapters) variants.push([a]);
      if (!variants.length) { status.textContent = "Choose at least one adapter (or keep the base model)."; return; }
      status.textContent = `comparing ${variants.length} variant(s), seed ${body.seed}`;
      results.replaceChildren();
      busy(true);
      await Promise.all(variants.map(async variant => {
        const images = card(describe(variant), `seed ${body.seed}`);
        const request = { ...body, num_images: 1 };
        if (variant.length) request.adapters = variant.map(a => ({ id: a.id, scale: a.scale }));
        try {
          const queued = await api("POST", "/generations", request);
          const final = await follow(queued, images);
          if (final.status !== "succeeded") throw new Error(final.error || `generation ${final.status}`);
          images.replaceChildren(...final.images.map((url, i) => el("img", { src: url, alt: `${describe(variant)} ${i + 1}` })));
        } catch (err) {
          images.replaceChildren(el("div", { class: "error", text: err.message }));
        }
      }));
      busy(false);
    });

    function follow(generation, images) {
      return new Promise(resolve => {
        const source = new EventSource(`/generations/${generation.id}/events`);
        const show = g => {
          const p = g.progress;
          images.replaceChildren(el("span", { class: "muted", text:
            g.status === "queued" ? `queued${g.queue_position != null ? ` (${g.queue_position} ahead)` : ""}…`
              : p && p.total ? `step ${p.step} / ${p.total}` : `${g.status}…` }));
        };
        source.addEventListener("status", ev => show(JSON.parse(ev.data)));
        source.addEventListener("end", ev => { source.close(); resolve(JSON.parse(ev.data)); });
        source.onerror = async () => {  // stream broken: fall back to one read
          source.close();
          try { resolve(await api("GET", `/generations/${generation.id}`)); }
          catch (err) { resolve({ status: "failed", error: err.message }); }
        };
      });
    }
  }

  // -- datasets: upload with progress ---------------------------------------------------------------
  function datasetsPage() {
    const form = $("#upload");
    const bar = $("#upload-bar"), text = $("#upload-text");
    form.addEventListener("submit", ev => {
      ev.preventDefault();
      const file = form.file.files[0];
      if (!file) { text.textContent = "Choose a file first."; return; }
      const params = new URLSearchParams({ kind: form.kind.value, skip_bad: form.skip_bad.checked });
      const data = new FormData();
      data.append("file", file);
      const xhr = new XMLHttpRequest();
      xhr.open("POST", `/datasets?${params}`);
      $("#upload-progress").hidden = false;
      bar.style.width = "0%";
      text.textContent = "uploading…";
      form.querySelector("button").disabled = true;
      xhr.upload.onprogress = e => {
        if (!e.lengthComputable) return;
        const pct = Math.round(100 * e.loaded / e.total);
        bar.style.width = `${pct}%`;
        text.textContent = pct < 100 ? `uploading ${pct}%` : "validating…";
      };
      xhr.onload = () => {
        form.querySelector("button").disabled = false;
        let out = null;
        try { out = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
        if (xhr.status === 201) {
          bar.style.width = "100%";
          text.textContent = `dataset ${out.id}: ${out.num_items} items, ready`;
          setTimeout(() => location.reload(), 600);
        } else {
          $("#upload-progress").hidden = true;
          const error = $("#upload-error");
          error.textContent = (out && out.message) || `upload failed (${xhr.status})`;
          error.hidden = false;
        }
      };
      xhr.onerror = () => {
        form.querySelector("button").disabled = false;
        $("#upload-progress").hidden = true;
        $("#upload-error").textContent = "network error: the upload did not reach the server";
        $("#upload-error").hidden = false;
      };
      $("#upload-error").hidden = true;
      xhr.send(data);
    });
  }

  return { api, lineChart, overviewPage, jobPage, playgroundPage, datasetsPage };
})();
