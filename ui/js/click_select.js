// Click to select: the `js_on_load` of one mask picture's click view (a gr.HTML, ui/click_mask.py).
//
// The server renders the picture with its mask tinted and its clicks marked as
//   <div class="cm" data-w data-h data-ack="N"><img></div>
// and this script only turns a click into picture pixels and a mode, sent with trigger("edit", {...}):
//   click          -> {x, y, mode: ""}          (the mode radio's choice: new object by default)
//   Shift+click    -> {x, y, mode: "add-part"}  (one more part of the current object)
//   Alt+click      -> {x, y, mode: "remove"}    (Option+click on a Mac: take a part off)
// Every click carries `seq`; the server re-renders with data-ack = the last seq it answered (a mask or an error
// in the status line), so a browser test knows when its click was handled. Touch screens have no modifier keys:
// the radio is their way. `element` and `trigger` come from gr.HTML.
let seq = 0;

const box = () => element.querySelector(".cm");
const img = () => element.querySelector(".cm img");

element.addEventListener("click", (e) => {
  const b = box(), picture = img();
  if (!b || !picture || !e.target.closest(".cm img")) return;
  e.preventDefault();
  const r = picture.getBoundingClientRect();
  const w = Number(b.dataset.w), h = Number(b.dataset.h);
  // pixel centres at integers, clamped: a click on the last screen pixel is still on the picture
  const clamp = (v, hi) => Math.min(hi - 1, Math.max(0, v));
  const round = (v) => Math.round(v * 10) / 10;
  const x = round(clamp(((e.clientX - r.left) / r.width) * w - 0.5, w));
  const y = round(clamp(((e.clientY - r.top) / r.height) * h - 0.5, h));
  seq = Math.max(seq, Number(b.dataset.ack || 0)) + 1;
  trigger("edit", { x, y, mode: e.altKey ? "remove" : e.shiftKey ? "add-part" : "", seq });
});
