// Draws the sdi report from the JSON in #sdi-data (schema in sdi/report/data.py), one page of
// queries at a time. Every text from the data goes in through textContent, never as markup.
(function () {
  "use strict";
  var SVG_NS = "http://www.w3.org/2000/svg";
  var data = JSON.parse(document.getElementById("sdi-data").textContent);
  var config = JSON.parse(document.getElementById("sdi-config").textContent);
  var STEPS = data.steps;
  var state = { page: 0, size: config.page_size, filter: "", openAll: false, shown: [] };

  // ---- small DOM helpers -------------------------------------------------------------------
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }
  function svg(tag, attrs, children) {
    var node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }
  function setAttrs(node, attrs) {
    Object.keys(attrs || {}).forEach(function (key) {
      if (key === "text") node.textContent = attrs[key];
      else node.setAttribute(key, attrs[key]);
    });
  }
  function append(node, children) {
    (children || []).forEach(function (child) {
      if (child !== null) node.appendChild(child);
    });
  }
  function tip(text) {
    return svg("title", { text: text });
  }

  // ---- numbers and colours -----------------------------------------------------------------
  function fmt(v) {
    if (v === null || v === undefined) return "n/a";
    var a = Math.abs(v);
    var body = a !== 0 && (a < 1e-3 || a >= 1e4) ? a.toExponential(2) : a.toPrecision(3);
    return (v < 0 ? "\u2212" : "+") + body;
  }
  function pct(v) {
    return v === null || v === undefined ? "n/a" : (100 * v).toFixed(1) + " %";
  }
  function colour(v, bound) {
    if (v === null) return config.missing_colour;
    var n = config.stops.length;
    var x = bound > 0 ? Math.max(-1, Math.min(1, v / bound)) : 0;
    return config.stops[Math.round(((x + 1) / 2) * (n - 1))];
  }
  function maxAbs(arrays, start) {
    return arrays.reduce(function (m, a) {
      return a.reduce(function (mm, v) {
        return v === null ? mm : Math.max(mm, Math.abs(v));
      }, m);
    }, start || 0);
  }
  function stepName(t) {
    return "step " + data.step_labels[t];
  }

  // ---- overview: where in the loop the influence sits ----------------------------------------
  function drawOverview() {
    var ov = data.overview;
    var box = document.getElementById("overview");
    var series = [
      { name: "most influential", values: ov.most_share, colour: config.most_colour },
      { name: "least influential", values: ov.least_share, colour: config.least_colour },
    ].filter(function (s) { return s.values !== null; });
    var top = maxAbs(series.map(function (s) { return s.values; }), 1e-12);
    var w = Math.max(320, STEPS * 44 + 70), h = 200, left = 46, bottom = 40, plotH = h - bottom - 12;
    var band = (w - left - 10) / STEPS, barW = Math.min(18, (band - 6) / series.length);
    var chart = svg("svg", { width: w, height: h, role: "img", class: "overview-chart",
      "aria-label": "mean share of |SDI| per loop step" });
    [0, 0.5, 1].forEach(function (f) {
      var y = 12 + plotH * (1 - f);
      chart.appendChild(svg("line", { x1: left, x2: w - 6, y1: y, y2: y, class: "grid" }));
      chart.appendChild(svg("text", { x: left - 4, y: y + 4, class: "axis", "text-anchor": "end",
        text: pct(top * f).replace(" ", "") }));
    });
    for (var t = 0; t < STEPS; t++) {
      series.forEach(function (s, i) {
        var v = s.values[t] || 0, barH = plotH * v / top;
        var x = left + t * band + (band - barW * series.length) / 2 + i * barW;
        chart.appendChild(svg("rect", { x: x, y: 12 + plotH - barH, width: barW - 1,
          height: barH, fill: s.colour, class: "bar" },
          [tip(stepName(t) + ", " + s.name + ": " + pct(s.values[t]) + " of |SDI|")]));
      });
      chart.appendChild(svg("text", { x: left + (t + 0.5) * band, y: 12 + plotH + 14, class: "axis",
        "text-anchor": "middle", text: data.step_labels[t] }));
    }
    chart.appendChild(svg("text", { x: left + (w - left) / 2, y: h - 4, class: "axis",
      "text-anchor": "middle", text: "query loop step" }));
    var legend = el("p", { class: "legend" }, series.map(function (s) {
      return el("span", { class: "key" }, [
        el("span", { class: "swatch", style: "background:" + s.colour }),
        document.createTextNode(s.name),
      ]);
    }));
    var head = el("tr", {}, ["step", "mean share, most", "mean share, least",
      "queries peaking here"].map(function (c) { return el("th", { scope: "col", text: c }); }));
    var body = [];
    for (var u = 0; u < STEPS; u++) {
      body.push(el("tr", {}, [
        el("th", { scope: "row", text: data.step_labels[u] }),
        el("td", { text: ov.most_share ? pct(ov.most_share[u]) : "n/a" }),
        el("td", { text: ov.least_share ? pct(ov.least_share[u]) : "n/a" }),
        el("td", { text: String(ov.peak_counts[u]) }),
      ]));
    }
    var table = el("table", { class: "numbers overview-table" }, [
      el("caption", { text: "The chart's numbers" }), el("thead", {}, [head]),
      el("tbody", {}, body)]);
    append(box, [el("div", { class: "side-by-side" }, [
      el("figure", {}, [chart, legend]), table])]);
  }

  // ---- one training row: text, TracIn +- SE, trajectory ---------------------------------------
  function trajectory(values, bound, side) {
    var w = 190, h = 46, pad = 5, mid = h / 2;
    var x = function (t) { return STEPS > 1 ? pad + (t * (w - 2 * pad)) / (STEPS - 1) : w / 2; };
    var y = function (v) { return mid - (v / bound) * (mid - pad); };
    var d = "", pen = "M";
    var node = svg("svg", { width: w, height: h, class: "sparkline", role: "img",
      "aria-label": "SDI per loop step: " + values.map(fmt).join(", ") });
    node.appendChild(svg("line", { x1: 0, x2: w, y1: mid, y2: mid, class: "zero" }));
    values.forEach(function (v, t) {
      if (v === null) { pen = "M"; return; }
      d += pen + x(t).toFixed(1) + "," + y(v).toFixed(1);
      pen = "L";
    });
    node.appendChild(svg("path", { d: d, class: "trajectory " + side }));
    values.forEach(function (v, t) {
      if (v === null) return;
      node.appendChild(svg("circle", { cx: x(t), cy: y(v), r: 2.6, class: "point " + side },
        [tip(stepName(t) + ": SDI " + fmt(v))]));
    });
    return node;
  }

  function exampleText(text, cls) {
    return el("div", { class: "text " + cls, title: text, text: text });
  }

  function rowNodes(query, row, rank, side, bound) {
    var cells = [el("td", { class: "rank", text: String(rank + 1) })];
    if (row.train < 0) {
      cells.push(el("td", { colspan: 4, class: "missing",
        text: "no finite score left to rank (see the excluded count above)" }));
      return [el("tr", { class: "row empty", "data-side": side }, cells)];
    }
    var train = data.train[String(row.train)];
    var score = fmt(row.tracin) + (row.se !== null ? " \u00b1 " + fmt(row.se).slice(1) : "");
    cells.push(el("td", { class: "train-id", text: "#" + row.train }));
    cells.push(el("td", {}, [exampleText(train.text, "train-text")]));
    cells.push(el("td", { class: "score", text: score }));
    cells.push(el("td", {}, [trajectory(row.sdi, bound, side)]));
    var nodes = [el("tr", { class: "row", "data-side": side, "data-train": row.train }, cells)];
    var details = el("details", { class: "pair" }, [
      el("summary", { text: (data.has_explanations ?
        "where in the sequences and through which weights" : "SDI per step, as numbers") +
        " (train #" + row.train + ", query " + query.index + ")" })]);
    var draw = function () {  // lazily: a page of closed rows costs no heatmap
      if (details.dataset.drawn) return;
      details.dataset.drawn = "1";
      details.appendChild(pairDetail(query, row, train));
    };
    details.addEventListener("toggle", function () { if (details.open) draw(); });
    if (data.has_explanations && rank === 0 && side === "most") {  // the page opens showing one
      draw();
      details.open = true;
    }
    nodes.push(el("tr", { class: "detail" }, [el("td", { colspan: 5 }, [details])]));
    return nodes;
  }

  // ---- the explained pair: position x step and group x step heatmaps -------------------------
  // Rows of values (one per position or group) x steps; positions get their number beside the
  // token, since tokens repeat.
  function heatmap(title, values, labels, bound, rowName, numbered) {
    var cell = 22, ch = 16, numW = numbered ? 8 + 7 * String(values.length - 1).length : 0;
    var labelW = numW + 8 + 7 * Math.min(16, labels.reduce(function (m, s) {
      return Math.max(m, s.length); }, 2));
    var w = labelW + STEPS * cell + 4, h = 20 + values.length * ch + 4;
    var node = svg("svg", { width: w, height: h, class: "heatmap", role: "img",
      "aria-label": title });
    for (var t = 0; t < STEPS; t++) {
      node.appendChild(svg("text", { x: labelW + (t + 0.5) * cell, y: 14, class: "axis",
        "text-anchor": "middle", text: data.step_labels[t] }));
    }
    values.forEach(function (rowValues, p) {
      var label = labels[p], name = numbered ? rowName + " " + p + " (" + label + ")" :
        rowName + " " + label, y = 20 + p * ch + 12;
      if (numbered) {
        node.appendChild(svg("text", { x: numW - 6, y: y, class: "axis", "text-anchor": "end",
          text: String(p) }));
      }
      node.appendChild(svg("text", { x: labelW - 5, y: y, class: "label", "text-anchor": "end",
        text: label.length > 16 ? label.slice(0, 15) + "\u2026" : label }, [tip(name)]));
      rowValues.forEach(function (v, t) {
        node.appendChild(svg("rect", { x: labelW + t * cell, y: 20 + p * ch, width: cell - 1,
          height: ch - 1, fill: colour(v, bound), class: "cell" },
          [tip(name + ", " + stepName(t) + ": " + fmt(v))]));
      });
    });
    return el("figure", { class: "map" }, [el("figcaption", { text: title }), node]);
  }

  function scaleLegend(bound) {
    var n = config.stops.length, w = 10;
    var node = svg("svg", { width: n * w + 90, height: 34, class: "scale", role: "img",
      "aria-label": "colour scale from " + fmt(-bound) + " (blue) to " + fmt(bound) +
        " (orange)" });
    config.stops.forEach(function (c, i) {
      var v = (-1 + (2 * i) / (n - 1)) * bound;
      node.appendChild(svg("rect", { x: 45 + i * w, y: 2, width: w, height: 12, fill: c },
        [tip(fmt(v))]));
    });
    [[0, fmt(-bound)], [(n * w) / 2, "0"], [n * w, fmt(bound)]].forEach(function (tick) {
      node.appendChild(svg("text", { x: 45 + tick[0], y: 28, class: "axis",
        "text-anchor": "middle", text: tick[1] }));
    });
    return el("div", { class: "legend" }, [node,
      el("span", { text: "share of the pair's SDI (blue: against, orange: for)" })]);
  }

  function positionLabels(tokens, count) {
    var out = [];
    for (var p = 0; p < count; p++) out.push(tokens ? tokens[p] : "");
    return out;
  }

  // A pair's explanation is stored as integers times 10^exp (sdi/report/data.py).
  function unpack(rows, exp) {
    var f = Math.pow(10, Math.abs(exp));  // exact; dividing by it rounds once
    return rows.map(function (r) {
      return r.map(function (v) { return v === null ? null : exp < 0 ? v / f : v * f; });
    });
  }

  // SDI per step, with each group's share when explained: the numbers beside the graphics.
  function stepTable(sdi, byGroup) {
    var groups = byGroup ? data.groups : [];
    var head = el("tr", {}, ["step", "SDI"].concat(groups).map(function (c) {
      return el("th", { scope: "col", text: c }); }));
    var body = sdi.map(function (v, t) {
      return el("tr", {}, [el("th", { scope: "row", text: data.step_labels[t] }),
        el("td", { text: fmt(v) })].concat((byGroup || []).map(function (g) {
          return el("td", { text: fmt(g[t]) }); })));
    });
    var caption = byGroup ? "SDI per step and its parameter-group shares" : "SDI per step";
    return el("table", { class: "numbers steps" }, [el("caption", { text: caption }),
      el("thead", {}, [head]), el("tbody", {}, body)]);
  }

  function pairDetail(query, packed, train) {
    if (packed.pos_train === null) {
      return el("div", { class: "pair-body" }, [stepTable(packed.sdi, null)]);
    }
    var row = { pos_train: unpack(packed.pos_train, packed.exp),
      pos_query: unpack(packed.pos_query, packed.exp), by_group: unpack(packed.by_group, packed.exp) };
    var bound = maxAbs(row.pos_train.concat(row.pos_query, row.by_group), 1e-30);
    var maps = [
      heatmap("train positions \u00d7 query step", row.pos_train,
        positionLabels(train.tokens, row.pos_train.length), bound, "train position", true),
      heatmap("query positions \u00d7 query step", row.pos_query,
        positionLabels(query.tokens, row.pos_query.length), bound, "query position", true),
      heatmap("parameter groups \u00d7 query step", row.by_group, data.groups, bound, "group",
        false),
    ];
    return el("div", { class: "pair-body" }, [
      el("div", { class: "pair-graphics" }, [el("div", { class: "maps" }, maps),
        scaleLegend(bound)]), stepTable(packed.sdi, row.by_group)]);
  }

  // ---- one query -----------------------------------------------------------------------------
  function groupShares(query) {
    if (!data.has_explanations) return null;
    var sums = ["most", "least"].map(function (side) {
      var total = data.groups.map(function () { return 0; });
      query[side].forEach(function (row) {
        unpack(row.by_group || [], row.exp).forEach(function (g, i) {
          total[i] += g.reduce(function (a, v) { return a + (v || 0); }, 0);
        });
      });
      return total;
    });
    var head = el("tr", {}, ["parameter group", "SDI summed, most " + data.k,
      "SDI summed, least " + data.k].map(function (c) {
        return el("th", { scope: "col", text: c }); }));
    var body = data.groups.map(function (g, i) {
      return el("tr", {}, [el("th", { scope: "row", text: g }),
        el("td", { text: fmt(sums[0][i]) }), el("td", { text: fmt(sums[1][i]) })]);
    });
    return el("table", { class: "numbers groups" }, [
      el("caption", { text: "Through which weights (over all steps and rows)" }),
      el("thead", {}, [head]), el("tbody", {}, body)]);
  }

  function sideTable(query, side, bound) {
    var names = { most: "Most influential (largest TracIn)",
      least: "Least influential (smallest TracIn)" };
    var head = el("tr", {}, ["#", "train row", "text", data.has_se ? "TracIn \u00b1 SE" :
      "TracIn", "SDI over loop steps"].map(function (c) {
        return el("th", { scope: "col", text: c }); }));
    var body = el("tbody");
    query[side].forEach(function (row, r) {
      append(body, rowNodes(query, row, r, side, bound));
    });
    return el("table", { class: "rows side-" + side }, [
      el("caption", { class: side, text: names[side] }), el("thead", {}, [head]), body]);
  }

  function drawQuery(query) {
    var bound = maxAbs(query.most.concat(query.least).map(function (r) { return r.sdi; }),
      1e-30);
    var meta = "trajectories share one vertical scale, \u00b1" + fmt(bound).slice(1);
    if (query.n_excluded) {
      meta += "; " + query.n_excluded + " non-finite TracIn score" +
        (query.n_excluded > 1 ? "s" : "") + " not ranked";
    }
    if (!data.has_explanations) {
      meta += "; no explanations in these results (top_influences(..., explain=True) adds " +
        "where in the sequences and through which weights)";
    }
    return el("section", { class: "query", id: "query-" + query.index,
      "data-query": query.index }, [
      el("h2", { text: "Query " + query.index }),
      exampleText(query.text, "query-text"),
      el("p", { class: "meta", text: meta }),
      groupShares(query),
      sideTable(query, "most", bound),
      sideTable(query, "least", bound),
    ]);
  }

  // ---- paging, filtering, the URL hash ---------------------------------------------------------
  function matching() {
    var f = state.filter.trim().toLowerCase();
    if (!f) return data.queries;
    if (/^#\d+$/.test(f)) {
      var j = Number(f.slice(1));
      return data.queries.filter(function (q) { return q.index === j; });
    }
    return data.queries.filter(function (q) { return q.text.toLowerCase().indexOf(f) >= 0; });
  }

  function drawPage() {
    var list = matching();
    var pages = Math.max(1, Math.ceil(list.length / state.size));
    state.page = Math.max(0, Math.min(state.page, pages - 1));
    state.shown = list.slice(state.page * state.size, (state.page + 1) * state.size);
    var main = document.getElementById("queries");
    main.textContent = "";
    append(main, state.shown.map(drawQuery));
    document.getElementById("page-info").textContent = "page " + (state.page + 1) + " of " +
      pages + " (" + list.length + " of " + data.queries.length + " queries)";
    document.getElementById("prev").disabled = state.page === 0;
    document.getElementById("next").disabled = state.page >= pages - 1;
  }

  function readHash() {
    location.hash.replace(/^#/, "").split("&").forEach(function (part) {
      var kv = part.split("="), v = decodeURIComponent(kv[1] || "");
      if (kv[0] === "page") state.page = Math.max(0, Number(v) - 1 || 0);
      if (kv[0] === "size" && Number(v) > 0) state.size = Number(v);
      if (kv[0] === "filter") state.filter = v;
      if (kv[0] === "open") state.openAll = v === "all";
    });
  }

  function drawControls() {
    var filter = el("input", { type: "search", id: "filter", value: state.filter,
      placeholder: "filter: text, or #index", "aria-label": "filter queries" });
    var size = el("select", { id: "page-size", "aria-label": "queries per page" },
      [5, 10, 25, 50, 100].map(function (n) {
        var o = el("option", { value: n, text: n + " per page" });
        if (n === state.size) o.selected = true;
        return o;
      }));
    var prev = el("button", { id: "prev", type: "button", text: "\u2190 previous" });
    var next = el("button", { id: "next", type: "button", text: "next \u2192" });
    var open = el("button", { id: "open-all", type: "button", text: "open all rows" });
    filter.addEventListener("input", function () { state.filter = filter.value; state.page = 0; drawPage(); });
    size.addEventListener("change", function () { state.size = Number(size.value); state.page = 0; drawPage(); });
    prev.addEventListener("click", function () { state.page -= 1; drawPage(); scrollTo(0, 0); });
    next.addEventListener("click", function () { state.page += 1; drawPage(); scrollTo(0, 0); });
    open.addEventListener("click", function () {
      document.querySelectorAll("#queries details.pair").forEach(function (d) { d.open = true; });
    });
    append(document.getElementById("controls"), [filter, size, prev,
      el("span", { id: "page-info" }), next, open]);
  }

  readHash();
  drawOverview();
  drawControls();
  drawPage();
  // "#open=all" opens every row of the page as the button does (their heatmaps draw on "toggle").
  if (state.openAll) document.getElementById("open-all").click();
  document.body.setAttribute("data-rendered", "1");
  // Milliseconds from opening the file to the first page drawn (bench/report/size.py reads it).
  document.body.setAttribute("data-drawn-ms", String(Math.round(performance.now())));
})();
