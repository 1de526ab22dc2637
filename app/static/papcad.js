// Page behaviour that the Content-Security-Policy allows (no inline handlers): confirmations,
// printing, the cell viewer (enlarge, zoom, pan, native size) and the Grad-CAM class choice.
(() => {
  "use strict";

  // Forms that change something hard to take back ask first: <form data-confirm="question">.
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (e) => {
      if (!window.confirm(form.dataset.confirm)) e.preventDefault();
    });
  });

  const printButton = document.getElementById("print-button");
  if (printButton) printButton.addEventListener("click", () => window.print());

  // Grad-CAM for any class: <select id="heatmap-class"> swaps the overlay's source.
  const heat = document.getElementById("heatmap");
  const heatClass = document.getElementById("heatmap-class");
  if (heat && heatClass) {
    heatClass.addEventListener("change", () => {
      const url = new URL(heat.src, location.href);
      url.searchParams.set("class", heatClass.value);
      heat.src = url.pathname + url.search;
      heat.alt = "Grad-CAM heatmap for " + heatClass.options[heatClass.selectedIndex].text;
    });
  }

  // The cell viewer: one <dialog> for the page, opened by a click (or Enter) on an img.zoomable.
  let viewer = null;
  function buildViewer() {
    const dialog = document.createElement("dialog");
    dialog.className = "viewer";
    dialog.id = "cell-viewer";
    dialog.setAttribute("aria-label", "Cell viewer");
    dialog.innerHTML =
      '<div class="viewer-bar">' +
      '<button type="button" class="secondary" data-zoom="in" title="Zoom in (+)">+</button>' +
      '<button type="button" class="secondary" data-zoom="out" title="Zoom out (-)">−</button>' +
      '<button type="button" class="secondary" data-zoom="native" title="Native size, one image pixel per screen pixel (1)">1:1</button>' +
      '<button type="button" class="secondary" data-zoom="fit" title="Fit the window (0)">Fit</button>' +
      '<label class="inline"><input type="checkbox" data-heat> Grad-CAM</label>' +
      '<span class="muted" data-scale></span>' +
      '<button type="button" data-close>Close</button></div>' +
      '<div class="viewer-stage"><img alt="" draggable="false"><img alt="" draggable="false" hidden></div>';
    document.body.appendChild(dialog);
    const stage = dialog.querySelector(".viewer-stage");
    const [img, overlay] = dialog.querySelectorAll(".viewer-stage img");
    const scaleText = dialog.querySelector("[data-scale]");
    const heatBox = dialog.querySelector("[data-heat]");
    const state = { scale: 1, x: 0, y: 0, w: 1, h: 1 };

    function apply() {
      const t = `translate(${state.x}px, ${state.y}px) scale(${state.scale})`;
      img.style.transform = t;
      overlay.style.transform = t;
      img.classList.toggle("pixelated", state.scale >= 3);
      scaleText.textContent = `${state.w}×${state.h} px · ${Math.round(state.scale * 100)} %`;
    }
    function zoomAt(factor, cx, cy) {
      const next = Math.min(32, Math.max(0.05, state.scale * factor));
      const f = next / state.scale;
      state.x = cx - (cx - state.x) * f;
      state.y = cy - (cy - state.y) * f;
      state.scale = next;
      apply();
    }
    function centre(scale) {
      const r = stage.getBoundingClientRect();
      state.scale = scale;
      state.x = (r.width - state.w * scale) / 2;
      state.y = (r.height - state.h * scale) / 2;
      apply();
    }
    function fit() {
      const r = stage.getBoundingClientRect();
      centre(Math.min(r.width / state.w, r.height / state.h) * 0.95);
    }
    dialog.addEventListener("click", (e) => {
      const button = e.target.closest("button");
      if (!button) return;
      const r = stage.getBoundingClientRect();
      if (button.dataset.zoom === "in") zoomAt(1.5, r.width / 2, r.height / 2);
      else if (button.dataset.zoom === "out") zoomAt(1 / 1.5, r.width / 2, r.height / 2);
      else if (button.dataset.zoom === "native") centre(1);
      else if (button.dataset.zoom === "fit") fit();
      else if ("close" in button.dataset) dialog.close();
    });
    dialog.addEventListener("keydown", (e) => {
      const r = stage.getBoundingClientRect();
      if (e.key === "+" || e.key === "=") zoomAt(1.5, r.width / 2, r.height / 2);
      else if (e.key === "-") zoomAt(1 / 1.5, r.width / 2, r.height / 2);
      else if (e.key === "1") centre(1);
      else if (e.key === "0") fit();
      else return;
      e.preventDefault();
      e.stopPropagation();
    });
    stage.addEventListener("wheel", (e) => {
      e.preventDefault();
      const r = stage.getBoundingClientRect();
      zoomAt(e.deltaY < 0 ? 1.2 : 1 / 1.2, e.clientX - r.left, e.clientY - r.top);
    }, { passive: false });
    let drag = null;
    stage.addEventListener("pointerdown", (e) => {
      drag = { id: e.pointerId, x: e.clientX - state.x, y: e.clientY - state.y };
      stage.setPointerCapture(e.pointerId);
      stage.classList.add("dragging");
    });
    stage.addEventListener("pointermove", (e) => {
      if (!drag || drag.id !== e.pointerId) return;
      state.x = e.clientX - drag.x;
      state.y = e.clientY - drag.y;
      apply();
    });
    const endDrag = () => { drag = null; stage.classList.remove("dragging"); };
    stage.addEventListener("pointerup", endDrag);
    stage.addEventListener("pointercancel", endDrag);
    heatBox.addEventListener("change", () => { overlay.hidden = !heatBox.checked; });
    overlay.style.opacity = "0.5";

    return {
      dialog,
      open(source) {
        state.w = Number(source.dataset.width) || source.naturalWidth || 1;
        state.h = Number(source.dataset.height) || source.naturalHeight || 1;
        img.src = source.dataset.full || source.src;
        img.alt = source.alt;
        const heatSrc = heat ? heat.getAttribute("src") : source.dataset.heatmap;
        heatBox.parentElement.hidden = !heatSrc;
        overlay.src = heatSrc || "";
        overlay.hidden = !heatBox.checked;
        img.style.width = overlay.style.width = state.w + "px";
        img.style.height = overlay.style.height = state.h + "px";
        dialog.showModal();
        fit();
      },
    };
  }
  document.querySelectorAll("img.zoomable").forEach((source) => {
    source.tabIndex = 0;
    source.setAttribute("role", "button");
    source.title = source.title || "Enlarge: zoom, pan, native size";
    const open = () => { viewer = viewer || buildViewer(); viewer.open(source); };
    source.addEventListener("click", open);
    source.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); e.stopPropagation(); open(); }
    });
  });
})();
