// Debian's chromium, headless, as the tests run it (playwright-core drives it). The flags
// keep it off the network it cannot reach here (background fetches, QUIC, updates).
const { chromium } = require(process.env.PLAYWRIGHT_CORE || "playwright-core");

exports.launch = () =>
  chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });

// One browser for one script: fn(browser, out) fills out, which is printed as one JSON
// line once the browser is closed; an error is printed and exits 1.
exports.session = (out, fn) =>
  (async () => {
    const browser = await exports.launch();
    try {
      await fn(browser, out);
    } finally {
      await browser.close();
    }
    console.log(JSON.stringify(out));
  })().catch((e) => {
    console.error(e);
    process.exit(1);
  });
