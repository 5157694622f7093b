// Live updates of a journey page: the steps recorded after the page was made arrive as
// Server-Sent Events and are added to their stage. Text is set with textContent only, never
// parsed as HTML. Without this script the page is complete as it was rendered.
"use strict";
(function () {
  var live = document.getElementById("live");
  if (!live || !window.EventSource) {
    return;
  }
  var source = new EventSource(live.getAttribute("data-stream"));
  source.addEventListener("open", function () {
    live.hidden = false;
  });
  source.addEventListener("step", function (message) {
    var step = JSON.parse(message.data);
    var list = document.querySelector("#steps-" + step.stage + " ol.timeline");
    if (!list) {
      return;
    }
    var item = document.createElement("li");
    item.className = "step new";
    item.setAttribute("data-kind", step.kind);
    item.setAttribute("data-event", String(step.id));
    var details = document.createElement("details");
    var summary = document.createElement("summary");
    var offset = document.createElement("span");
    offset.className = "offset";
    offset.textContent = step.offset;
    var text = document.createElement("span");
    text.className = "text";
    text.textContent = step.text;
    summary.appendChild(offset);
    summary.appendChild(document.createTextNode(" "));
    summary.appendChild(text);
    details.appendChild(summary);
    if (step.rule) {
      var rule = document.createElement("p");
      rule.className = "rule";
      rule.textContent = "Rule: " + step.rule;
      details.appendChild(rule);
    }
    var kind = document.createElement("p");
    kind.className = "kind";
    kind.textContent = step.kind;
    details.appendChild(kind);
    var evidence = document.createElement("pre");
    evidence.className = "evidence";
    evidence.textContent = step.fields;
    details.appendChild(evidence);
    item.appendChild(details);
    list.appendChild(item);
    var stage = document.getElementById("stage-" + step.stage);
    if (stage) {
      stage.classList.add("reached");
      var count = stage.querySelector(".count");
      var steps = list.querySelectorAll("li.step").length;
      if (count) {
        count.textContent = steps + (steps === 1 ? " step" : " steps");
      }
    }
  });
})();
