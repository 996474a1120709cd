"""The web page of `xbt serve`: a caption box and an image drop zone; the old gallery's top results
for the old query, the XBT query and (when a new-model index exists) the new/new query, side by
side with thumbnails from the gallery shards. `/?q=caption` runs a search on load (shareable links,
and what the headless-browser test opens). Plain HTML + fetch, no build step, no external assets.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>xbt serve: old gallery search</title>
<style>
 body { font-family: sans-serif; margin: 16px; background: #fafafa; color: #222; }
 h1 { font-size: 20px; margin: 0 0 8px; }
 #bar { display: flex; gap: 8px; align-items: center; margin-bottom: 12px; }
 #q { flex: 1; font-size: 16px; padding: 6px; }
 #drop { border: 2px dashed #888; padding: 8px 14px; border-radius: 6px; cursor: pointer; }
 #drop.over { background: #e0ecff; }
 #status { color: #555; margin: 6px 0; min-height: 1.2em; }
 #status.error { color: #b00020; font-weight: bold; }
 #cols { display: flex; gap: 12px; align-items: flex-start; }
 .col { flex: 1; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
 .col h2 { font-size: 15px; margin: 0 0 6px; }
 .item { display: flex; gap: 8px; margin: 4px 0; align-items: center; }
 .item img { width: 64px; height: 64px; object-fit: cover; border: 1px solid #ccc; }
 .meta { font-size: 12px; }
 .meta .score { color: #06c; }
</style></head>
<body>
<h1>Old-gallery search: old query vs XBT query vs new/new</h1>
<div id="bar">
 <input id="q" placeholder="type a caption, e.g. a small red circle" autofocus>
 <button id="go">Search</button>
 <label id="drop">drop an image here or click<input id="file" type="file" accept="image/*" hidden></label>
</div>
<div id="status"></div>
<div id="cols"></div>
<script>
const LABELS = {old: "old query \\u2192 old gallery (today)", xbt: "XBT query \\u2192 old gallery (upgrade)",
                new: "new query \\u2192 new gallery (backfilled)"};
const $ = id => document.getElementById(id);
function setStatus(text, error) { $("status").textContent = text; $("status").className = error ? "error" : ""; }
function render(res) {
  const cols = $("cols"); cols.innerHTML = "";
  for (const c of res.columns) {
    const col = document.createElement("div"); col.className = "col"; col.dataset.encoder = c.encoder;
    const h = document.createElement("h2"); h.textContent = LABELS[c.encoder] || c.encoder; col.appendChild(h);
    for (const r of c.results) {
      const it = document.createElement("div"); it.className = "item";
      const img = document.createElement("img"); img.src = "/thumb/" + encodeURIComponent(r.id); img.alt = r.id;
      const m = document.createElement("div"); m.className = "meta";
      m.innerHTML = "<b></b> <span class=score></span><br><span class=cap></span>";
      m.querySelector("b").textContent = "#" + (r.rank + 1) + " " + r.id;
      m.querySelector(".score").textContent = r.score.toFixed(3);
      m.querySelector(".cap").textContent = r.caption || "";
      it.appendChild(img); it.appendChild(m); col.appendChild(it);
    }
    cols.appendChild(col);
  }
  setStatus(res.query_modality + " query, " + res.index + " index, " + res.latency_ms.toFixed(1) + " ms");
  document.body.dataset.done = "1";
}
async function query(body) {
  setStatus("searching...");
  const resp = await fetch("/compare", {method: "POST", headers: {"Content-Type": "application/json"},
                                        body: JSON.stringify(body)});
  const res = await resp.json();
  if (!resp.ok) { setStatus(res.error || ("HTTP " + resp.status), true); document.body.dataset.done = "1"; return; }
  render(res);
}
$("go").onclick = () => query({text: $("q").value});
$("q").addEventListener("keydown", e => { if (e.key === "Enter") query({text: $("q").value}); });
function sendFile(f) { const rd = new FileReader(); rd.onload = () => query({image: rd.result}); rd.readAsDataURL(f); }
$("file").onchange = e => e.target.files[0] && sendFile(e.target.files[0]);
const drop = $("drop");
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) sendFile(e.dataTransfer.files[0]); });
const q0 = new URLSearchParams(location.search).get("q");
if (q0 !== null) { $("q").value = q0; query({text: q0}); }
</script>
</body></html>
"""
