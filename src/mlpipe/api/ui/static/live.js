// The Overview's live feed: result events from /v1/events (Server-Sent Events). The login
// cookie authenticates the stream; EventSource reconnects by itself and sends Last-Event-ID.
(function () {
  "use strict";
  var status = document.getElementById("feed-status");
  var feed = document.getElementById("feed");
  if (!status || !feed || !window.EventSource) { return; }
  var MAX_ITEMS = 50;
  var source = new EventSource(status.getAttribute("data-src"));

  function show(kind, event) {
    var body;
    try { body = JSON.parse(event.data); } catch (e) { return; }
    var item = document.createElement("li");
    item.className = kind;
    var when = new Date((body.occurredAt || Date.now() / 1000) * 1000);
    var time = document.createElement("time");
    time.textContent = when.toISOString().slice(11, 19);
    var tag = document.createElement("span");
    tag.className = "tag " + kind;
    tag.textContent = kind;
    var link = document.createElement("a");
    link.href = "/ui/workflows/" + encodeURIComponent(body.shareId || "");
    link.textContent = body.shareId || "?";
    var what = document.createElement("span");
    what.className = "muted";
    what.textContent = " " + (body.taskType || "") + (body.reason ? " · " + body.reason : "");
    item.append(time, " ", tag, " ", link, what);
    feed.insertBefore(item, feed.firstChild);
    while (feed.children.length > MAX_ITEMS) { feed.removeChild(feed.lastChild); }
  }

  source.addEventListener("open", function () { status.textContent = "live"; });
  source.addEventListener("error", function () { status.textContent = "reconnecting…"; });
  source.addEventListener("completed", function (e) { show("completed", e); });
  source.addEventListener("failed", function (e) { show("failed", e); });
  source.addEventListener("gap", function () { status.textContent = "live (some events were missed)"; });
})();
