// Upload a file with tus-js-client (npm), the client browsers and Uppy use, under node.
//   node tus_upload.js ENDPOINT FILE CHUNK_SIZE [--stop-after BYTES] [--resume URL]
// Prints one JSON line: {"url", "offset", "done", "startedAt"}.
const fs = require("fs");
const path = require("path");
const tus = require(process.env.TUS_JS_CLIENT || "tus-js-client");

const [endpoint, file, chunk] = process.argv.slice(2, 5);
const args = process.argv.slice(5);
const option = (name) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : null;
};
const stopAfter = option("--stop-after");
const resume = option("--resume");

const stream = fs.createReadStream(file);
const size = fs.statSync(file).size;
let startedAt = null;
const upload = new tus.Upload(stream, {
  endpoint,
  uploadUrl: resume || undefined,
  chunkSize: Number(chunk),
  uploadSize: size,
  retryDelays: [],
  metadata: { filename: path.basename(file), filetype: "application/octet-stream" },
  onChunkComplete: (chunkSize, accepted) => {
    if (startedAt === null) startedAt = accepted - chunkSize;
    if (stopAfter && accepted >= Number(stopAfter)) {
      upload.abort().then(() => {
        console.log(JSON.stringify({ url: upload.url, offset: accepted, done: false, startedAt }));
        process.exit(0);
      });
    }
  },
  onSuccess: () => {
    console.log(JSON.stringify({ url: upload.url, offset: size, done: true, startedAt }));
    process.exit(0);
  },
  onError: (error) => {
    console.log(JSON.stringify({ error: String(error) }));
    process.exit(1);
  },
});
upload.start();
