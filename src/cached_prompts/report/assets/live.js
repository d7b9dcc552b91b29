"use strict";
// The live page that `cached-prompts watch` serves: the report page plus its live channel
// (server-sent events from /events). Outputs being generated show their text as it comes;
// when the workspace changes the page fetches itself again and changes only what differs,
// in place, so scroll, filter, open sections and the chosen reference card stay as they are.
// Text is only ever set through textContent; new elements come from the server's own page,
// parsed by DOMParser (which runs no script) and adopted node by node.
(function () {
  var toolbar = document.querySelector(".toolbar");
  var status = document.createElement("p");
  status.id = "live-status";
  status.className = "live-status";
  status.setAttribute("role", "status");
  status.textContent = "connecting to the watcher…";
  toolbar.appendChild(status); // in the sticky toolbar: in sight while scrolling

  // ----- outputs being generated ---------------------------------------------------------------
  function cardOf(name) {
    var cards = document.querySelectorAll(".card[data-output], .card[data-missing-output]");
    for (var i = 0; i < cards.length; i++) {
      if (cards[i].dataset.output === name || cards[i].dataset.missingOutput === name) { return cards[i]; }
    }
    return null;
  }
  function liveCard(name) {
    var card = cardOf(name);
    if (!card) { return null; }
    if (!card.classList.contains("live")) {
      card.classList.add("live");
      delete card.dataset.liveDone;
      var pre = document.createElement("pre");
      pre.className = "live-out";
      card.appendChild(pre);
      var rate = document.createElement("span");
      rate.className = "live-rate";
      rate.textContent = "generating…";
      card.querySelector(".card-head").appendChild(rate);
    }
    return card;
  }
  function showText(entry) {
    var card = liveCard(entry.output);
    if (!card) { return; }
    if (entry.text) { card.querySelector("pre.live-out").appendChild(document.createTextNode(entry.text)); }
    card.querySelector(".live-rate").textContent = entry.tokens + " tokens · " + entry.rate.toFixed(1) + " tok/s";
  }
  // A finished (or abandoned) output: the next refresh replaces its card with what the server shows.
  function endLive(name) {
    var card = cardOf(name);
    if (card && card.classList.contains("live")) { card.dataset.liveDone = "true"; }
  }

  // ----- changing the page in place ---------------------------------------------------------------
  function keyOf(node) {
    if (node.nodeType !== 1) { return null; }
    var d = node.dataset;
    if (d.output !== undefined) { return "o:" + d.output; }
    if (d.missingOutput !== undefined) { return "o:" + d.missingOutput; }
    if (d.name !== undefined) { return "i:" + d.kind + ":" + d.name; }
    if (d.group !== undefined) { return "g:" + d.group; }
    return node.id ? "#" + node.id : null;
  }
  // Attributes the page's scripts set, which the server's page does not know.
  var KEPT = { open: true, hidden: true, "data-ref": true, "data-text": true };
  var KEPT_CLASSES = ["ref", "current"];

  function syncAttributes(old, fresh, keptClasses) {
    Array.prototype.slice.call(old.attributes).forEach(function (a) {
      if (!KEPT[a.name] && !fresh.hasAttribute(a.name)) { old.removeAttribute(a.name); }
    });
    Array.prototype.slice.call(fresh.attributes).forEach(function (a) {
      if (KEPT[a.name] && old.tagName === "DETAILS") { return; }
      var value = a.value;
      if (a.name === "class") {
        value = value.split(" ").concat(keptClasses.filter(function (c) { return old.classList.contains(c); }))
          .filter(function (c, i, all) { return c && all.indexOf(c) === i; }).join(" ");
      }
      if (old.getAttribute(a.name) !== value) { old.setAttribute(a.name, value); }
    });
  }

  function morph(old, fresh, changed) {
    if (old.nodeType !== 1) {
      if (old.nodeValue !== fresh.nodeValue) { old.nodeValue = fresh.nodeValue; changed.mark(old); }
      return old;
    }
    if (old.classList.contains("live") && !old.dataset.liveDone) {
      // Still being generated: its marks (stale) change, its streamed text stays.
      syncAttributes(old, fresh, KEPT_CLASSES.concat(["live"]));
      return old;
    }
    if (old.tagName === "PRE" && old.classList.contains("out")) {
      var shown = old.dataset.text !== undefined ? old.dataset.text : old.textContent;
      if (shown === fresh.textContent) { return old; } // marked differences stay
      var copy = document.importNode(fresh, true);
      old.replaceWith(copy);
      changed.mark(copy);
      return copy;
    }
    syncAttributes(old, fresh, KEPT_CLASSES);
    morphChildren(old, fresh, changed);
    return old;
  }

  function morphChildren(old, fresh, changed) {
    var unused = Array.prototype.slice.call(old.childNodes), byKey = {};
    unused.forEach(function (node) { var key = keyOf(node); if (key !== null) { byKey[key] = node; } });
    var wanted = Array.prototype.slice.call(fresh.childNodes).map(function (node) {
      var key = keyOf(node), match = null;
      if (key !== null) { match = byKey[key] || null; }
      else {
        match = unused.filter(function (o) { return keyOf(o) === null && o.nodeName === node.nodeName; })[0] || null;
      }
      if (match && unused.indexOf(match) !== -1 && match.nodeName === node.nodeName) {
        unused.splice(unused.indexOf(match), 1);
        return morph(match, node, changed);
      }
      var made = document.importNode(node, true);
      changed.mark(old);
      return made;
    });
    unused.forEach(function (node) {
      if (node.parentNode === old) { old.removeChild(node); changed.mark(old); }
    });
    wanted.forEach(function (node, index) {
      if (old.childNodes[index] !== node) { old.insertBefore(node, old.childNodes[index] || null); }
    });
  }

  function Changes() { this.items = []; }
  Changes.prototype.mark = function (node) {
    var element = node.nodeType === 1 ? node : node.parentNode;
    var item = element && element.closest ? element.closest("article.item") : null;
    var items = item ? [item] : (element && element.querySelectorAll ? element.querySelectorAll("article.item") : []);
    for (var i = 0; i < items.length; i++) {
      if (this.items.indexOf(items[i]) === -1) { this.items.push(items[i]); }
    }
  };

  var fetching = false, again = false;
  function refresh() {
    if (fetching) { again = true; return; }
    fetching = true;
    fetch(window.location.pathname, { cache: "no-store", credentials: "same-origin" })
      .then(function (response) { return response.text(); })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html"), changed = new Changes();
        ["header.top", "main"].forEach(function (selector) {
          var old = document.querySelector(selector), next = fresh.querySelector(selector);
          if (old && next) { morph(old, next, changed); }
        });
        document.title = fresh.title;
        document.dispatchEvent(new CustomEvent("cp:updated", { detail: { items: changed.items } }));
      })
      .catch(function () { status.textContent = "could not load the page again; is the watcher still running?"; })
      .then(function () {
        fetching = false;
        if (again) { again = false; refresh(); }
      });
  }

  // ----- the live channel ---------------------------------------------------------------------
  function on(source, type, handle) {
    source.addEventListener(type, function (event) { handle(JSON.parse(event.data)); });
  }
  var source = new EventSource("/events");
  on(source, "status", function (data) {
    status.textContent = data.text;
    status.className = "live-status" + (data.problem ? " bad" : "");
  });
  on(source, "refresh", refresh);
  on(source, "started", function (data) { data.outputs.forEach(function (name) { liveCard(name); }); });
  on(source, "text", function (data) { data.outputs.forEach(showText); });
  on(source, "ended", function (data) { data.outputs.forEach(endLive); refresh(); });
  source.addEventListener("open", function () { refresh(); });
  source.addEventListener("error", function () {
    status.textContent = "the watcher does not answer (stopped?); trying again…";
    status.className = "live-status bad";
  });
})();
