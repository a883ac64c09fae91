// The demo page in headless Chromium (Debian's, driven by playwright-core from npm):
// a resumable upload through the page's own buttons, paused mid-way and resumed.
//   node demo_page.js URL FILE
// The third PATCH is held back (never answered) until the page is paused, so the pause
// lands at a known point: two 1 MiB pieces stored. Prints one JSON line: the offsets of
// every PATCH the page sent, what the page said when paused, and its final status.
const { session } = require("./browser");

const [url, file] = process.argv.slice(2, 4);

session({ patches: [], heads: 0, errors: [] }, async (browser, out) => {
  const page = await browser.newPage();
  page.on("pageerror", (e) => out.errors.push(String(e)));
  let held = null;
  let holding = true;
  await page.route(
    (u) => new URL(u).pathname.startsWith("/files/"),
    async (route) => {
      const request = route.request();
      if (request.method() === "HEAD") out.heads += 1;
      if (request.method() === "PATCH") {
        out.patches.push(Number(request.headers()["upload-offset"]));
        if (holding && out.patches.length === 3) {
          held = route; // answered never: the page pauses meanwhile
          return;
        }
      }
      await route.continue();
    },
  );
  await page.goto(url + "/");
  await page.setInputFiles("#tus-file", file);
  await page.click("#tus-start");
  await page.waitForFunction(
    () => document.getElementById("tus-progress").textContent.startsWith("2097152 of"),
    null,
    { timeout: 30000 },
  );
  while (held === null) await new Promise((r) => setTimeout(r, 20));
  await page.click("#tus-pause");
  await page.waitForFunction(() => document.getElementById("tus-status").textContent === "paused");
  out.pausedAt = await page.textContent("#tus-progress");
  holding = false;
  await held.abort().catch(() => {}); // (the page gave up on it already)
  // Paused: nothing more is sent (a client that had only lost the request would retry).
  await new Promise((r) => setTimeout(r, 1500));
  out.whilePaused = { patches: out.patches.length, heads: out.heads };
  await page.click("#tus-resume");
  await page.waitForFunction(
    () => ["done", "error"].some((s) => document.getElementById("tus-status").textContent.startsWith(s)),
    null,
    { timeout: 60000 },
  );
  out.status = await page.textContent("#tus-status");
  out.stored = await page.textContent("#tus-progress");
});
