// promptq dashboard: live updates over server-sent events, the action buttons, and the chart.
// Plain JavaScript, no dependencies. The server renders every piece of HTML; this script only
// fetches a page's live part again (?partial=1) when the event stream reports a change.
"use strict";

(function () {
  const CHART_REFRESH_MS = 10000;
  const live = document.getElementById("live");
  const csrfHeader = document.body.dataset.csrfHeader || "X-PromptQ-CSRF";
  let refreshing = false;
  let pending = false;
  let lastRefresh = 0;
  // Re-render at most this often however many jobs change (the page sets it: its queries' cost)
  const refreshMinMs = live ? Number(live.dataset.refreshMs || 400) : 0;

  function flash(message) {
    const box = document.getElementById("flash");
    if (!box) return;
    box.textContent = message;
    box.hidden = !message;
  }

  async function refresh() {
    if (!live) return;
    if (refreshing) {
      pending = true;
      return;
    }
    const wait = lastRefresh + refreshMinMs - Date.now();
    if (wait > 0) {
      refreshing = true;
      await new Promise((resolve) => setTimeout(resolve, wait));
      refreshing = false;
    }
    refreshing = true;
    pending = false;
    try {
      const response = await fetch(live.dataset.partial, {
        credentials: "same-origin",
        headers: { Accept: "text/html" },
      });
      if (response.redirected && new URL(response.url).pathname === "/login") {
        window.location.assign(response.url); // the key was revoked or the cookie expired
        return;
      }
      if (response.ok) {
        live.innerHTML = await response.text();
        document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
      }
    } catch (error) {
      console.warn("dashboard: refresh failed", error);
    } finally {
      lastRefresh = Date.now();
      refreshing = false;
    }
    if (pending) refresh();
  }

  function connect() {
    if (!live || !window.EventSource) return;
    const indicator = document.getElementById("live-indicator");
    const watched = live.dataset.jobId;
    const source = new EventSource("/ui/events");
    source.addEventListener("hello", () => {
      document.body.dataset.live = "on";
      if (indicator) indicator.classList.add("on");
      refresh(); // catch up with whatever changed before the stream opened
    });
    source.addEventListener("job", (event) => {
      const job = JSON.parse(event.data);
      if (!watched || job.id === watched) refresh();
    });
    source.addEventListener("poll", () => refresh());
    source.addEventListener("revoked", () => {
      source.close(); // the refresh finds the key gone and goes to the login
      refresh();
    });
    source.onerror = () => {
      document.body.dataset.live = "reconnecting";
      if (indicator) indicator.classList.remove("on");
    };
  }

  async function act(button) {
    button.disabled = true;
    flash("");
    try {
      const response = await fetch(button.dataset.url, {
        method: "POST",
        credentials: "same-origin",
        headers: { [csrfHeader]: "1", Accept: "application/json" },
      });
      if (!response.ok) {
        let message = response.status + " " + response.statusText;
        try {
          const body = await response.json();
          if (body && body.error && body.error.message) message = body.error.message;
        } catch (ignored) {
          /* not JSON */
        }
        flash(button.dataset.action + " failed: " + message);
      }
    } catch (error) {
      flash(button.dataset.action + " failed: " + error);
    } finally {
      button.disabled = false;
      refresh();
    }
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (button) {
      event.preventDefault();
      act(button);
    }
  });

  // -- the chart: jobs finished per interval (stacked bars) and attempt latency (lines) -------

  const COLORS = {
    succeeded: "#2e7d32",
    failed: "#c62828",
    cancelled: "#9e9e9e",
    mean: "#1565c0",
    max: "#ef6c00",
    grid: "#e0e0e0",
    text: "#424242",
  };

  function niceMax(value) {
    if (value <= 0) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 5, 10]) {
      if (step * power >= value) return step * power;
    }
    return 10 * power;
  }

  function label(t) {
    const d = new Date(t * 1000);
    return d.toISOString().slice(11, 16);
  }

  function drawPanel(ctx, box, buckets, title, series, stacked, unit) {
    const { x, y, w, h } = box;
    // bars: jobs per status; lines: the "<series>_latency_ms" fields (null where none ran)
    const get = (b, s) => (stacked ? b[s] || 0 : b[s + "_latency_ms"]);
    const values = buckets.map((b) =>
      stacked
        ? series.reduce((sum, s) => sum + get(b, s), 0)
        : Math.max(0, ...series.map((s) => get(b, s) || 0))
    );
    const top = niceMax(Math.max(0, ...values));
    ctx.fillStyle = COLORS.text;
    ctx.font = "12px sans-serif";
    ctx.textAlign = "left";
    ctx.fillText(title, x, y - 6);
    ctx.strokeStyle = COLORS.grid;
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    for (let i = 0; i <= 4; i++) {
      const gy = y + h - (h * i) / 4;
      ctx.beginPath();
      ctx.moveTo(x, gy);
      ctx.lineTo(x + w, gy);
      ctx.stroke();
      ctx.fillText(String(Math.round((top * i) / 4)) + unit, x - 4, gy + 4);
    }
    const n = buckets.length || 1;
    const slot = w / n;
    if (stacked) {
      buckets.forEach((b, i) => {
        let base = y + h;
        for (const s of series) {
          const bar = (h * (b[s] || 0)) / top;
          ctx.fillStyle = COLORS[s];
          ctx.fillRect(x + i * slot + 1, base - bar, Math.max(1, slot - 2), bar);
          base -= bar;
        }
      });
    } else {
      for (const s of series) {
        ctx.strokeStyle = COLORS[s];
        ctx.lineWidth = 2;
        ctx.beginPath();
        let drawing = false;
        buckets.forEach((b, i) => {
          const v = get(b, s);
          if (v === null || v === undefined) {
            drawing = false;
            return;
          }
          const px = x + i * slot + slot / 2;
          const py = y + h - (h * v) / top;
          if (drawing) ctx.lineTo(px, py);
          else ctx.moveTo(px, py);
          drawing = true;
          ctx.fillStyle = COLORS[s];
          ctx.fillRect(px - 1.5, py - 1.5, 3, 3);
        });
        ctx.stroke();
      }
    }
    ctx.fillStyle = COLORS.text;
    ctx.textAlign = "center";
    const every = Math.max(1, Math.ceil(n / 6));
    buckets.forEach((b, i) => {
      if (i % every === 0) ctx.fillText(label(b.t), x + i * slot + slot / 2, y + h + 14);
    });
  }

  function drawChart(canvas, data) {
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const left = 56;
    const width = canvas.width - left - 12;
    const half = (canvas.height - 60) / 2;
    const buckets = data.buckets;
    const perBucket = data.bucket_s >= 60 ? data.bucket_s / 60 + " min" : data.bucket_s + " s";
    drawPanel(ctx, { x: left, y: 20, w: width, h: half - 20 }, buckets,
      "jobs finished per " + perBucket, ["succeeded", "failed", "cancelled"], true, "");
    drawPanel(ctx, { x: left, y: half + 40, w: width, h: half - 20 }, buckets,
      "attempt latency (ms)", ["mean", "max"], false, "");
    const finished = buckets.reduce((s, b) => s + b.succeeded + b.failed + b.cancelled, 0);
    canvas.dataset.finished = String(finished);
    canvas.dataset.attempts = String(buckets.reduce((s, b) => s + b.attempts, 0));
  }

  function chart() {
    const canvas = document.getElementById("chart");
    if (!canvas) return;
    let windowName = "1h";
    async function load() {
      try {
        const url = canvas.dataset.url + "?window=" + encodeURIComponent(windowName);
        const response = await fetch(url, { credentials: "same-origin" });
        if (response.ok) drawChart(canvas, await response.json());
      } catch (error) {
        console.warn("dashboard: chart failed", error);
      }
    }
    document.querySelectorAll("button[data-window]").forEach((button) => {
      button.addEventListener("click", () => {
        windowName = button.dataset.window;
        document.querySelectorAll("button[data-window]").forEach((b) => b.classList.toggle("selected", b === button));
        load();
      });
    });
    load();
    setInterval(load, CHART_REFRESH_MS);
  }

  connect();
  chart();
})();
