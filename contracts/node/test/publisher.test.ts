// The TypeScript producer against the real broker, with Node's own test runner.
//
// tests/integration/test_ts_producer.py runs this (`npm test`) with a daemon consuming the
// vhost it names, then checks the daemon stored a result for every task recorded here:
//   MLPIPE_TEST_BROKER_URL   the broker, topology declared (required)
//   MLPIPE_TEST_PUBLISHED    a file to append the confirmed tasks to, one JSON object a line
//
// The error paths use exchanges and queues of their own (auto-deleted), never mlpipe's.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { appendFileSync } from "node:fs";
import net from "node:net";
import { after, before, describe, test } from "node:test";

import amqp from "amqplib";

import {
  buildTask,
  ChannelClosed,
  InvalidTask,
  type PublishReceipt,
  PublishError,
  Publisher,
  PublishNacked,
  PublishTimeout,
  publishTask,
  routingKeyFor,
  type Task,
  Unroutable,
} from "../src/index.js";

const URL = process.env.MLPIPE_TEST_BROKER_URL;
const PUBLISHED = process.env.MLPIPE_TEST_PUBLISHED;
if (!URL) {
  throw new Error("MLPIPE_TEST_BROKER_URL is not set: run this through " +
    "tests/integration/test_ts_producer.py (it makes a vhost, declares the topology and " +
    "starts a daemon), or point it at a broker whose topology `mlpipe topology` declared");
}
const BROKER_URL: string = URL;
const RUN = randomUUID().slice(0, 8);

function record(task: Task, receipt: PublishReceipt): void {
  if (!PUBLISHED) return;
  appendFileSync(PUBLISHED, `${JSON.stringify({
    shareId: task.shareId, taskType: task.taskType, correlationId: task.metadata.correlationId,
    messageId: receipt.messageId, routingKey: receipt.routingKey,
  })}\n`);
}

/** A side exchange (and queue) of this test's own, removed when the test's connection ends. */
async function withSideTopology(
  setup: (ch: amqp.Channel) => Promise<void>,
): Promise<amqp.ChannelModel> {
  const conn = await amqp.connect(BROKER_URL);
  const ch = await conn.createChannel();
  await setup(ch);
  return conn;
}

describe("publishTask against the broker", () => {
  let publisher: Publisher;
  before(async () => {
    publisher = await Publisher.connect(BROKER_URL, { connectionName: "ts-producer-test" });
  });
  after(async () => {
    await publisher.close();
  });

  test("one task of each type is confirmed and routed by task type", async () => {
    const tasks: Task[] = [
      buildTask("transcribe_whisper", `ts-${RUN}-transcribe`,
        { mediaUrl: "s3://demo-bucket/clip.wav", language: "en" }),
      buildTask("summarize_llm", `ts-${RUN}-article`, {
        content: { text: "The council approved the housing plan on Tuesday.", type: "article" },
        options: { maxLength: 120 },
      }),
      buildTask("summarize_video_combined", `ts-${RUN}-video`, {
        transcript: { text: "In this video I feed a sourdough starter." },
        caption: "Sourdough in 7 days", hashtags: ["sourdough"],
      }),
      buildTask("embed_vectors", `ts-${RUN}-embed`, {
        content: { text: "A caption about sourdough starters", type: "caption" },
        options: { embeddingType: "content" },
      }),
      buildTask("summarize_llm", `ts-${RUN}-article-local`, {
        content: { text: "Self-hosted summary, please." }, options: { backend: "local" },
      }),
    ];
    for (const task of tasks) {
      const receipt = await publisher.publishTask(task);
      assert.equal(receipt.exchange, "mlpipe.tasks");
      assert.equal(receipt.routingKey, routingKeyFor(task));
      assert.equal(receipt.correlationId, task.metadata.correlationId);
      record(task, receipt);
    }
    assert.equal(routingKeyFor(tasks[4]!), "summarize_llm.local");
  });

  test("concurrent publishes each settle on their own confirm", async () => {
    const tasks = Array.from({ length: 20 }, (_, i) =>
      buildTask("embed_vectors", `ts-${RUN}-batch-${i}`, { content: { text: `text ${i}` } }));
    const receipts = await Promise.all(tasks.map((t) => publisher.publishTask(t)));
    assert.equal(new Set(receipts.map((r) => r.messageId)).size, 20);
    tasks.forEach((t, i) => record(t, receipts[i]!));
  });

  test("a routing key no queue is bound for is Unroutable, not a silent drop", async () => {
    const exchange = `ts-test.unbound.${RUN}`;
    const side = await withSideTopology(async (ch) => {
      await ch.assertExchange(exchange, "direct", { durable: false, autoDelete: false });
    });
    try {
      const task = buildTask("embed_vectors", `ts-${RUN}-lost`, { content: { text: "x" } });
      const error = await publisher.publishTask(task, { exchange }).then(
        () => assert.fail("an unroutable publish resolved"), (e: unknown) => e);
      assert.ok(error instanceof Unroutable, String(error));
      assert.ok(error instanceof PublishError);
      assert.equal(error.routingKey, "embed_vectors");
      assert.equal(error.exchange, exchange);
      assert.equal(error.replyCode, 312);
      assert.equal(error.replyText, "NO_ROUTE");
      // the channel is still good
      const ok = buildTask("embed_vectors", `ts-${RUN}-after-unroutable`,
        { content: { text: "y" } });
      record(ok, await publisher.publishTask(ok));
    } finally {
      const ch = await side.createChannel();
      await ch.deleteExchange(exchange);
      await side.close();
    }
  });

  test("a missing exchange is ChannelClosed naming it; the next publish reopens", async () => {
    const exchange = `ts-test.missing.${RUN}`;
    const task = buildTask("embed_vectors", `ts-${RUN}-nowhere`, { content: { text: "x" } });
    await assert.rejects(publisher.publishTask(task, { exchange }), (e: unknown) => {
      assert.ok(e instanceof ChannelClosed, String(e));
      assert.match(e.message, /NOT_FOUND/);
      assert.ok(e.message.includes(exchange), e.message);
      return true;
    });
    const next = buildTask("embed_vectors", `ts-${RUN}-after-close`, { content: { text: "z" } });
    record(next, await publisher.publishTask(next));
  });

  test("a message the broker refuses is PublishNacked", async () => {
    const exchange = `ts-test.full.${RUN}`;
    const queue = `ts-test.full.${RUN}`;
    const side = await withSideTopology(async (ch) => {
      await ch.assertExchange(exchange, "direct", { durable: false });
      await ch.assertQueue(queue, {
        durable: false,
        arguments: { "x-max-length": 0, "x-overflow": "reject-publish" },
      });
      await ch.bindQueue(queue, exchange, "embed_vectors");
    });
    try {
      const task = buildTask("embed_vectors", `ts-${RUN}-refused`, { content: { text: "x" } });
      await assert.rejects(publisher.publishTask(task, { exchange }), PublishNacked);
    } finally {
      const ch = await side.createChannel();
      await ch.deleteQueue(queue);
      await ch.deleteExchange(exchange);
      await side.close();
    }
  });

  test("a contract violation is InvalidTask before anything is sent", async () => {
    assert.throws(() => buildTask("embed_vectors", "has spaces/and slash",
      { content: { text: "x" } }), InvalidTask);
    const task = buildTask("embed_vectors", `ts-${RUN}-v2`, { content: { text: "x" } });
    await assert.rejects(publisher.publishTask({ ...task, version: "2.0" }), InvalidTask);
    // what the generated types refuse at compile time (tsc fails if these compiled)
    // @ts-expect-error mediaUrl is required
    buildTask("transcribe_whisper", "s", { language: "en" });
    // @ts-expect-error embeddingType is an enum of the contract
    buildTask("embed_vectors", "s", { content: { text: "x" }, options: { embeddingType: "x" } });
    // @ts-expect-error an unknown field is a typo, not a silently dropped option
    buildTask("summarize_llm", "s", { content: { text: "x" }, options: { maxLenght: 9 } });
  });
});

test("no confirm within the timeout is PublishTimeout", async () => {
  // a TCP proxy that stops passing the broker's frames once the connection is up: the
  // publish reaches the broker, its confirm never reaches us
  const target = new globalThis.URL(BROKER_URL.replace(/^amqp:/, "http:"));
  const sockets = new Set<net.Socket>();
  let mute = false;
  const proxy = net.createServer((client) => {
    const upstream = net.connect(Number(target.port || 5672), target.hostname);
    sockets.add(client).add(upstream);
    client.on("data", (d) => upstream.write(d));
    upstream.on("data", (d) => { if (!mute) client.write(d); });
    client.on("error", () => upstream.destroy());
    upstream.on("error", () => client.destroy());
    client.on("close", () => upstream.destroy());
    upstream.on("close", () => client.destroy());
  });
  await new Promise<void>((ok) => proxy.listen(0, "127.0.0.1", ok));
  const { port } = proxy.address() as net.AddressInfo;
  const url = `amqp://${target.username}:${target.password}@127.0.0.1:${port}${target.pathname}`;
  const publisher = await Publisher.connect(url, { timeoutMs: 400 });
  try {
    await publisher.publishTask(buildTask("embed_vectors", `ts-${RUN}-warm`,
      { content: { text: "x" } }), { exchange: "amq.direct" }).catch(() => {});
    mute = true;
    const started = Date.now();
    const task = buildTask("embed_vectors", `ts-${RUN}-slow`, { content: { text: "x" } });
    await assert.rejects(publisher.publishTask(task, { exchange: "amq.direct" }),
      (e: unknown) => {
        assert.ok(e instanceof PublishTimeout, String(e));
        assert.equal(e.timeoutMs, 400);
        return true;
      });
    const elapsed = Date.now() - started;
    assert.ok(elapsed >= 390 && elapsed < 5000, `timed out after ${elapsed} ms`);
  } finally {
    for (const s of sockets) s.destroy();
    proxy.close();
    await publisher.close();
  }
});

test("publishTask(url, task) connects, publishes with confirm and closes", async () => {
  const task = buildTask("summarize_llm", `ts-${RUN}-oneshot`, { content: { text: "One." } });
  const receipt = await publishTask(BROKER_URL, task);
  assert.equal(receipt.routingKey, "summarize_llm");
  record(task, receipt);
  await assert.rejects(publishTask("amqp://guest:guest@127.0.0.1:1/", task), ChannelClosed);
});
