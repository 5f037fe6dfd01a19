// The task page's trend chart: duration per run over time, one point per run coloured by its
// status. Drag across a time range to zoom in; double-click or "Reset zoom" to go back; hover
// a point for its details, click it to open the run. No library: a plain canvas.
// The element #trend holds the canvas and gets data-points="<points drawn>" after each draw.
(function () {
  "use strict";
  var root = document.getElementById("trend");
  if (!root) return;
  var canvas = root.querySelector("canvas");
  var resetButton = document.getElementById("trend-reset");
  var ctx = canvas.getContext("2d");

  var COLORS = {
    succeeded: "#1f8a4c",
    failed: "#c0352b",
    timed_out: "#e8870e",
    missed: "#98a2b3",
    lost: "#98a2b3",
    killed: "#7a3fc2",
  };
  var OTHER = "#2f6fde";
  var LEGEND = [
    ["succeeded", COLORS.succeeded],
    ["failed", COLORS.failed],
    ["timed out", COLORS.timed_out],
    ["missed / lost", COLORS.missed],
    ["killed", COLORS.killed],
    ["other", OTHER],
  ];
  var PAD = { left: 58, right: 14, top: 30, bottom: 30 };
  var HEIGHT = 280;
  var TIME_STEPS = [
    1e3, 5e3, 15e3, 30e3, 60e3, 300e3, 900e3, 1800e3, 3600e3, 3 * 3600e3, 6 * 3600e3,
    12 * 3600e3, 86400e3, 2 * 86400e3, 7 * 86400e3, 14 * 86400e3, 30 * 86400e3, 91 * 86400e3,
    182 * 86400e3, 365 * 86400e3,
  ];

  var points = [];
  var loaded = false;
  var failed = "";
  var view = null; // [t0, t1] when zoomed in
  var drag = null; // {x0, x1} in canvas pixels while selecting
  var layout = null; // what the last draw used, to map pixels back to times
  var tip = document.createElement("div");
  tip.className = "trend-tip";
  tip.hidden = true;
  root.appendChild(tip);

  function colorOf(status) {
    return COLORS[status] || OTHER;
  }

  function pad2(n) {
    return (n < 10 ? "0" : "") + n;
  }

  function formatTime(ms, step, span) {
    var d = new Date(ms);
    var date = d.getUTCFullYear() + "-" + pad2(d.getUTCMonth() + 1) + "-" + pad2(d.getUTCDate());
    var clock = pad2(d.getUTCHours()) + ":" + pad2(d.getUTCMinutes());
    if (step >= 86400e3) return date;
    if (step < 60e3) clock += ":" + pad2(d.getUTCSeconds());
    return span > 86400e3 ? date.slice(5) + " " + clock : clock;
  }

  function formatDuration(s) {
    if (s === null || s === undefined) return "–";
    if (s < 10) return s.toFixed(2) + " s";
    if (s < 60) return s.toFixed(1) + " s";
    if (s < 3600) return Math.floor(s / 60) + "m" + pad2(Math.round(s % 60)) + "s";
    return Math.floor(s / 3600) + "h" + pad2(Math.floor((s % 3600) / 60)) + "m";
  }

  var DURATION_STEPS = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600,
    900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800,
  ];

  function durationStep(top, count) {
    for (var i = 0; i < DURATION_STEPS.length; i++) {
      if (top / DURATION_STEPS[i] <= count) return DURATION_STEPS[i];
    }
    return DURATION_STEPS[DURATION_STEPS.length - 1];
  }

  function durationLabel(s) {
    if (s === 0) return "0";
    if (s < 1) return Math.round(s * 1000) + "ms";
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m" + (s % 60 ? pad2(s % 60) + "s" : "");
    if (s < 86400) return Math.floor(s / 3600) + "h" + (s % 3600 ? pad2(Math.floor((s % 3600) / 60)) + "m" : "");
    return Math.floor(s / 86400) + "d" + (s % 86400 ? Math.floor((s % 86400) / 3600) + "h" : "");
  }

  function fullRange() {
    var t0 = points[0].t;
    var t1 = points[points.length - 1].t;
    if (t1 - t0 < 60e3) {
      t0 -= 30 * 60e3;
      t1 += 30 * 60e3;
    }
    var margin = (t1 - t0) * 0.02;
    return [t0 - margin, t1 + margin];
  }

  function size() {
    var ratio = window.devicePixelRatio || 1;
    var width = canvas.clientWidth || 600;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(HEIGHT * ratio);
    canvas.style.height = HEIGHT + "px";
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    return width;
  }

  function message(text, width) {
    ctx.fillStyle = "#667085";
    ctx.font = "15px system-ui, sans-serif";
    ctx.textAlign = "center";
    ctx.fillText(text, width / 2, HEIGHT / 2);
  }

  function drawLegend(width) {
    ctx.font = "12px system-ui, sans-serif";
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    var x = PAD.left;
    LEGEND.forEach(function (entry) {
      ctx.fillStyle = entry[1];
      ctx.beginPath();
      ctx.arc(x + 5, 12, 5, 0, Math.PI * 2);
      ctx.fill();
      ctx.fillStyle = "#1d2430";
      ctx.fillText(entry[0], x + 14, 12);
      x += 24 + ctx.measureText(entry[0]).width;
    });
    ctx.fillStyle = "#667085";
    ctx.textAlign = "right";
    ctx.fillText("UTC", width - PAD.right, 12);
  }

  function draw() {
    var width = size();
    ctx.clearRect(0, 0, width, HEIGHT);
    layout = null;
    if (!loaded) {
      message(failed || "Loading…", width);
      return;
    }
    if (!points.length) {
      message("No runs yet", width);
      root.setAttribute("data-points", "0");
      return;
    }
    var range = view || fullRange();
    var t0 = range[0];
    var t1 = range[1];
    var visible = points.filter(function (p) {
      return p.t >= t0 && p.t <= t1;
    });
    var top = 0;
    visible.forEach(function (p) {
      if (p.d !== null && p.d > top) top = p.d;
    });
    var yStep = durationStep(top > 0 ? top * 1.08 : 1, 5);
    var yMax = Math.max(yStep, Math.ceil((top * 1.08) / yStep) * yStep);
    var plot = {
      x: PAD.left,
      y: PAD.top,
      w: Math.max(10, width - PAD.left - PAD.right),
      h: HEIGHT - PAD.top - PAD.bottom,
    };
    function px(t) {
      return plot.x + ((t - t0) / (t1 - t0)) * plot.w;
    }
    function py(d) {
      return plot.y + plot.h - ((d || 0) / yMax) * plot.h;
    }
    layout = { plot: plot, t0: t0, t1: t1, px: px, py: py, visible: visible };

    // grid and axes
    ctx.strokeStyle = "#eef0f3";
    ctx.fillStyle = "#667085";
    ctx.lineWidth = 1;
    ctx.font = "11px system-ui, sans-serif";
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (var k = 0; k * yStep <= yMax + yStep / 2; k++) {
      var v = Number((k * yStep).toPrecision(12));
      var y = Math.round(py(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(plot.x, y);
      ctx.lineTo(plot.x + plot.w, y);
      ctx.stroke();
      ctx.fillText(durationLabel(v), plot.x - 6, y);
    }
    var span = t1 - t0;
    var step = TIME_STEPS[TIME_STEPS.length - 1];
    for (var i = 0; i < TIME_STEPS.length; i++) {
      if (span / TIME_STEPS[i] <= Math.max(2, plot.w / 110)) {
        step = TIME_STEPS[i];
        break;
      }
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (var t = Math.ceil(t0 / step) * step; t <= t1; t += step) {
      var x = Math.round(px(t)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(x, plot.y);
      ctx.lineTo(x, plot.y + plot.h);
      ctx.stroke();
      ctx.fillText(formatTime(t, step, span), x, plot.y + plot.h + 6);
    }
    ctx.strokeStyle = "#d0d5dd";
    ctx.strokeRect(plot.x + 0.5, plot.y + 0.5, plot.w, plot.h);

    // points: filled when the run has a duration, hollow on the axis when it has none
    ctx.save();
    ctx.beginPath();
    ctx.rect(plot.x, plot.y - 6, plot.w, plot.h + 12);
    ctx.clip();
    visible.forEach(function (p) {
      var color = colorOf(p.s);
      ctx.beginPath();
      ctx.arc(px(p.t), py(p.d), 3.5, 0, Math.PI * 2);
      if (p.d === null) {
        ctx.strokeStyle = color;
        ctx.lineWidth = 1.5;
        ctx.stroke();
      } else {
        ctx.fillStyle = color;
        ctx.fill();
      }
    });
    ctx.restore();

    if (drag) {
      var a = Math.max(plot.x, Math.min(drag.x0, drag.x1));
      var b = Math.min(plot.x + plot.w, Math.max(drag.x0, drag.x1));
      ctx.fillStyle = "rgba(47, 111, 222, 0.15)";
      ctx.fillRect(a, plot.y, b - a, plot.h);
      ctx.strokeStyle = "rgba(47, 111, 222, 0.6)";
      ctx.strokeRect(a + 0.5, plot.y + 0.5, b - a, plot.h);
    }
    drawLegend(width);
    if (!visible.length) message("No runs in this range", width);
    root.setAttribute("data-points", String(visible.length));
    if (resetButton) resetButton.hidden = !view;
  }

  function canvasX(event) {
    return event.clientX - canvas.getBoundingClientRect().left;
  }

  function canvasY(event) {
    return event.clientY - canvas.getBoundingClientRect().top;
  }

  function timeAt(x) {
    var plot = layout.plot;
    var clamped = Math.max(plot.x, Math.min(plot.x + plot.w, x));
    return layout.t0 + ((clamped - plot.x) / plot.w) * (layout.t1 - layout.t0);
  }

  function nearest(x, y) {
    if (!layout) return null;
    var best = null;
    var bestDistance = 64; // 8 px squared
    layout.visible.forEach(function (p) {
      var dx = layout.px(p.t) - x;
      var dy = layout.py(p.d) - y;
      var distance = dx * dx + dy * dy;
      if (distance <= bestDistance) {
        best = p;
        bestDistance = distance;
      }
    });
    return best;
  }

  function showTip(point, x, y) {
    if (!point) {
      tip.hidden = true;
      return;
    }
    tip.textContent =
      point.s + " · " + new Date(point.t).toISOString().replace("T", " ").slice(0, 19) +
      " UTC · " + formatDuration(point.d);
    tip.hidden = false;
    var left = Math.min(x + 12, canvas.clientWidth - tip.offsetWidth - 4);
    tip.style.left = Math.max(0, left) + "px";
    tip.style.top = Math.max(0, y - 30) + "px";
  }

  function resetZoom() {
    view = null;
    draw();
  }

  var pending = false;
  function redrawSoon() {
    if (pending) return;
    pending = true;
    window.requestAnimationFrame(function () {
      pending = false;
      draw();
    });
  }

  canvas.addEventListener("mousedown", function (event) {
    if (!layout || event.button !== 0) return;
    event.preventDefault();
    var x = canvasX(event);
    drag = { x0: x, x1: x };
    tip.hidden = true;
  });
  window.addEventListener("mousemove", function (event) {
    if (drag) {
      drag.x1 = canvasX(event);
      redrawSoon();
    } else if (event.target === canvas) {
      showTip(nearest(canvasX(event), canvasY(event)), canvasX(event), canvasY(event));
    }
  });
  window.addEventListener("mouseup", function (event) {
    if (!drag) return;
    var selection = drag;
    drag = null;
    if (Math.abs(selection.x1 - selection.x0) > 4) {
      var a = timeAt(Math.min(selection.x0, selection.x1));
      var b = timeAt(Math.max(selection.x0, selection.x1));
      if (b - a >= 1) view = [a, b];
      draw();
      return;
    }
    draw();
    var hit = event.target === canvas && nearest(canvasX(event), canvasY(event));
    var template = root.getAttribute("data-run-url");
    if (hit && template) window.location.href = template.replace("RUN_ID", encodeURIComponent(hit.id));
  });
  canvas.addEventListener("mouseleave", function () {
    tip.hidden = true;
  });
  canvas.addEventListener("dblclick", resetZoom);
  if (resetButton) resetButton.addEventListener("click", resetZoom);
  window.addEventListener("resize", redrawSoon);

  draw();
  fetch(root.getAttribute("data-url"), {
    headers: { Accept: "application/json" },
    credentials: "same-origin",
  })
    .then(function (r) {
      if (!r.ok) throw new Error("the server answered " + r.status);
      return r.json();
    })
    .then(function (body) {
      points = (body.points || []).slice().sort(function (a, b) {
        return a.t - b.t;
      });
      loaded = true;
      draw();
    })
    .catch(function (e) {
      failed = "Cannot load the runs: " + e.message;
      draw();
    });
})();
