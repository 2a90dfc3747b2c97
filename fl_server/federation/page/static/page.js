// The page's live parts: every element with data-live="/part/..." is fetched again every data-refresh seconds
// (set on <body>) and its content replaced. Nothing else runs here; the page reads fine without it.
"use strict";
(() => {
  const every = Math.max(0.5, parseFloat(document.body.dataset.refresh || "2")) * 1000;
  const refresh = async (el) => {
    try {
      const answer = await fetch(el.dataset.live, { credentials: "same-origin", cache: "no-store" });
      if (answer.status === 401) {
        el.dataset.state = "signed-out"; // the token changed: a person opens the URL the server printed again
        return false;
      }
      if (!answer.ok) {
        el.dataset.state = "error";
        return true;
      }
      el.innerHTML = await answer.text();
      el.dataset.state = "live";
    } catch (err) {
      el.dataset.state = "offline"; // the page server is not answering: the last view stays
    }
    return true;
  };
  for (const el of document.querySelectorAll("[data-live]")) {
    const tick = async () => {
      if (await refresh(el)) setTimeout(tick, every);
    };
    setTimeout(tick, every);
  }
})();
