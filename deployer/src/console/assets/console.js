// Muscle console: the pages are rendered by the deployer; this only keeps them live and asks
// before the buttons that cannot be taken back.
"use strict";

// Each [data-live] element is replaced by what the deployer sends on its event stream, whenever
// what it shows changes. The browser reconnects by itself when a stream ends.
for (const element of document.querySelectorAll("[data-live]")) {
  const source = new EventSource(element.dataset.live);
  source.onmessage = (event) => {
    element.innerHTML = event.data;
    document.body.dataset.updated = String(Date.now());
  };
}

// Abort and roll back ask first.
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (form.dataset.confirm && !window.confirm("Really " + form.action.split("/").pop() + "?")) {
    event.preventDefault();
  }
});
