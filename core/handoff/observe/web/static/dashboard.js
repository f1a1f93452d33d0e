// handoff dashboard: live updates over server-sent events, and nothing else.
// The page names its topic (body[data-topic]); each event carries {region id: HTML},
// rendered and escaped by the server, and replaces the sections that changed.
(function () {
  "use strict";
  var topic = document.body.getAttribute("data-topic");
  var live = document.getElementById("live");
  if (!topic || !window.EventSource) {
    if (live) live.textContent = "";
    return;
  }
  var shown = {};
  var updates = 0;

  function status(text, on) {
    if (!live) return;
    live.textContent = text;
    live.className = "live " + (on ? "on" : "off");
  }

  function busy(element) {
    // Someone is typing in a form of this region: update it once they leave it.
    var active = document.activeElement;
    return active && active !== document.body && element.contains(active) &&
      (active.tagName === "INPUT" || active.tagName === "SELECT" ||
       active.tagName === "TEXTAREA");
  }

  function openDetails(element) {
    // Tracebacks being read stay open across an update.
    return Array.prototype.map.call(element.querySelectorAll("[data-dead] details[open]"),
      function (d) { return d.closest("[data-dead]").getAttribute("data-dead"); });
  }

  function replace(element, html) {
    var open = openDetails(element);
    element.innerHTML = html;
    open.forEach(function (key) {
      var details = element.querySelector('[data-dead="' + CSS.escape(key) + '"] details');
      if (details) details.open = true;
    });
  }

  var source = new EventSource("/events/" + topic);
  source.addEventListener("open", function () { status("live", true); });
  source.addEventListener("error", function () { status("reconnecting…", false); });
  source.addEventListener("regions", function (event) {
    var regions = JSON.parse(event.data);
    if (regions._error) {
      status(regions._error, false);
      return;
    }
    status("live", true);
    Object.keys(regions).forEach(function (id) {
      var element = document.getElementById(id);
      if (!element || shown[id] === regions[id] || busy(element)) return;
      replace(element, regions[id]);
      shown[id] = regions[id];
    });
    updates += 1;
    document.body.setAttribute("data-updates", String(updates));
  });
})();
