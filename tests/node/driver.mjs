// One official Node.js SDK call made twice through ai-cache, for tests/test_e2e_node_clients.py.
//
// The job (JSON in argv[2]) names the SDK, the call, the base URL, the prompt and model, default
// headers, whether to offer a tool, and optionally an explicit proxy (undici's ProxyAgent with
// undici's fetch, as both SDKs' READMEs configure proxies). The driver makes the call (the MISS),
// polls with `cache-control: only-if-cached` until the background write is visible, makes the
// call again (the HIT) and prints one JSON line: each run's cache status, duration, everything the
// SDK parsed, and a summary (text, tool call) the test checks against the fake provider's answer.
// One node process per job: starting node and loading an SDK costs ~0.3 s.

const job = JSON.parse(process.argv[2]);
const POLLS = 100;
const POLL_MS = 50;
const CITY = { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] };
const TOOLS = {
  openai: [{ type: 'function', function: { name: 'get_weather', description: 'Weather', parameters: CITY } }],
  anthropic: [{ name: 'get_weather', description: 'Weather', input_schema: CITY }],
};

async function client() {
  const options = { apiKey: 'sk-test', baseURL: job.baseURL, maxRetries: 0, timeout: 20_000,
    defaultHeaders: job.headers };
  if (job.proxy) {
    const { fetch, ProxyAgent } = await import('undici');
    Object.assign(options, { fetch, fetchOptions: { dispatcher: new ProxyAgent(job.proxy) } });
  }
  const { default: SDK } = await import(job.sdk === 'openai' ? 'openai' : '@anthropic-ai/sdk');
  return new SDK(options);
}

// Chat and messages bodies: the prompt, and the weather tool when the job asks for it.
const ask = (sdk, extra) => ({ model: job.model, messages: [{ role: 'user', content: job.prompt }],
  ...(job.tools ? { tools: TOOLS[sdk] } : {}), ...extra });
const input = (extra) => ({ model: job.model, input: job.prompt, ...extra });
const claude = { max_tokens: 64 };

// Per call: the request (an APIPromise, or the MessageStream helper), and its summary.
const CALLS = {
  chat: [(sdk, o) => sdk.chat.completions.create(ask('openai'), o), (out) => chat([out.choices[0].message])],
  'chat-stream': [(sdk, o) => sdk.chat.completions.create(ask('openai', { stream: true }), o),
    (out) => chat(out.flatMap((chunk) => chunk.choices.map((c) => c.delta)))],
  responses: [(sdk, o) => sdk.responses.create(input(), o), (out) => ({ text: out.output_text })],
  'responses-stream': [(sdk, o) => sdk.responses.create(input({ stream: true }), o),
    (out) => ({ text: joined(out.filter((e) => e.type === 'response.output_text.delta'), 'delta') })],
  embeddings: [(sdk, o) => sdk.embeddings.create(input(), o),
    (out) => ({ dimensions: out.data[0].embedding.length })],
  messages: [(sdk, o) => sdk.messages.create(ask('anthropic', claude), o), (out) => message(out.content)],
  'messages-create-stream': [(sdk, o) => sdk.messages.create(ask('anthropic', { ...claude, stream: true }), o),
    messageEvents],
  'messages-stream': [(sdk, o) => sdk.messages.stream(ask('anthropic', claude), o),
    (out) => message(out.final.content)],
};

const joined = (items, field) => items.map((item) => item[field] ?? '').join('');
const tool = (name, args) => ({ name, arguments: typeof args === 'string' ? JSON.parse(args) : args });

// Chat messages or stream deltas, concatenated as the SDK user would.
function chat(parts) {
  const calls = parts.flatMap((p) => p.tool_calls ?? []).map((c) => c.function);
  const name = joined(calls, 'name');
  return { text: joined(parts, 'content'), tool: name ? tool(name, joined(calls, 'arguments')) : undefined };
}

function message(blocks) {
  const use = blocks.find((b) => b.type === 'tool_use');
  return { text: joined(blocks.filter((b) => b.type === 'text'), 'text'), tool: use && tool(use.name, use.input) };
}

function messageEvents(events) {
  const deltas = events.filter((e) => e.type === 'content_block_delta').map((e) => e.delta);
  const block = events.find((e) => e.type === 'content_block_start').content_block;
  const input = joined(deltas, 'partial_json');
  return message([{ ...block, text: joined(deltas, 'text'), ...(input ? { input } : {}) }]);
}

// What the SDK parsed: an object, a stream's items, or the MessageStream's events and final message.
async function parsed(data) {
  if (!data[Symbol.asyncIterator]) return data;
  const items = [];
  for await (const item of data) items.push(item);
  return data.finalMessage ? { events: items, final: await data.finalMessage() } : items;
}

async function run(sdk, headers = {}) {
  const [request, summarise] = CALLS[job.call];
  const started = performance.now();
  const { data, response } = await request(sdk, { headers }).withResponse();
  const output = await parsed(data);
  const ms = performance.now() - started;
  return { status: response.headers.get('x-ai-cache-status'), ms, output, summary: summarise(output) };
}

async function untilStored(sdk) {
  for (let i = 0; i < POLLS; i++) {
    try {
      return await run(sdk, { 'cache-control': 'only-if-cached' });
    } catch (e) {
      if (e.status !== 504) throw e;
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  }
  throw new Error(`not stored after ${POLLS} polls`);
}

const sdk = await client();
const miss = await run(sdk);
await untilStored(sdk);
const hit = await run(sdk);
process.stdout.write(JSON.stringify({ miss, hit }) + '\n');
