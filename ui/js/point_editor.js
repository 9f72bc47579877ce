// The Drag tab's point editor: the `js_on_load` of a gr.HTML component (ui/drag_tab.py).
//
// The server owns the point list. It renders the picture with its points as an <img> inside
//   <div class="pe" data-w data-h data-points='[[x, y], ...]' data-ack="N">
// and this script only turns pointer and key input into edits, sent with trigger('edit', {...}):
//   click on an empty spot               -> {op: "add", x, y}           (the click-click way: handle, then target)
//   Shift+click on an empty spot         -> {op: "pin", x, y}           (a pin: a pair whose target is its handle)
//   press on an empty spot, drag, release -> {op: "pair", hx, hy, tx, ty} (an arrow follows the pointer)
//   press on a point, drag, release       -> {op: "move", i, x, y}
//   right-click a point / Delete key      -> {op: "delete", i}          (the selected point; its pair goes too)
//   Ctrl+Z / Ctrl+Shift+Z (or Ctrl+Y)     -> {op: "undo"} / {op: "redo"}
// Every edit carries `seq`; the server re-renders with data-ack = the last seq it applied, so a
// client (and a browser test) knows when its edit was acknowledged. Coordinates are picture pixels
// (pixel centres at integers), as the engine wants them. `element`, `trigger` and `watch` come from gr.HTML.
const DRAG_PX = 4; // a press that moves less than this (screen px) is a click
const HIT_PX = 12; // how close (screen px) a press must be to a point to grab it
const NS = "http://www.w3.org/2000/svg";
let seq = 0;
let sel = -1; // the selected point (for the Delete key); client-side only
let drag = null; // {i, sx, sy, x0, y0, moved} while a button is down

const box = () => element.querySelector(".pe");
const img = () => element.querySelector(".pe img");
const svg = () => element.querySelector(".pe svg");
const points = () => JSON.parse((box() && box().dataset.points) || "[]");
const size = () => [Number(box().dataset.w), Number(box().dataset.h)];

function send(edit) {
  seq = Math.max(seq, Number((box() && box().dataset.ack) || 0)) + 1;
  trigger("edit", { ...edit, seq });
}

function toPicture(e) {
  // pointer -> picture pixels; the <img> may be shown at any size
  const r = img().getBoundingClientRect();
  const [w, h] = size();
  const clamp = (v, hi) => Math.min(hi - 1, Math.max(0, v));
  const round = (v) => Math.round(v * 10) / 10;
  return [round(clamp(((e.clientX - r.left) / r.width) * w - 0.5, w)),
          round(clamp(((e.clientY - r.top) / r.height) * h - 0.5, h))];
}

function scale() {
  return img().getBoundingClientRect().width / size()[0]; // screen px per picture px
}

function hit(e) {
  // index of the point nearest the pointer within HIT_PX, or -1
  const r = img().getBoundingClientRect();
  const s = scale();
  let best = -1, bestD = HIT_PX;
  points().forEach(([x, y], i) => {
    const d = Math.hypot(r.left + (x + 0.5) * s - e.clientX, r.top + (y + 0.5) * s - e.clientY);
    if (d <= bestD) { best = i; bestD = d; }
  });
  return best;
}

function el(name, attrs) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function draw(live) {
  // the transient layer: the selection ring, and the arrow / point that follows the pointer
  const layer = svg();
  if (!layer) return;
  layer.replaceChildren();
  const [w] = size();
  const r = Math.max(1.5, 0.02 * w);
  const pts = points();
  if (sel >= 0 && sel < pts.length) {
    layer.append(el("circle", { cx: pts[sel][0] + 0.5, cy: pts[sel][1] + 0.5, r: r * 1.8, class: "pe-sel" }));
  }
  if (!live) return;
  const [a, b] = live;
  if (a) layer.append(el("line", { x1: a[0] + 0.5, y1: a[1] + 0.5, x2: b[0] + 0.5, y2: b[1] + 0.5, class: "pe-arrow" }));
  if (a) layer.append(el("circle", { cx: a[0] + 0.5, cy: a[1] + 0.5, r, class: "pe-handle" }));
  layer.append(el("circle", { cx: b[0] + 0.5, cy: b[1] + 0.5, r, class: live[2] ? "pe-handle" : "pe-target" }));
}

function partner(i) {
  // the other end of point i's pair (a handle's target, a target's handle), or null
  const pts = points();
  const j = i % 2 ? i - 1 : i + 1;
  return j < pts.length ? pts[j] : null;
}

element.addEventListener("pointerdown", (e) => {
  if (e.button !== 0 || !img() || !e.target.closest(".pe")) return;
  e.preventDefault();
  e.target.setPointerCapture?.(e.pointerId);
  const i = hit(e);
  drag = { i, sx: e.clientX, sy: e.clientY, start: toPicture(e), moved: false };
  if (i >= 0) { sel = i; draw(); }
});

element.addEventListener("pointermove", (e) => {
  if (!drag) return;
  if (Math.hypot(e.clientX - drag.sx, e.clientY - drag.sy) >= DRAG_PX) drag.moved = true;
  if (!drag.moved) return;
  const p = toPicture(e);
  if (drag.i >= 0) {
    const other = partner(drag.i);
    const isHandle = drag.i % 2 === 0;
    draw(other ? (isHandle ? [p, other, false] : [other, p, false]) : [null, p, true]);
  } else {
    draw([drag.start, p, false]);
  }
});

function finish(e) {
  if (!drag) return;
  const d = drag;
  drag = null;
  const [x, y] = toPicture(e);
  if (!d.moved) {
    if (d.i < 0) { sel = -1; send({ op: e.shiftKey ? "pin" : "add", x, y }); }
    return; // a click on a point only selects it
  }
  if (d.i >= 0) send({ op: "move", i: d.i, x, y });
  else send({ op: "pair", hx: d.start[0], hy: d.start[1], tx: x, ty: y });
  // the drawn arrow stays until the server's re-rendered picture replaces it
}
element.addEventListener("pointerup", finish);
element.addEventListener("pointercancel", () => { drag = null; draw(); });

element.addEventListener("contextmenu", (e) => {
  if (!img() || !e.target.closest(".pe")) return;
  e.preventDefault();
  const i = hit(e);
  if (i >= 0) { sel = -1; send({ op: "delete", i }); }
});

document.addEventListener("keydown", (e) => {
  if (!img() || element.offsetParent === null) return; // no picture, or the Drag tab is hidden
  const t = e.target;
  if (t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName))) return; // typing, not editing
  const key = e.key.toLowerCase();
  const mod = e.ctrlKey || e.metaKey;
  if (mod && key === "z") send({ op: e.shiftKey ? "redo" : "undo" });
  else if (mod && key === "y") send({ op: "redo" });
  else if ((key === "delete" || key === "backspace") && sel >= 0) { send({ op: "delete", i: sel }); sel = -1; }
  else return;
  e.preventDefault();
});

// A new picture from the server (an acknowledged edit, an upload, an example): forget a stale selection.
watch("value", () => { if (sel >= points().length) sel = -1; draw(); });
