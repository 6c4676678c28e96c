// Requests to the server. State-changing and model-running requests carry the page's token (the server
// refuses them without it: a page from another site cannot know it).
const TOKEN = document.querySelector('meta[name="cltrace-token"]').content;

export class ApiError extends Error {}

async function call(method, url, body) {
  const init = {method, headers: {}};
  if (method !== "GET") init.headers["X-Cltrace-Token"] = TOKEN;
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(url, init);
  const text = await r.text();
  let data;
  try { data = JSON.parse(text); } catch { data = {error: text}; }
  if (!r.ok) throw new ApiError(data.error || `${r.status} ${r.statusText}`);
  return data;
}

const g = name => `/api/graphs/${encodeURIComponent(name)}`;

export const api = {
  info: () => call("GET", "/api/info"),
  graphs: () => call("GET", "/api/graphs"),
  view: (name, node, edge, diff) =>
    call("GET", `${g(name)}/view?node=${node}&edge=${edge}` + (diff ? `&diff=${diff.join(",")}` : "")),
  state: name => call("GET", `${g(name)}/state`),
  saveState: (name, state) => call("PUT", `${g(name)}/state`, state),
  node: (name, id) => call("GET", `${g(name)}/node/${encodeURIComponent(id)}`),
  label: (name, node, label) => call("PUT", `${g(name)}/label`, {node, label}),
  scores: (name, pinned) => call("POST", `${g(name)}/scores`, {pinned}),
  suggest: (name, pinned, exclude) => call("POST", `${g(name)}/suggest`, {pinned, exclude}),
  steer: (name, req) => call("POST", `${g(name)}/steer`, req),
  trace: req => call("POST", "/api/trace", req),
  job: id => call("GET", `/api/jobs/${encodeURIComponent(id)}`),
  exportUrl: (name, node, edge, sub) => `${g(name)}/export.json?node=${node}&edge=${edge}&subgraph=${sub ? 1 : 0}`,
};

// poll a job until it is done; onProgress(job) on every change
export async function waitJob(job, onProgress) {
  for (;;) {
    if (job.status === "done") return job.result;
    if (job.status === "error") throw new ApiError(job.error);
    onProgress && onProgress(job);
    await new Promise(r => setTimeout(r, 150));
    job = await api.job(job.id);
  }
}
