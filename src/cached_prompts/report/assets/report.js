"use strict";
// The report's behaviour: word-level differences between the outputs of one prompt, the
// filter, keyboard navigation. Text is only ever set through textContent, never as HTML.
// The live page (live.js) changes the items in place and then dispatches "cp:updated" on the
// document, with the changed items in `detail.items`: they are compared again with their
// chosen reference (data-ref), and the filter is applied again.
(function () {
  var WORD = /\s+|[\p{L}\p{N}_]+|[^\s\p{L}\p{N}_]/gu;
  var MAX_CELLS = 4000000; // a word-by-word table larger than this falls back to prefix/suffix matching
  var items = Array.prototype.slice.call(document.querySelectorAll("article.item"));
  var groups = Array.prototype.slice.call(document.querySelectorAll("section.group[data-group]"));
  var filter = document.getElementById("filter");
  var onlyAttention = document.getElementById("only-attention");
  var onlyFailing = document.getElementById("only-failing");
  var shown = document.getElementById("shown");
  var noMatch = document.getElementById("no-match");
  var current = -1;

  // ----- word differences ------------------------------------------------------------------
  function words(text) { return text.match(WORD) || []; }
  function isSpace(token) { return /^\s/.test(token); }

  // For each word of `a`, whether it is part of a longest common word sequence with `b`.
  function matchedWords(a, b) {
    var n = a.length, m = b.length, inA = new Array(n).fill(false);
    if (n * m > MAX_CELLS) {
      var p = 0, s = 0;
      while (p < n && p < m && a[p] === b[p]) { inA[p] = true; p++; }
      while (s < n - p && s < m - p && a[n - 1 - s] === b[m - 1 - s]) { inA[n - 1 - s] = true; s++; }
      return inA;
    }
    var width = m + 1, table = new Uint32Array((n + 1) * width);
    for (var i = n - 1; i >= 0; i--) {
      for (var j = m - 1; j >= 0; j--) {
        table[i * width + j] = a[i] === b[j] ? table[(i + 1) * width + j + 1] + 1
          : Math.max(table[(i + 1) * width + j], table[i * width + j + 1]);
      }
    }
    for (var x = 0, y = 0; x < n && y < m;) {
      if (a[x] === b[y]) { inA[x] = true; x++; y++; }
      else if (table[(x + 1) * width + y] >= table[x * width + y + 1]) { x++; }
      else { y++; }
    }
    return inA;
  }

  // Re-renders `pre` with the words that are not in `reference` marked; returns the share of
  // its words that are.
  function markDifferences(pre, tokens, reference) {
    var wordsOnly = tokens.filter(function (t) { return !isSpace(t); });
    var refWords = reference.filter(function (t) { return !isSpace(t); });
    var matched = matchedWords(wordsOnly, refWords);
    var fragment = document.createDocumentFragment(), mark = null, w = 0, pendingSpace = "";
    tokens.forEach(function (token) {
      if (isSpace(token)) { pendingSpace += token; return; }
      var differs = !matched[w++];
      if (differs && mark) { mark.textContent += pendingSpace + token; }
      else {
        if (pendingSpace) { fragment.appendChild(document.createTextNode(pendingSpace)); }
        if (differs) { mark = document.createElement("mark"); mark.className = "d"; mark.textContent = token; fragment.appendChild(mark); }
        else { mark = null; fragment.appendChild(document.createTextNode(token)); }
      }
      pendingSpace = "";
    });
    if (pendingSpace) { fragment.appendChild(document.createTextNode(pendingSpace)); }
    pre.textContent = "";
    pre.appendChild(fragment);
    var same = matched.filter(Boolean).length;
    return wordsOnly.length ? same / wordsOnly.length : (refWords.length ? 0 : 1);
  }

  function compareWith(item, refCard) {
    var cards = Array.prototype.slice.call(item.querySelectorAll(".card[data-output]"));
    var texts = cards.map(function (card) {
      var pre = card.querySelector("pre.out");
      if (pre && pre.dataset.text === undefined) { pre.dataset.text = pre.textContent; }
      return pre ? words(pre.dataset.text) : null;
    });
    var refIndex = cards.indexOf(refCard);
    cards.forEach(function (card, index) {
      var pre = card.querySelector("pre.out"), sim = card.querySelector(".sim");
      card.classList.toggle("ref", index === refIndex);
      if (!pre || texts[refIndex] === null) { return; }
      if (index === refIndex || cards.length < 2) {
        pre.textContent = pre.dataset.text;
        if (sim) { sim.textContent = cards.length < 2 ? "" : "reference"; }
        return;
      }
      var share = markDifferences(pre, texts[index], texts[refIndex]);
      if (sim) { sim.textContent = share === 1 ? "same words" : Math.round(share * 100) + "% same"; }
    });
  }

  // The reference chosen with "compare" (its output's name in data-ref), else the first output.
  function compareWithReference(item) {
    var cards = Array.prototype.slice.call(item.querySelectorAll(".card[data-output]"));
    var chosen = cards.filter(function (card) { return card.dataset.output === item.dataset.ref; })[0];
    var first = cards.filter(function (card) { return card.querySelector("pre.out"); })[0];
    if (chosen || first) { compareWith(item, chosen || first); }
  }
  items.forEach(compareWithReference);
  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest(".ref-button");
    if (!button) { return; }
    var item = button.closest("article.item");
    item.dataset.ref = button.closest(".card").dataset.output;
    compareWith(item, button.closest(".card"));
  });
  document.addEventListener("cp:updated", function (event) {
    var currentItem = current >= 0 ? items[current] : null;
    items = Array.prototype.slice.call(document.querySelectorAll("article.item"));
    groups = Array.prototype.slice.call(document.querySelectorAll("section.group[data-group]"));
    current = currentItem ? items.indexOf(currentItem) : -1;
    (event.detail && event.detail.items || []).forEach(compareWithReference);
    applyFilter();
  });

  // ----- filter ------------------------------------------------------------------------------
  function applyFilter() {
    var needle = filter.value.trim().toLowerCase(), attention = onlyAttention.checked, visible = 0;
    var failing = onlyFailing.checked;
    groups.forEach(function (group) {
      var groupName = (group.dataset.group || "").toLowerCase();
      var groupMatches = needle !== "" && groupName.indexOf(needle) !== -1;
      var groupItems = group.querySelectorAll("article.item"), anyShown = false;
      groupItems.forEach(function (item) {
        var text = groupMatches || needle === "" || item.textContent.toLowerCase().indexOf(needle) !== -1;
        var show = text && (!attention || item.dataset.attention === "true") &&
          (!failing || item.dataset.failing === "true");
        item.hidden = !show;
        if (show) { anyShown = true; visible++; }
      });
      var empty = groupItems.length === 0 && (groupMatches || needle === "") && !attention && !failing;
      group.hidden = !(anyShown || empty);
    });
    var filtering = needle !== "" || attention || failing;
    shown.textContent = filtering ? visible + " of " + items.length + " shown" : "";
    noMatch.hidden = !(filtering && visible === 0);
    if (current >= 0 && items[current].hidden) { setCurrent(-1); }
  }
  filter.addEventListener("input", applyFilter);
  onlyAttention.addEventListener("change", applyFilter);
  onlyFailing.addEventListener("change", applyFilter);

  // ----- keyboard --------------------------------------------------------------------------
  // The item j/k moves to scrolls to just below the sticky toolbar, whose height wraps with the width.
  function noteToolbarHeight() {
    var toolbar = document.querySelector(".toolbar");
    var sticky = getComputedStyle(toolbar).position === "sticky";
    document.documentElement.style.setProperty("--toolbar-height", (sticky ? toolbar.offsetHeight : 0) + "px");
  }
  noteToolbarHeight();
  window.addEventListener("resize", noteToolbarHeight);

  function setCurrent(index) {
    if (current >= 0) { items[current].classList.remove("current"); }
    current = index;
    if (index < 0) { return; }
    var item = items[index];
    item.classList.add("current");
    item.focus({ preventScroll: true });
    item.scrollIntoView({ block: "start" });
  }
  function step(direction) {
    for (var i = current + direction; i >= 0 && i < items.length; i += direction) {
      if (!items[i].hidden) { setCurrent(i); return; }
    }
  }
  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    var target = event.target;
    var typing = target.isContentEditable || /^(TEXTAREA|SELECT)$/.test(target.tagName) ||
      (target.tagName === "INPUT" && !/^(checkbox|radio|button)$/.test(target.type));
    if (event.key === "Escape" && event.target === filter) {
      filter.value = ""; applyFilter(); filter.blur(); event.preventDefault(); return;
    }
    if (typing) { return; }
    if (event.key === "j") { step(1); event.preventDefault(); }
    else if (event.key === "k") { step(-1); event.preventDefault(); }
    else if (event.key === "/") { filter.focus(); filter.select(); event.preventDefault(); }
  });
  applyFilter();
})();
