"use strict";
// The gallery of `factory report`: tiles built from the page's JSON, filters, and the large
// view. Strings from the data only ever reach the page as text (textContent, value), never as
// markup.
(() => {
  const tiles = document.getElementById("tiles");
  if (!tiles) return; // a page of Protocol results only
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const classes = data.classes; // name -> {colour, seen}
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };

  function picture(s) {
    // the image with one layer per class mask (and the ignore pixels), stacked
    const pic = el("div", "pic");
    const img = el("img", "image");
    img.src = s.img;
    img.alt = s.prompt;
    img.loading = "lazy";
    pic.append(img);
    s.masks.forEach((src, j) => {
      const layer = el("img", "mask");
      layer.src = src;
      layer.alt = "";
      layer.loading = "lazy";
      layer.dataset.layer = String(j);
      pic.append(layer);
    });
    if (s.ignore) {
      const layer = el("img", "mask");
      layer.src = s.ignore;
      layer.alt = "";
      layer.dataset.layer = "ignore";
      pic.append(layer);
    }
    return pic;
  }

  function chip(name) {
    const c = el("span", "chip" + (classes[name].seen ? "" : " unseen"));
    const sw = el("span", "swatch");
    sw.style.background = classes[name].colour;
    c.append(sw, el("span", "name", name));
    c.title = classes[name].seen ? "seen class" : "unseen class";
    return c;
  }

  const entries = data.samples.map((s) => {
    const tile = el("figure", "tile");
    tile.tabIndex = 0;
    tile.dataset.index = String(s.index);
    const cap = el("figcaption");
    const chips = el("div", "chips");
    s.classes.forEach((name) => chips.append(chip(name)));
    cap.append(chips, el("div", "prompt", s.prompt));
    tile.append(picture(s), cap);
    tile.addEventListener("click", () => open(s));
    tile.addEventListener("keydown", (e) => { if (e.key === "Enter") open(s); });
    tiles.append(tile);
    return { tile, s };
  });

  // filters
  const byClass = document.getElementById("f-class");
  const bySplit = document.getElementById("f-split");
  const low = document.getElementById("f-min");
  const high = document.getElementById("f-max");
  const shown = document.getElementById("shown");
  data.order.forEach((name) => {
    const o = el("option", "", name + (classes[name].seen ? "" : " (unseen)"));
    o.value = name;
    byClass.append(o);
  });
  function matches(s) {
    if (byClass.value && !s.classes.includes(byClass.value)) return false;
    const unseen = s.classes.some((name) => !classes[name].seen);
    if (bySplit.value === "seen" && unseen) return false;
    if (bySplit.value === "unseen" && !unseen) return false;
    const lo = low.value === "" ? -Infinity : Number(low.value);
    const hi = high.value === "" ? Infinity : Number(high.value);
    return s.value >= lo && s.value <= hi;
  }
  function apply() {
    let n = 0;
    for (const { tile, s } of entries) {
      tile.hidden = !matches(s);
      n += tile.hidden ? 0 : 1;
    }
    shown.textContent = `${n} of ${entries.length} samples shown`;
  }
  [byClass, bySplit, low, high].forEach((c) => c.addEventListener("input", apply));
  apply();

  // the large view
  const viewer = document.getElementById("viewer");
  const stage = document.getElementById("v-pic");
  const layers = document.getElementById("v-layers");
  let current = null;
  function open(s) {
    current = s;
    stage.replaceChildren(picture(s));
    stage.querySelectorAll("img").forEach((i) => { i.loading = "eager"; });
    document.getElementById("v-prompt").textContent = s.prompt;
    document.getElementById("v-meta").textContent =
      `sample ${s.index}, ${s.file}; ${data.value_name} ${s.value.toFixed(3)}`;
    layers.replaceChildren(el("legend", "", "masks"));
    const toggles = s.classes.map((name, j) => [j, name,
      `score ${s.scores[j].toFixed(3)}, area ${(100 * s.areas[j]).toFixed(1)}%`]);
    if (s.ignore) toggles.push(["ignore", "ignore (uncertain pixels)", ""]);
    toggles.forEach(([j, name, note]) => {
      const box = el("input");
      box.type = "checkbox";
      box.checked = true;
      box.dataset.layer = String(j);
      box.addEventListener("change", () => {
        stage.querySelector(`img.mask[data-layer="${j}"]`).hidden = !box.checked;
      });
      const label = el("label");
      label.append(box, j === "ignore" ? el("span", "name", name) : chip(name));
      if (note) label.append(el("span", "note", note));
      layers.append(label);
    });
    viewer.hidden = false;
    document.getElementById("v-close").focus();
  }
  function close() {
    viewer.hidden = true;
    current = null;
  }
  function step(by) {
    const visible = entries.filter((e) => !e.tile.hidden);
    const at = visible.findIndex((e) => e.s === current);
    if (at >= 0 && visible.length) open(visible[(at + by + visible.length) % visible.length].s);
  }
  document.getElementById("v-close").addEventListener("click", close);
  viewer.addEventListener("click", (e) => { if (e.target === viewer) close(); });
  document.addEventListener("keydown", (e) => {
    if (viewer.hidden) return;
    if (e.key === "Escape") close();
    if (e.key === "ArrowRight") step(1);
    if (e.key === "ArrowLeft") step(-1);
  });
})();
