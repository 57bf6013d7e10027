// rly portal: play a session recording with asciinema-player (the portal's only script).
// A finished recording is handed to the player as a URL. A live one is followed: the
// page polls /recordings/ID/cast?offset=N, appends the new lines and re-creates the
// player at the newest moment, until the server says the session has ended.
(function () {
  "use strict";
  var el = document.getElementById("player");
  if (!el || !window.AsciinemaPlayer) { return; }
  var url = el.getAttribute("data-cast");
  var opts = { fit: "width", idleTimeLimit: 2, terminalFontSize: "15px" };
  if (el.getAttribute("data-live") !== "1") {
    window.AsciinemaPlayer.create(url, el, Object.assign({ autoPlay: true }, opts));
    return;
  }
  var text = "";
  var offset = 0;
  var player = null;

  function lastTime(cast) {
    var lines = cast.trimEnd().split("\n");
    for (var i = lines.length - 1; i > 0; i--) {
      try { var ev = JSON.parse(lines[i]); if (Array.isArray(ev)) { return ev[0]; } } catch (e) { }
    }
    return 0;
  }

  function show(live) {
    if (player) { player.dispose(); }
    el.textContent = "";
    var at = Math.max(lastTime(text) - 1, 0);
    player = window.AsciinemaPlayer.create({ data: text }, el,
      Object.assign({ autoPlay: true, startAt: at }, opts));
    el.setAttribute("data-live", live ? "1" : "0");
  }

  function poll() {
    fetch(url + "?offset=" + offset, { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        var live = response.headers.get("x-rly-live") === "1";
        offset = parseInt(response.headers.get("x-rly-next-offset") || "0", 10);
        return response.text().then(function (chunk) { return [chunk, live]; });
      })
      .then(function (got) {
        if (got[0]) { text += got[0]; }
        if (got[0] || !got[1]) { if (text) { show(got[1]); } }
        if (got[1]) { window.setTimeout(poll, 2000); }
      })
      .catch(function () { window.setTimeout(poll, 5000); });
  }
  poll();
})();
