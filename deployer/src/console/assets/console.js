// Muscle console: the pages are rendered by the deployer; this only keeps them live and asks
// before the buttons that cannot be taken back.
"use strict";

// Says on the page that what it shows no longer updates.
function stopped(why) {
  if (document.querySelector(".live-stopped")) return;
  const note = document.createElement("p");
  note.className = "live-stopped";
  note.textContent = why;
  document.querySelector("main").prepend(note);
}

// Times the deployer wrote as UTC (time.ago, with data-ms) read as "12s ago", kept current.
function ages() {
  const now = Date.now();
  for (const time of document.querySelectorAll("time.ago[data-ms]")) {
    const s = Math.max(0, Math.round((now - Number(time.dataset.ms)) / 1000));
    if (!time.title) time.title = time.textContent;
    time.textContent = s < 120 ? s + "s ago" : Math.round(s / 60) + " min ago";
  }
}
ages();
setInterval(ages, 1000);

// Each [data-live] element is replaced by what the deployer sends on its event stream, whenever
// what it shows changes. The browser reconnects by itself when a stream ends; a stream that
// says "gone" (the session ended) reloads the page, which then asks to sign in.
for (const element of document.querySelectorAll("[data-live]")) {
  const source = new EventSource(element.dataset.live);
  source.onmessage = (event) => {
    element.innerHTML = event.data;
    ages();
    document.body.dataset.updated = String(Date.now());
  };
  source.addEventListener("gone", () => {
    source.close();
    location.reload();
  });
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) {
      stopped("Live updates stopped: reload the page to see the latest.");
    }
  };
}

// Abort and roll back ask first.
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (form.dataset.confirm && !window.confirm("Really " + form.action.split("/").pop() + "?")) {
    event.preventDefault();
  }
});
