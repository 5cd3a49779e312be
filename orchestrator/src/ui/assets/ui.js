// The live view: one server-sent event per change of the run in progress; this updates the
// graph's node classes and the stage table in place (no library, works offline).
(function () {
  "use strict";
  var head = document.getElementById("live-head");
  if (!window.EventSource) { return; }
  function setPill(el, status) {
    el.className = "pill st-" + status.replace(/ /g, "-");
    el.textContent = status;
  }
  function apply(state) {
    if (!state) { return; }
    var known = document.querySelectorAll("#live-stages tr[data-stage]");
    var same = known.length === state.stages.length;
    for (var i = 0; same && i < known.length; i++) {
      same = known[i].getAttribute("data-stage") === state.stages[i].name;
    }
    // A different run (or none shown yet): draw it anew from the server.
    if (!head || !same || String(state.pid) !== head.getAttribute("data-pid")) { location.reload(); return; }
    state.stages.forEach(function (s) {
      var node = document.querySelector('svg.dag g[data-stage="' + CSS.escape(s.name) + '"]');
      if (node) {
        node.setAttribute("class", "node st-" + s.status.replace(/ /g, "-"));
        var label = node.querySelector("text.status");
        if (label) { label.textContent = s.status; }
      }
      var row = document.querySelector('#live-stages tr[data-stage="' + CSS.escape(s.name) + '"]');
      if (row) {
        setPill(row.querySelector(".pill"), s.status);
        row.querySelector(".message").textContent = s.message || "";
      }
    });
    setPill(document.getElementById("live-status"), state.status);
    document.getElementById("live-count").textContent = state.done + "/" + state.total;
    document.getElementById("live-end").hidden = state.status === "running";
    if (state.run) {
      var link = document.getElementById("live-run");
      link.href = "/runs/" + state.run.slice(0, 12);
      link.textContent = "run " + state.run.slice(0, 12);
    }
    document.body.setAttribute("data-live-updates", String(Number(document.body.getAttribute("data-live-updates") || 0) + 1));
  }
  var source = new EventSource("/live/events");
  source.addEventListener("state", function (e) { apply(JSON.parse(e.data)); });
})();
