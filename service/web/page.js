// The web page's behaviour: POST /translate with return_attention, draw each sentence's cross-attention (hover or
// focus a target word; a heatmap of target x source), and POST /v1/explain for every layer's and head's attention.
// No framework and nothing from another origin (the page's CSP allows 'self' only).
"use strict";

const HEAD_COLOURS = ["#1f5fbf", "#c2410c", "#15803d", "#9333ea", "#b91c1c", "#0e7490", "#a16207", "#be185d"];
const MIN_LINE_WEIGHT = 0.01; // thinner lines are not drawn: they would only grey the picture

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// Sentencepiece pieces -> text: "▁" starts a word.
function detokenize(pieces) {
  return pieces.join("").replace(/▁/g, " ").trim();
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function call(path, body) {
  const headers = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) headers["X-API-Key"] = key;
  const response = await fetch(path, {method: "POST", headers, body: JSON.stringify(body)});
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const message = data && data.error ? data.error.message : `HTTP ${response.status}`;
    throw new Error(`${response.status}: ${message}`);
  }
  return data;
}

async function loadModels() {
  const select = $("model");
  try {
    const response = await fetch("v1/models");
    const {models} = await response.json();
    for (const m of models) {
      const option = el("option", {value: m.id}, `${m.id} (${m.source_language || "?"} → ${m.target_language || "?"})`);
      option.selected = m.default;
      select.append(option);
    }
  } catch (e) {
    showError(`could not list the models: ${e.message}`);
  }
}

function requestBody() {
  const body = {text: $("source").value, return_attention: true};
  if ($("model").value) body.model = $("model").value;
  if ($("format").value !== "text") body.format = $("format").value;
  const beam = $("beam-size").value.trim();
  const nBest = parseInt($("n-best").value, 10) || 1;
  if (beam) body.beam_size = Number(beam);
  if (nBest > 1) Object.assign(body, {n_best: nBest, return_scores: true});
  return body;
}

async function translate() {
  showError("");
  const button = $("translate");
  button.disabled = true;
  button.textContent = "Translating…";
  try {
    const body = requestBody();
    const data = await call("translate", body);
    render(data.translations[0], body.model || data.model);
  } catch (e) {
    showError(e.message);
  } finally {
    button.disabled = false;
    button.textContent = "Translate";
  }
}

function render(translation, model) {
  $("result").hidden = false;
  $("explain").hidden = true;
  $("translation").textContent = translation.text;
  const list = $("n-best-list");
  list.replaceChildren();
  $("n-best-block").hidden = !(translation.n_best && translation.n_best.length > 1);
  for (const h of translation.n_best || []) {
    list.append(el("li", {}, `${h.text} (score ${h.score.toFixed(3)})`));
  }
  const sentences = $("sentences");
  sentences.replaceChildren();
  (translation.attention || []).forEach((a, i) => sentences.append(sentenceView(a, i, model)));
}

// One sentence: source tokens, target tokens that light up the source by their weights, a heatmap, explain.
function sentenceView(attention, index, model) {
  const block = el("article", {class: "sentence", "aria-label": `sentence ${index + 1}`});
  const source = el("p", {class: "tokens source", "aria-label": "source tokens"});
  const target = el("p", {class: "tokens target", "aria-label": "translation tokens: focus one to see its attention"});
  const sourceSpans = attention.source_tokens.map((t, j) => {
    const span = el("span", {class: "tok", "data-index": j}, t);
    source.append(span, " ");
    return span;
  });
  const status = el("p", {class: "attends", "aria-live": "polite"});
  attention.target_tokens.forEach((t, i) => {
    const span = el("span", {class: "tok", tabindex: 0, "data-index": i}, t);
    const light = () => {
      const weights = attention.weights[i];
      let best = 0;
      sourceSpans.forEach((s, j) => {
        s.style.backgroundColor = `rgba(31, 95, 191, ${weights[j]})`;
        s.style.color = weights[j] > 0.5 ? "#fff" : "";
        s.dataset.weight = weights[j];
        s.classList.remove("strongest");
        if (weights[j] > weights[best]) best = j;
      });
      sourceSpans[best].classList.add("strongest");
      target.querySelectorAll(".tok").forEach((o) => o.classList.toggle("active", o === span));
      status.textContent = `“${t}” attends most to “${attention.source_tokens[best]}” (${weights[best].toFixed(2)})`;
    };
    span.addEventListener("mouseenter", light);
    span.addEventListener("focus", light);
    target.append(span, " ");
  });
  const explain = el("button", {type: "button", class: "explain-button"}, "Every layer and head of this sentence");
  explain.addEventListener("click", () => runExplain(attention, model, explain));
  block.append(el("h3", {}, `Sentence ${index + 1}`), source, target, status, heatmap(attention), explain);
  return block;
}

function heatmap(attention) {
  const details = el("details", {class: "heatmap"});
  details.append(el("summary", {}, `Heatmap: ${attention.target_tokens.length} target × ` +
                                    `${attention.source_tokens.length} source tokens`));
  const table = el("table");
  table.append(el("caption", {}, "Encoder-decoder attention of the last layer, mean over heads: a row per target " +
                                 "token, a column per source token"));
  const head = el("tr");
  head.append(el("th", {scope: "col"}, ""));
  attention.source_tokens.forEach((t) => head.append(el("th", {scope: "col"}, t)));
  table.append(head);
  attention.target_tokens.forEach((t, i) => {
    const row = el("tr");
    row.append(el("th", {scope: "row"}, t));
    attention.weights[i].forEach((w) => {
      const cell = el("td", {title: w.toFixed(3), "data-weight": w}, w.toFixed(2));
      cell.style.backgroundColor = `rgba(31, 95, 191, ${w})`;
      cell.style.color = w > 0.5 ? "#fff" : "transparent";
      row.append(cell);
    });
    table.append(row);
  });
  const scroll = el("div", {class: "scroll"});
  scroll.append(table);
  details.append(scroll);
  return details;
}

let explained = null; // the last /v1/explain answer

async function runExplain(attention, model, button) {
  showError("");
  button.disabled = true;
  try {
    const source = detokenize(attention.source_tokens.slice(0, -1)); // eos last
    const body = {text: source, target: detokenize(attention.target_tokens)};
    if (model) body.model = model;
    explained = await call("v1/explain", body);
    const layers = explained.cross_attention.length;
    const heads = explained.cross_attention[0].length;
    fill($("explain-layer"), Array.from({length: layers}, (_, l) => [l, `${l + 1}`]), layers - 1);
    fill($("explain-head"), [["all", "all heads, in colours"],
                             ...Array.from({length: heads}, (_, h) => [h, `${h + 1}`])], "all");
    const legend = $("explain-legend");
    legend.replaceChildren(...Array.from({length: heads}, (_, h) => {
      const key = el("span", {class: "legend"}, `head ${h + 1}`);
      key.style.borderColor = HEAD_COLOURS[h % HEAD_COLOURS.length];
      return key;
    }));
    $("explain").hidden = false;
    drawExplain();
    $("explain").scrollIntoView({block: "start"});
  } catch (e) {
    showError(e.message);
  } finally {
    button.disabled = false;
  }
}

function fill(select, options, selected) {
  select.replaceChildren(...options.map(([value, label]) => {
    const option = el("option", {value}, label);
    option.selected = String(value) === String(selected);
    return option;
  }));
}

// Two columns of tokens (queries left, keys right) joined by lines whose opacity is the attention weight.
function drawExplain() {
  if (!explained) return;
  const kind = $("explain-kind").value;
  const layer = Number($("explain-layer").value);
  const headValue = $("explain-head").value;
  const heads = headValue === "all" ? explained[kind][layer].map((_, h) => h) : [Number(headValue)];
  const left = kind === "encoder_self_attention" ? explained.source_tokens : explained.decoder_input_tokens;
  const right = kind === "decoder_self_attention" ? explained.decoder_input_tokens : explained.source_tokens;
  const rowHeight = 22, width = 420, leftX = 120, rightX = 300;
  const view = $("explain-view");
  const height = rowHeight * (Math.max(left.length, right.length) + 1);
  view.setAttribute("viewBox", `0 0 ${width} ${height}`);
  view.setAttribute("width", width);
  view.setAttribute("height", height);
  view.setAttribute("aria-label", `${$("explain-kind").selectedOptions[0].textContent}, layer ${layer + 1}, ` +
                                  `${headValue === "all" ? "all heads" : "head " + (Number(headValue) + 1)}`);
  view.replaceChildren();
  const lines = svg("g", {class: "lines"});
  view.append(lines);
  const y = (i) => rowHeight * (i + 1);
  for (const h of heads) {
    const weights = explained[kind][layer][h];
    left.forEach((_, i) => right.forEach((__, j) => {
      const w = weights[i][j];
      if (w < MIN_LINE_WEIGHT) return;
      lines.append(svg("line", {x1: leftX + 4, y1: y(i) - 5, x2: rightX - 4, y2: y(j) - 5,
                                stroke: HEAD_COLOURS[h % HEAD_COLOURS.length], "stroke-width": 2,
                                "stroke-opacity": w, "data-from": i, "data-to": j, "data-head": h,
                                "data-weight": w}));
    }));
  }
  left.forEach((t, i) => {
    const label = svg("text", {x: leftX, y: y(i), "text-anchor": "end", class: "query", tabindex: 0,
                               "data-index": i, role: "button", "aria-label": `${t}: show its attention`}, t);
    const only = (on) => lines.querySelectorAll("line").forEach((line) => {
      line.classList.toggle("dim", on && line.dataset.from !== String(i));
    });
    label.addEventListener("mouseenter", () => only(true));
    label.addEventListener("focus", () => only(true));
    label.addEventListener("mouseleave", () => only(false));
    label.addEventListener("blur", () => only(false));
    view.append(label);
  });
  right.forEach((t, j) => view.append(svg("text", {x: rightX, y: y(j), class: "key", "data-index": j}, t)));
}

document.addEventListener("DOMContentLoaded", () => {
  loadModels();
  $("translate-form").addEventListener("submit", (event) => {
    event.preventDefault();
    translate();
  });
  $("source").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      translate();
    }
  });
  for (const id of ["explain-kind", "explain-layer", "explain-head"]) $(id).addEventListener("change", drawExplain);
});
