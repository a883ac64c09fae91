// The operators' status page in headless Chromium (Debian's, driven by playwright-core):
// find a failed file, see its error, click its Retry button, wait until it is remote.
//   node admin_page.js URL TOKEN KEY SHOTS_DIR
// Prints one JSON line: the error the page showed, the state it ended on, page errors.
const { session } = require("./browser");
const path = require("path");

const [url, token, key, shots] = process.argv.slice(2, 6);

session({ errors: [] }, async (browser, out) => {
  // The token as the password of HTTP Basic, as an operator's browser asks for it.
  const context = await browser.newContext({ httpCredentials: { username: "ops", password: token } });
  const page = await context.newPage();
  page.on("pageerror", (e) => out.errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") out.errors.push(m.text()); });
  await page.goto(url + "/admin/");
  const row = page.locator(`#failed tr[data-key="${key}"]`);
  await row.waitFor({ timeout: 30000 });
  out.error = await row.locator("td.error").textContent();
  out.counts = await page.locator("#counts").textContent();
  await page.screenshot({ path: path.join(shots, "admin-failed.png"), fullPage: true });
  await row.locator("button.retry").click();
  const state = page.locator(`#watched tr[data-key="${key}"] td.state`);
  await page.waitForFunction(
    (k) => {
      const td = document.querySelector(`#watched tr[data-key="${k}"] td.state`);
      return td && td.textContent === "remote";
    },
    key,
    { timeout: 60000 },
  );
  out.state = await state.textContent();
  out.stillFailed = await page.locator(`#failed tr[data-key="${key}"]`).count();
  await page.screenshot({ path: path.join(shots, "admin-retried.png"), fullPage: true });
});
