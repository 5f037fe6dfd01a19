// The run page follows a queued or running run: it polls runs.live (live.json) about once a
// second and updates the status, times, duration, exit code, error, the service's progress
// report and the output in place, until the run has finished. The output is sent only when
// it changed (the page passes the digest of the output it shows).
(function () {
  "use strict";
  var page = document.getElementById("run-page");
  if (!page || page.getAttribute("data-going") !== "yes") return;

  var url = page.getAttribute("data-live-url");
  var digest = page.getAttribute("data-digest") || "";
  var interval = parseInt(page.getAttribute("data-interval"), 10) || 1000;
  var note = document.getElementById("live-note");
  var output = document.getElementById("run-output");
  var empty = document.getElementById("run-output-empty");
  var failures = 0;
  var timer = null;

  function text(id, value) {
    var el = document.getElementById(id);
    if (el) el.textContent = value;
  }

  function setLive(name, value) {
    document.querySelectorAll('[data-live="' + name + '"]').forEach(function (el) {
      el.textContent = value === null || value === undefined || value === "" ? "–" : String(value);
    });
  }

  function setStatus(status, cls) {
    document.querySelectorAll('[data-live="status"]').forEach(function (el) {
      el.textContent = status;
      el.className = "badge " + cls;
    });
  }

  function setOutput(value) {
    if (value === null || value === undefined) return; // unchanged since the last answer
    // stay at the bottom if the reader was there; leave them where they are otherwise
    var atBottom = output.scrollTop + output.clientHeight >= output.scrollHeight - 4;
    output.textContent = value; // text, never HTML: output is shown as written
    output.hidden = value === "";
    if (empty) empty.hidden = value !== "";
    if (atBottom) output.scrollTop = output.scrollHeight;
  }

  function setReport(report) {
    var bar = document.getElementById("run-progress");
    if (!bar || !report) return;
    if (report.percent === null) {
      bar.removeAttribute("value"); // indeterminate
      text("run-percent", "–");
    } else {
      bar.value = report.percent;
      text("run-percent", Math.round(report.percent) + " %");
    }
    text("run-report-message", report.message || "");
    text("run-report-updated", report.updated_at ? "reported " + report.updated_at + " UTC" : "");
    var result = document.getElementById("run-result");
    if (result && report.result) {
      result.hidden = false;
      var badge = document.getElementById("run-result-status");
      badge.textContent = report.result.status;
      badge.className = "badge " + (report.result.status === "succeeded" ? "ok" : "bad");
      text("run-result-at", report.result.at + " UTC");
      text("run-result-message", report.result.message || "");
    }
  }

  function finish(message) {
    if (timer) clearTimeout(timer);
    timer = null;
    var kill = document.getElementById("kill-confirm");
    if (kill) kill.hidden = true;
    if (note) {
      note.textContent = message;
      note.hidden = false;
    }
  }

  function apply(data) {
    setStatus(data.status, data.status_class);
    setLive("agent", data.agent);
    setLive("started_at", data.started_at);
    setLive("finished_at", data.finished_at);
    setLive("duration_text", data.duration_text);
    setLive("exit_code", data.exit_code);
    setLive("http_status", data.http_status);
    setLive("error", data.error);
    document.querySelectorAll('[data-live="error"]').forEach(function (el) {
      el.classList.toggle("none", !data.error);
    });
    setOutput(data.output);
    digest = data.output_digest;
    text("run-output-note", data.output_truncated ? "the last 64 KiB" : "");
    setReport(data.report);
  }

  function schedule(delay) {
    timer = setTimeout(function () {
      timer = null;
      poll();
    }, delay);
  }

  function poll() {
    if (document.hidden) {
      schedule(interval); // nobody looks: check again later, and at once when shown
      return;
    }
    fetch(url + "?output=" + encodeURIComponent(digest), {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
      cache: "no-store",
    })
      .then(function (answer) {
        var type = answer.headers.get("Content-Type") || "";
        if (type.indexOf("application/json") < 0) {
          if (answer.redirected && answer.url.indexOf("/login") >= 0) {
            throw { stop: "Live updates stopped: your session ended. Log in again and reload." };
          }
          throw new Error("HTTP " + answer.status);
        }
        return answer.json().then(function (data) {
          if (answer.status === 404) throw { stop: "Live updates stopped: " + data.error };
          if (!answer.ok) throw new Error(data.error || "HTTP " + answer.status);
          return data;
        });
      })
      .then(function (data) {
        failures = 0;
        apply(data);
        if (data.going) {
          schedule(interval);
        } else {
          finish("The run has finished (" + data.status + ").");
        }
      })
      .catch(function (error) {
        if (error && error.stop) {
          finish(error.stop);
          return;
        }
        failures += 1; // the server restarts or the network drops: back off, keep trying
        if (note) note.textContent = "Live updates paused (" + (error.message || error) + "); retrying.";
        schedule(Math.min(interval * Math.pow(2, failures), 10000));
      });
  }

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && timer) {
      clearTimeout(timer); // waiting, not fetching: look now
      timer = null;
      poll();
    }
  });
  schedule(interval);
})();
