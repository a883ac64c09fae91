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
