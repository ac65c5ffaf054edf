// Live preview for the Concept EM nodes: while EM Token Step or Joint Finetune runs, show the
// current masks over the image and the loss curve on the node, fed by "concept_em.progress"
// messages that the Python nodes send through ComfyUI's PromptServer. The pack's warnings (a concept
// DenseCRF removed, an empty mask's fallback; "concept_em.warning") and a resumed run's note are shown as
// toasts.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const WATCHED = new Set(["ConceptEM_EMTokenStep", "ConceptEM_JointFinetune"]);

function drawCurve(losses, width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#111";
  ctx.fillRect(0, 0, width, height);
  if (losses.length > 1) {
    const lo = Math.min(...losses), hi = Math.max(...losses), span = hi - lo || 1;
    ctx.strokeStyle = "#4fc3f7";
    ctx.beginPath();
    losses.forEach((v, i) => {
      const x = (i / (losses.length - 1)) * (width - 8) + 4;
      const y = height - 4 - ((v - lo) / span) * (height - 8);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
    ctx.fillStyle = "#ddd";
    ctx.font = "10px sans-serif";
    ctx.fillText(`loss ${losses[losses.length - 1].toFixed(4)}`, 6, 12);
  }
  return canvas;
}

// Joint Finetune's learning_rate 0 means "auto" (2e-6 for full weights, 1e-4 for LoRA), which a FLOAT
// widget would draw as 0.000000. The widget draws "auto (...)" for 0, and its label says 0 is auto
// wherever the value's text cannot be replaced (other front-end versions, Vue nodes).
function getterIn(obj, name) {
  for (let o = obj; o; o = Object.getPrototypeOf(o)) {
    const d = Object.getOwnPropertyDescriptor(o, name);
    if (d) return d;
  }
  return null;
}

function showAutoLearningRate(node) {
  const lr = node.widgets?.find((w) => w.name === "learning_rate");
  if (!lr) return;
  const auto = () => {
    const mode = node.widgets?.find((w) => w.name === "mode")?.value;
    return mode === "full" ? "auto (2e-6)" : "auto (1e-4)";
  };
  lr.label = "learning_rate (0 = auto)";
  const display = getterIn(lr, "_displayValue");
  if (display?.get) {
    Object.defineProperty(lr, "_displayValue", {
      configurable: true,
      get() {
        return Number(this.value) === 0 && !this.computedDisabled ? auto() : display.get.call(this);
      },
    });
  }
  const format = getterIn(lr, "formatDisplayValue");
  if (typeof format?.value === "function") {
    lr.formatDisplayValue = function (...args) {
      return Number(this.value) === 0 ? auto() : format.value.apply(this, args);
    };
  }
}

// The front end's toast (app.extensionManager.toast, front end 1.3 and later), else an older
// front end's dialog, else the console; never throws on a message with fields missing.
function notify(severity, summary, detail) {
  const text = String(detail ?? "");
  try {
    const toast = app.extensionManager?.toast;
    if (toast?.add) {
      toast.add({ severity, summary, detail: text, life: severity === "warn" ? 15000 : 6000 });
      return;
    }
  } catch (e) { /* fall through */ }
  (severity === "warn" ? console.warn : console.info)(`[concept_em] ${summary}: ${text}`);
  if (severity === "warn" && app.ui?.dialog?.show) {
    const div = document.createElement("div");
    div.textContent = `${summary}: ${text}`;
    app.ui.dialog.show(div);
  }
}

function nodeTitle(detail) {
  const raw = detail?.node == null ? "" : String(detail.node);
  const node = raw ? app.graph?.getNodeById?.(/^\d+$/.test(raw) ? Number(raw) : raw) : null;
  const name = node?.title || detail?.class || "Concept EM";
  return raw ? `${name} #${raw}` : name;
}

app.registerExtension({
  name: "concept_em.live_preview",
  setup() {
    api.addEventListener("concept_em.warning", ({ detail }) => {
      const messages = Array.isArray(detail?.messages) ? detail.messages : [detail?.message ?? detail?.messages];
      for (const m of messages.filter((m) => m != null && m !== "")) notify("warn", nodeTitle(detail), m);
    });
    api.addEventListener("concept_em.progress", ({ detail }) => {
      if (detail?.note) notify("info", nodeTitle(detail), detail.note);
      // Plain ids are numbers; ids of nodes inside subgraphs look like "5:12".
      const raw = String(detail.node);
      const node = app.graph.getNodeById(/^\d+$/.test(raw) ? Number(raw) : raw);
      if (!node || !WATCHED.has(node.comfyClass)) return;
      node.conceptEm = node.conceptEm || {};
      node.conceptEm.losses = detail.losses || [];
      node.conceptEm.step = `${detail.step}/${detail.total}`;
      if (detail.masks) {
        const img = new Image();
        img.onload = () => {
          node.imgs = [img];
          app.graph.setDirtyCanvas(true, true);
        };
        img.src = `data:image/png;base64,${detail.masks}`;
      }
      app.graph.setDirtyCanvas(true, true);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!WATCHED.has(nodeData.name)) return;
    if (nodeData.name === "ConceptEM_JointFinetune") {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = onNodeCreated?.apply(this, arguments);
        showAutoLearningRate(this);
        return r;
      };
    }
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = onDrawForeground?.apply(this, arguments);
      const live = this.conceptEm;
      if (live && live.losses && live.losses.length > 1 && !this.flags?.collapsed) {
        const w = Math.max(80, this.size[0] - 20), h = 60;
        ctx.drawImage(drawCurve(live.losses, w, h), 10, this.size[1] - h - 6);
        ctx.fillStyle = "#aaa";
        ctx.font = "11px sans-serif";
        ctx.fillText(`step ${live.step}`, 12, this.size[1] - h - 10);
      }
      return r;
    };
  },
});
