// Jobs page: refresh the table every 3 s while a job is queued or running.
(function () {
  "use strict";
  const holder = document.getElementById("jobs-table");
  if (!holder) return;
  async function refresh() {
    const active = holder.querySelector("tr.job-queued, tr.job-running");
    if (active && !holder.contains(document.activeElement)) {
      try {
        const response = await fetch(holder.dataset.refresh, { credentials: "same-origin" });
        if (response.ok) holder.innerHTML = await response.text();
      } catch (err) { /* keep the last table; try again next tick */ }
    }
    window.setTimeout(refresh, 3000);
  }
  window.setTimeout(refresh, 3000);
})();
