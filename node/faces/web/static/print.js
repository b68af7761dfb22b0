// The patient card page: the Print button opens the browser's print dialog (no inline script under the CSP).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const button = document.getElementById("print");
  if (button) button.addEventListener("click", () => window.print());
});
