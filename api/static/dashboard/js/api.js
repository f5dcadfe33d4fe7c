// API access for the dashboard: bearer token (sessionStorage), JSON fetch, SSE over fetch() streaming.

const TOKEN_KEY = "minordpo.token";
const listeners = new Set();

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.detail) || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

export const auth = {
  required: false,
  get token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  },
  set token(value) {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  },
  // Called with a reason when the API answers 401 (the app shows the token prompt).
  onUnauthorized(fn) {
    listeners.add(fn);
  },
};

function headers(extra) {
  const h = { Accept: "application/json", ...(extra || {}) };
  if (auth.token) h.Authorization = `Bearer ${auth.token}`;
  return h;
}

function unauthorized(body) {
  for (const fn of listeners) fn(body && body.detail ? body.detail : "The token was not accepted");
}

export async function api(path, { method = "GET", body, signal } = {}) {
  if (auth.required && !auth.token) {
    unauthorized({ detail: "This server asks for a bearer token" });
    throw new ApiError(401, { detail: "No token" });
  }
  const init = { method, headers: headers(body !== undefined ? { "Content-Type": "application/json" } : {}), signal };
  if (body !== undefined) init.body = typeof body === "string" ? body : JSON.stringify(body);
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { detail: text };
  }
  if (response.status === 401) unauthorized(data);
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// Parse an SSE byte stream; calls onFrame({id, data}) per message and onComment(text) per comment.
async function pump(reader, onFrame, onComment) {
  const decoder = new TextDecoder();
  let buffer = "";
  let id = null;
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = buffer.slice(0, cut);
      buffer = buffer.slice(cut + (buffer.startsWith("\r\n", cut) ? 2 : 1));
      if (line === "") {
        if (data.length) onFrame({ id, data: data.join("\n") });
        id = null;
        data = [];
      } else if (line.startsWith(":")) {
        onComment(line.slice(1).trim());
      } else {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "id") id = val;
        else if (field === "data") data.push(val);
      }
    }
  }
}

// Follow GET <path> as Server-Sent Events with the bearer header, resuming with Last-Event-ID.
// Returns {close()}. onState("live" | "reconnecting" | "ended" | "error: ..."). Ends for good on
// 204, 4xx, or after a message for which isFinal(message) is true and the server closed the stream.
export function followEvents(path, { onMessage, onState = () => {}, isFinal = () => false }) {
  const controller = new AbortController();
  let lastId = null;
  let finished = false;
  let delay = 1000;

  async function connect() {
    while (!finished && !controller.signal.aborted) {
      let sawFinal = false;
      try {
        const h = headers({ Accept: "text/event-stream" });
        if (lastId) h["Last-Event-ID"] = lastId;
        const response = await fetch(path, { headers: h, signal: controller.signal, cache: "no-store" });
        if (response.status === 204) break;
        if (!response.ok) {
          let body = null;
          try {
            body = await response.json();
          } catch {
            body = null;
          }
          if (response.status === 401) unauthorized(body);
          onState(`error: ${(body && body.detail) || response.status}`);
          if (response.status < 500) return;
          throw new Error(`HTTP ${response.status}`);
        }
        onState("live");
        delay = 1000;
        await pump(
          response.body.getReader(),
          (frame) => {
            if (frame.id !== null) lastId = frame.id;
            let message;
            try {
              message = JSON.parse(frame.data);
            } catch {
              return;
            }
            if (isFinal(message)) sawFinal = true;
            onMessage(message, frame.id);
          },
          () => {},
        );
        if (sawFinal) break;
      } catch (err) {
        if (controller.signal.aborted) return;
      }
      onState("reconnecting");
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 15000);
    }
    if (!controller.signal.aborted) {
      finished = true;
      onState("ended");
    }
  }

  connect();
  return {
    close() {
      finished = true;
      controller.abort();
    },
    get lastId() {
      return lastId;
    },
  };
}
