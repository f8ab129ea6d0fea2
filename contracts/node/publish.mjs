// Publish mlpipe contract-v1 tasks from Node.js: a reference for teams whose services are not
// Python. What matters, and what the Python daemon relies on:
//   - a ConfirmChannel, and waiting for the broker's confirms before calling a publish done;
//   - mandatory: true, so a message no queue is bound for comes back as an error, not a silent drop;
//   - persistent messages, content type application/json, a messageId, the correlationId,
//     and the W3C traceparent both in the body's metadata and in the headers;
//   - routing key = taskType (or taskType + ".local" for the self-hosted backends).
// It does not declare the topology: `mlpipe topology` (or a running daemon) owns it.
//
//   npm ci --prefix contracts/node      # once: installs the exact amqplib from package-lock.json
//   node publish.mjs --url amqp://guest:guest@127.0.0.1:5672/ --count 5 --task-type all
//
// Options: --url, --count N (per task type), --exchange (mlpipe.tasks), --share-prefix (node-),
// --task-type transcribe_whisper|summarize_llm|summarize_video_combined|embed_vectors|all
// (`all` publishes N of *each* of the four types, i.e. 4*N messages).
//
// Prints {"published": N, "confirmed": N} and exits 0; exits 1 on any nack, return (unroutable)
// or connection/channel error, 2 on bad arguments.
import { randomBytes, randomUUID } from "node:crypto";
import { parseArgs } from "node:util";
import amqp from "amqplib";

const TASK_TYPES = ["transcribe_whisper", "summarize_llm", "summarize_video_combined", "embed_vectors"];

const USAGE = "usage: node publish.mjs --url amqp://... --count N [--exchange mlpipe.tasks] " +
  `[--task-type ${TASK_TYPES.join("|")}|all] [--share-prefix node-]`;

class UsageError extends Error {}

function parseCli(argv) {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      strict: true,
      options: {
        url: { type: "string", default: "amqp://guest:guest@127.0.0.1:5672/" },
        exchange: { type: "string", default: "mlpipe.tasks" },
        count: { type: "string", default: "1" },
        "task-type": { type: "string", default: "all" },
        "share-prefix": { type: "string", default: "node-" },
      },
    }));
  } catch (err) {
    throw new UsageError(err.message);
  }
  if (!/^[1-9][0-9]*$/.test(values.count)) {
    throw new UsageError(`--count must be a positive integer, got ${JSON.stringify(values.count)}`);
  }
  // shareId = prefix + UUID must match the contract's ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$
  if (!/^([A-Za-z0-9][A-Za-z0-9_.:-]{0,90})?$/.test(values["share-prefix"])) {
    throw new UsageError(`--share-prefix ${JSON.stringify(values["share-prefix"])} would make ` +
      "shareIds the contract refuses (letters, digits, _ . : - only; at most 91 characters)");
  }
  const taskType = values["task-type"];
  if (taskType !== "all" && !TASK_TYPES.includes(taskType)) {
    throw new UsageError(`unknown --task-type ${JSON.stringify(taskType)}`);
  }
  return { ...values, count: Number.parseInt(values.count, 10) };
}

let args;

const payloads = {
  transcribe_whisper: () => ({ mediaUrl: "s3://demo-bucket/clip.wav", language: "en" }),
  summarize_llm: (i) => ({
    content: {
      text: `Node-published article ${i}. The council approved the housing plan on Tuesday, ` +
        "and critics worried about traffic downtown.",
      title: `Article ${i}`,
      type: "article",
    },
    options: { maxLength: 120 },
  }),
  summarize_video_combined: (i) => ({
    transcript: { text: `In video ${i} I show how to feed a sourdough starter every day.` },
    caption: "Sourdough in 7 days",
    hashtags: ["sourdough", "baking"],
  }),
  embed_vectors: (i) => ({
    content: { text: `Caption number ${i} about sourdough starters`, type: "caption", platform: "tiktok" },
    options: { embeddingType: "content" },
  }),
};

// `--task-type all` publishes --count messages of *each* task type.
function plan(taskType, count) {
  const types = taskType === "all" ? TASK_TYPES : [taskType];
  return types.flatMap((t) => Array.from({ length: count }, (_, i) => [t, i]));
}

function message(taskType, i) {
  const traceparent = `00-${randomBytes(16).toString("hex")}-${randomBytes(8).toString("hex")}-01`;
  return {
    version: "1.0",
    taskType,
    shareId: `${args["share-prefix"]}${randomUUID()}`,
    payload: payloads[taskType](i),
    metadata: {
      correlationId: randomUUID(),
      timestamp: Math.floor(Date.now() / 1000),
      retryCount: 0,
      traceparent,
    },
  };
}

async function main() {
  args = parseCli(process.argv.slice(2));
  const jobs = plan(args["task-type"], args.count);
  const conn = await amqp.connect(args.url);
  const returned = [];
  // A channel or connection error (e.g. a missing exchange closes the channel) or an
  // unexpected close fails the run.
  let fail;
  let closing = false;
  const failed = new Promise((_, reject) => { fail = reject; });
  failed.catch(() => {});
  conn.on("error", (err) => fail(err));
  conn.on("close", () => closing || fail(new Error("connection closed by the broker")));
  try {
    const ch = await conn.createConfirmChannel();
    ch.on("error", (err) => fail(err));
    ch.on("close", () => closing || fail(new Error("channel closed by the broker")));
    ch.on("return", (msg) => returned.push(msg.fields.routingKey));
    let confirmed = 0;
    const confirms = jobs.map(([taskType, i]) => {
      const body = message(taskType, i);
      return new Promise((resolve, reject) => {
        ch.publish(args.exchange, taskType, Buffer.from(JSON.stringify(body)), {
          mandatory: true,
          persistent: true,
          contentType: "application/json",
          messageId: randomUUID(),
          correlationId: body.metadata.correlationId,
          timestamp: body.metadata.timestamp,
          headers: { traceparent: body.metadata.traceparent },
        }, (err) => (err ? reject(new Error(`broker nacked ${taskType}: ${err}`)) : resolve()));
      }).then(() => { confirmed += 1; });
    });
    await Promise.race([Promise.all(confirms), failed]);
    await Promise.race([ch.waitForConfirms(), failed]);
    if (returned.length) {
      throw new Error(`${returned.length} message(s) returned as unroutable (no queue bound on ` +
        `exchange ${args.exchange}) for routing key(s): ${[...new Set(returned)].join(", ")}`);
    }
    closing = true;
    await ch.close();
    console.log(JSON.stringify({ published: jobs.length, confirmed }));
  } finally {
    closing = true;
    await conn.close().catch(() => {});
  }
}

main().catch((err) => {
  if (err instanceof UsageError) {
    console.error(`publish failed: ${err.message}\n${USAGE}`);
    process.exit(2);
  }
  console.error(`publish failed: ${err.message}`);
  process.exit(1);
});
