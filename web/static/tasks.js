// The task form: show the fields of the chosen editor, schedule kind and kind of run, and
// preview the next fire times of the schedule as it is typed (GET tasks.preview, debounced).
(function () {
  "use strict";
  var form = document.getElementById("task-form");
  if (!form) return;

  function checked(name, fallback) {
    var input = form.querySelector('input[name="' + name + '"]:checked');
    return input ? input.value : fallback;
  }

  function field(name) {
    return form.elements.namedItem(name);
  }

  function value(name) {
    var input = field(name);
    return input && input.value ? input.value.trim() : "";
  }

  function showEditor() {
    var editor = checked("editor", "fields");
    form.querySelectorAll("[data-editor]").forEach(function (el) {
      el.hidden = el.getAttribute("data-editor") !== editor;
    });
  }

  function showKinds() {
    var kind = checked("schedule_kind", "cron");
    var runs = checked("run_kind", "command");
    form.querySelectorAll("[data-kinds]").forEach(function (el) {
      el.hidden = el.getAttribute("data-kinds").split(" ").indexOf(kind) < 0;
    });
    form.querySelectorAll("[data-runs]").forEach(function (el) {
      el.hidden = el.getAttribute("data-runs") !== runs;
    });
  }

  // --- preview ---------------------------------------------------------------------------
  var box = document.getElementById("schedule-preview");
  var previewUrl = form.getAttribute("data-preview-url");
  var timer = null;
  var sequence = 0;
  var LABELS = {
    "schedule.cron": "Cron expression",
    "schedule.every": "Every",
    "schedule.timezone": "Time zone",
    "schedule.start": "Start",
    "schedule.end": "End",
    "schedule.between": "Between",
    "schedule.calendar": "Calendar",
    "schedule.calendar.only": "Only on dates of",
    "schedule.calendar.skip": "Never on dates of",
  };

  function clear(el) {
    while (el.firstChild) el.removeChild(el.firstChild);
  }

  function say(text, cls) {
    var p = document.createElement("span");
    p.className = cls || "muted";
    p.textContent = text;
    box.appendChild(p);
  }

  function labelOf(path) {
    var key = (path || "").replace(/\[\d+\]/g, "");
    return LABELS[key] || path;
  }

  function render(answer, ok) {
    clear(box);
    if (!ok) {
      var details = (answer && answer.details) || [];
      if (!details.length) say((answer && answer.error) || "cannot preview this schedule", "field-error");
      details.forEach(function (d) {
        say((d.path ? labelOf(d.path) + ": " : "") + d.message, "field-error");
      });
      return;
    }
    if (!answer.fires.length) {
      say("This schedule does not fire again.");
      return;
    }
    say("Next " + answer.fires.length + " fire times in " + answer.timezone + ":", "zone");
    var list = document.createElement("ol");
    answer.fires.forEach(function (f) {
      var li = document.createElement("li");
      li.textContent = f.local;
      li.title = f.utc;
      if (f.blackout) {
        var note = document.createElement("span");
        note.className = "muted";
        note.textContent = " · skipped: blackout " + f.blackout;
        li.appendChild(note);
      }
      list.appendChild(li);
    });
    box.appendChild(list);
  }

  function preview() {
    if (!box || !previewUrl) return;
    var mine = ++sequence; // an answer to an older request is dropped
    var kind = checked("schedule_kind", "cron");
    if (kind !== "cron" && kind !== "every") {
      clear(box);
      return;
    }
    var main = value(kind);
    if (!main) {
      clear(box);
      return;
    }
    var params = new URLSearchParams();
    params.set(kind, main);
    ["timezone", "start", "end", "between_start", "between_end", "calendar_only", "calendar_skip", "group"].forEach(function (name) {
      if (value(name)) params.set(name, value(name));
    });
    fetch(previewUrl + "?" + params.toString(), {
      headers: { Accept: "application/json" },
      credentials: "same-origin",
    })
      .then(function (r) {
        return r.json().then(function (body) {
          return { ok: r.ok, body: body };
        });
      })
      .then(function (result) {
        if (mine === sequence) render(result.body, result.ok);
      })
      .catch(function () {
        if (mine === sequence) {
          clear(box);
          say("cannot reach the server for a preview", "field-error");
        }
      });
  }

  function schedulePreview() {
    if (timer) clearTimeout(timer);
    timer = setTimeout(preview, 350);
  }

  form.addEventListener("change", function (event) {
    var name = event.target && event.target.name;
    if (name === "editor") showEditor();
    if (name === "schedule_kind" || name === "run_kind") showKinds();
    if (name === "schedule_kind") schedulePreview();
  });
  ["cron", "every", "timezone", "start", "end", "between_start", "between_end", "calendar_only", "calendar_skip", "group"].forEach(function (name) {
    var input = field(name);
    if (input) input.addEventListener("input", schedulePreview);
  });

  showEditor();
  showKinds();
  preview();
})();
