"use strict";
(function () {
  const D = JSON.parse(document.getElementById("famfind-data").textContent);
  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
  const fmt = (v) => (v === null || v === undefined ? "-" : typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(3) : v);

  const s = D.scan;
  $("scan-id").textContent = s.scan_id;
  $("scan-summary").textContent = `${s.sae_path} | model ${s.model} | ${s.hook_name} | ${s.architecture} SAE, d_sae ${s.d_sae} | ` +
    `${s.n_tokens.toLocaleString()} tokens of ${s.corpus} | L0 ${s.l0.toFixed(1)} | dead ${(100 * s.dead_fraction).toFixed(1)}%`;

  if (D.pages && D.pages.length > 1) {  // one page per SAE of the scan
    $("sae-pages").innerHTML = "SAEs of this scan: " + D.pages.map(([name, href]) => name === s.sae ?
      `<b>${esc(name)}</b>` : `<a href="${encodeURI(href)}">${esc(name)}</a>`).join(" | ");
  }

  function table(el, rows) {
    if (!rows.length) { el.innerHTML = "<tr><td>none</td></tr>"; return; }
    const cols = [...new Set(rows.flatMap((r) => Object.keys(r)))];
    el.innerHTML = "<tr>" + cols.map((c) => `<th>${esc(c)}</th>`).join("") + "</tr>" +
      rows.map((r) => "<tr>" + cols.map((c) => `<td>${esc(fmt(r[c]))}</td>`).join("") + "</tr>").join("");
  }
  $("n-live").textContent = (D.live || 0).toLocaleString();
  table($("coverage"), (D.coverage || []).map((r) => ({...r, "share of live": `${(100 * r["share of live"]).toFixed(1)}%`})));
  table($("validation"), D.validation);
  if (D.labels.length) table($("labels"), D.labels); else $("labels-section").hidden = true;
  const byHead = {};
  for (const h of D.heads) { (byHead[`${h.layer}.${h.head}`] = byHead[`${h.layer}.${h.head}`] || {head: `${h.layer}.${h.head}`})[h.metric] = h.score; }
  table($("heads"), Object.values(byHead));

  // heatmap: one column per live feature (sorted by top head), one row per head; D.heat is
  // [features, heads] bytes (255 * head attribution), base64
  const cv = $("heatmap"), ctx = cv.getContext("2d"), H = D.n_heads, F = D.index.length;
  if (H && F) {
    const raw = atob(D.heat), att = (i, y) => raw.charCodeAt(i * H + y);
    const top = (i) => { let b = 0; for (let y = 1; y < H; y++) if (att(i, y) > att(i, b)) b = y; return b; };
    const order = D.index.map((_, i) => [top(i), -att(i, top(i)), i]).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    const img = ctx.createImageData(cv.width, cv.height);
    for (let x = 0; x < cv.width; x++) {  // each pixel column shows the feature under it
      const i = order[Math.min(F - 1, Math.floor(x * F / cv.width))][2];
      for (let py = 0; py < cv.height; py++) {
        const a = att(i, Math.min(H - 1, Math.floor(py * H / cv.height))) / 255, o = 4 * (py * cv.width + x);
        img.data[o] = 255 - a * 215; img.data[o + 1] = 255 - a * 175; img.data[o + 2] = 255 - a * 85; img.data[o + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
  }

  // cluster sizes
  const cs = $("cluster-sizes");
  if (D.clusters && D.clusters.length) {  // the clusters detector's part; absent when it did not run
    const mx = Math.max(...D.clusters.map((c) => c.size));
    const cl = Object.fromEntries(D.labels.filter((l) => l.kind === "cluster" && l.label).map((l) => [l.target, l.label]));
    cs.innerHTML = D.clusters.map((c) => `<div class="bar"><span>cluster ${c.cluster} (${esc(c.top_head)})${cl[c.cluster] ? ": " + esc(cl[c.cluster]) : ""}</span>` +
      `<span class="fill" style="width:${(300 * c.size / mx).toFixed(0)}px"></span><span>${c.size}</span></div>`).join("");
  } else cs.textContent = "no clusters in this scan";

  function bars(vals, cls) {
    return vals.map((v, i) => `<div class="bar"><span>${D.layer}.${i}</span><span class="fill ${cls}" style="width:${(120 * v).toFixed(0)}px"></span><span>${fmt(v)}</span></div>`).join("");
  }
  function hist(f) {
    if (!f.hist.length) return "";
    const mx = Math.max(...f.hist.map((b) => b[1]));
    return `<div class="hist" title="activation histogram (log-spaced bins)">` +
      f.hist.map(([b, n]) => `<div style="height:${(40 * n / mx).toFixed(0)}px" title="bin ${b}: ${n}"></div>`).join("") + "</div>";
  }
  // specificity plot (Bricken et al. 2023): the activation histogram with the proxy's hits
  // stacked on top; expected-value plot: the same weighted by each bin's activation
  const dense = (pairs) => { const a = D.hist_centres.map(() => 0); pairs.forEach(([b, n]) => { a[b] = n; }); return a; };
  function stacked(all, inside, weighted, title) {
    const w = (i) => (weighted ? D.hist_centres[i] : 1);
    const tot = all.map((n, i) => n * w(i)), inn = inside.map((n, i) => n * w(i));
    const mx = Math.max(...tot, 1e-12);
    return `<div class="hist" title="${esc(title)}">` + tot.map((t, i) => `<div class="stack" style="height:${(40 * t / mx).toFixed(0)}px" ` +
      `title="bin ${i}: ${fmt(inn[i])} of ${fmt(t)} inside"><div class="in" style="height:${(t ? 100 * inn[i] / t : 0).toFixed(0)}%"></div></div>`).join("") + "</div>";
  }
  function proxyPlots(all, inside, name) {
    return `<div class="plots">${stacked(all, inside, false, "specificity plot: " + name)}${stacked(all, inside, true, "expected-value plot: " + name)}</div>`;
  }
  const cf = $("context-families");
  if (D.context_families && D.context_families.length) {
    cf.innerHTML = D.context_families.map((r) => `<div class="ctxfam"><b>${esc(r.family)}</b> on <span class="tok">${esc(r.proxy)}</span>: ` +
      `${r.members} features, held-out mass precision ${fmt(r.mass_precision_b)}, sensitivity ${fmt(r.sensitivity_b)}` +
      proxyPlots(r.hist_all, r.hist_in, r.proxy) + "</div>").join("");
  } else cf.textContent = "no context family in this scan (see the validation table and the terminal report's proxy numbers)";
  if (D.candidates && D.candidates.length) table($("candidates"), D.candidates); else $("candidates").innerHTML = "<tr><td>none</td></tr>";

  function context(a, text, maxAct, tokens, acts) {
    if (tokens && acts) {  // every token shaded by the feature's activation on it
      return tokens.map((t, i) => acts[i] > 0 ? `<mark style="background: rgba(255, 140, 0, ${Math.min(1, acts[i] / (maxAct || 1)).toFixed(2)})" title="${fmt(acts[i])}">${esc(t)}</mark>` : esc(t)).join("");
    }
    const m = /^([\s\S]*)\[\[([\s\S]*)\]\]([\s\S]*)$/.exec(text);
    if (!m) return esc(text);
    const alpha = Math.min(1, a / (maxAct || 1)).toFixed(2);
    return esc(m[1]) + `<mark style="background: rgba(255, 140, 0, ${alpha})">${esc(m[2])}</mark>` + esc(m[3]);
  }
  function card(f) {
    const fams = f.families.map(([n, c, p]) => `<span class="fam">${esc(n)}${p ? "*" : ""} ${fmt(c)}</span>`).join("");
    const lab = (f.label ? `<div class="label">${esc(f.label[0])}: ${esc(f.label[1])} (score ${fmt(f.label[2])})</div>` : "") +
      (f.cluster_label ? `<div class="label">cluster: ${esc(f.cluster_label)}</div>` : "");
    const toks = (l) => l.map(([t, v]) => `<span class="tok">${esc(JSON.stringify(t))}</span> ${fmt(v)}`).join(", ");
    return `<div class="card" data-feature="${f.feature}"><h3>feature ${f.feature}</h3>${lab}<div>${fams}</div>` +
      `<div>density ${fmt(f.density)} | max ${fmt(f.max_act)} | cluster ${f.cluster ?? "-"}</div>` +
      (f.mechanism ? `<div class="mech"><b>mechanism</b> ${esc(f.mechanism)}</div>` : "") + hist(f) +
      (f.proxy ? `<div><b>proxy</b> <span class="tok">${esc(f.proxy[0])}</span>: mass precision ${fmt(f.proxy[1])}, sensitivity ` +
        `${fmt(f.proxy[2])}, AUROC ${fmt(f.proxy[3])}${proxyPlots(dense(f.hist), f.proxy[4], f.proxy[0])}</div>` : "") +
      `<div><b>boosts</b> ${toks(f.logits.boost)}</div><div><b>suppresses</b> ${toks(f.logits.suppress)}</div>` +
      `<div><b>head attribution</b>${bars(f.att, "")}</div>` + (f.dfa.length ? `<div><b>DFA by head</b>${bars(f.dfa, "dfa")}</div>` : "") +
      (f.upstream && f.upstream.length ? `<div><b>top upstream features</b> (RDFA): ` + f.upstream.map(([l, g, c]) => {
        const href = (D.pages || []).find((p) => p[2] === l);
        const name = `L${l} f${g}`;
        return (href ? `<a href="${encodeURI(href[1])}#${g}">${name}</a>` : name) + ` ${fmt(c)}`;
      }).join(", ") + "</div>" : "") +
      (f.sources.length ? `<div><b>DFA by source</b> (top example): ` + f.sources.map(([t, o, sh]) => `<span class="tok">${esc(JSON.stringify(t))}</span> @-${o} ${fmt(sh)}`).join(", ") + "</div>" : "") +
      `<div><b>top contexts</b>` + f.examples.map(([a, c, t, v]) => `<div class="ctx">${fmt(a)}: ${context(a, c, f.max_act, t, v)}</div>`).join("") + "</div>" +
      (f.quantiles.length ? `<div><b>lower quantiles</b>` + f.quantiles.map(([a, c, t, v]) => `<div class="ctx">${fmt(a)}: ${context(a, c, f.max_act, t, v)}</div>`).join("") + "</div>" : "") + "</div>";
  }

  // cards: D.index holds [feature, families, label, cluster label] per live feature; the
  // cards themselves are in D.cards_dir, D.cards_per_file per file, loaded when shown
  const CARDS = {};
  window.famfindCards = (i, cards) => { CARDS[i] = cards; };
  const chunkOf = (pos) => Math.floor(pos / D.cards_per_file);
  function loadChunks(chunks) {
    return Promise.all(chunks.filter((c) => !CARDS[c]).map((c) => new Promise((resolve, reject) => {
      const el = document.createElement("script");
      el.src = `${encodeURI(D.cards_dir)}/${String(c).padStart(5, "0")}.js`;
      el.onload = resolve;
      el.onerror = () => reject(new Error(`feature cards ${el.src} could not be read`));
      document.head.appendChild(el);
    })));
  }
  let page = 0;
  const PER = D.cards_per_file;
  function matches() {  // positions in D.index
    const q = $("search").value.trim().toLowerCase(), fam = $("only-families").checked;
    const out = [];
    D.index.forEach(([f, fams, label, cl], pos) => {
      if ((!fam || fams.length) && (!q || String(f) === q || fams.some(([n]) => n.toLowerCase().includes(q)) ||
          (label && label.toLowerCase().includes(q)) || (cl && cl.toLowerCase().includes(q)))) out.push(pos);
    });
    return out;
  }
  let drawing = 0;
  async function draw() {
    const m = matches(), pages = Math.max(1, Math.ceil(m.length / PER)), mine = ++drawing;
    page = Math.min(page, pages - 1);
    const shown = m.slice(page * PER, (page + 1) * PER);
    $("page-info").textContent = `page ${page + 1} / ${pages} (${m.length} features)`;
    try {
      await loadChunks([...new Set(shown.map(chunkOf))]);
    } catch (e) {
      $("cards").textContent = e.message;
      return;
    }
    if (mine !== drawing) return;  // a newer draw() superseded this one
    $("cards").innerHTML = shown.map((pos) => card(CARDS[chunkOf(pos)][pos % PER])).join("");
    if (hf && shown.length === 1 && !scrolled) { scrolled = true; $("cards").scrollIntoView(); }  // a link to one card
  }
  let scrolled = false;
  const hp = /^#p=(\d+)$/.exec(location.hash), hf = /^#(\d+)$/.exec(location.hash);
  if (hf) $("search").value = hf[1];  // a link to one feature's card
  if (hp) page = Math.max(0, Number(hp[1]) - 1);  // a link to one page of cards
  $("search").addEventListener("input", () => { page = 0; draw(); });
  $("only-families").addEventListener("change", () => { page = 0; draw(); });
  $("prev").addEventListener("click", () => { page = Math.max(0, page - 1); draw(); });
  $("next").addEventListener("click", () => { page += 1; draw(); });
  draw();
})();
