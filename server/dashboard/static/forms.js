// Scheduling form: add block rows; confirm destructive buttons.
(function () {
  "use strict";
  const add = document.getElementById("add-block");
  if (add) {
    add.addEventListener("click", function () {
      const rows = document.querySelectorAll("#blocks .block-row");
      if (!rows.length || rows.length >= 20) return;
      const row = rows[rows.length - 1].cloneNode(true);
      row.querySelector("select").value = "";
      row.querySelector("input").value = "";
      row.querySelector(".block-n").textContent = (rows.length + 1) + ".";
      add.parentNode.insertBefore(row, add);
    });
  }
  document.querySelectorAll("button[data-confirm]").forEach(function (button) {
    button.addEventListener("click", function (event) {
      if (!window.confirm(button.dataset.confirm)) event.preventDefault();
    });
  });
})();
