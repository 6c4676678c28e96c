"""The viewer's web server: `make_app(DIR, ...)` builds the Starlette app, `serve(...)` runs it on uvicorn.

Endpoints (JSON unless said; POST/PUT need the page's token, see security.py):
    GET  /                                   the page (index.html with this server's token)
    GET  /static/...                         the page's own scripts, styles and vendored d3
    GET  /healthz                            "ok"
    GET  /api/info                           version, whether a model and a feature database are attached
    GET  /api/graphs                         the graphs in DIR
    GET  /api/graphs/{name}/view?node=&edge=&diff=A,B   the pruned graph, packed (payload.py)
    GET  /api/graphs/{name}/state            the saved view state;  PUT: save it (schemas.ViewState)
    GET  /api/graphs/{name}/node/{node_id}   a node's dashboard (feature database) and activation
    PUT  /api/graphs/{name}/label            a feature's label -> the database (else the graph's state)
    POST /api/graphs/{name}/scores           replacement / completeness of the pinned subgraph
    POST /api/graphs/{name}/suggest          supernode suggestions among the pinned features
    GET  /api/graphs/{name}/export.json?subgraph=0|1   circuit-tracer / Neuronpedia graph JSON with qParams
    POST /api/graphs/{name}/steer            a steering job;  POST /api/trace: a new-graph job
    GET  /api/jobs/{id}                      a job's stage, progress, result or error
    GET  /api/features/{layer}/{feature}/weights?kind=&direction=&top=   global weights (weights.py)
    GET  /api/graphs/{name}/qk/{node_id}     the node's edges explained by heads and QK terms (GRAPH.qk.json)
"""

from __future__ import annotations

import html
import json
import math
import sys
from pathlib import Path

import torch
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from cltrace.attribution.export import graph_json
from cltrace.attribution.heads import qk_side_path
from cltrace.errors import CltraceError
from cltrace.interventions import Intervention
from cltrace.viewer.analysis import subgraph_nodes, subgraph_scores, suggest_supernodes
from cltrace.viewer.jobs import JobQueue
from cltrace.viewer.labels import Labels, card_json
from cltrace.viewer.modelrun import ModelHost, steer, trace_graph
from cltrace.viewer.payload import view_payload
from cltrace.viewer.schemas import LabelEdit, Pinned, SteerRequest, TraceRequest, ViewState
from cltrace.viewer.security import Guard, host_names, new_token
from cltrace.viewer.store import GraphStore, Loaded
from cltrace.viewer.weights import WeightsView

STATIC = Path(__file__).parent / "static"
VERSION = "1"


class Viewer:
    """The server's objects, shared by the handlers."""

    def __init__(self, directory, features, host: ModelHost, token: str):
        self.store = GraphStore(directory)
        self.labels = Labels(features)
        self.host = host
        self.jobs = JobQueue()
        self.token = token

    # ------------------------------------------------------------------ helpers
    def loaded(self, request: Request) -> tuple[str, Loaded]:
        name = request.path_params["name"]
        try:
            return name, self.store.load(name)
        except CltraceError as e:
            raise HTTPException(404, str(e)) from None

    def state(self, name: str) -> ViewState:
        raw = self.store.read_state(name)
        try:
            return ViewState.model_validate(raw)
        except ValidationError:
            return ViewState()  # a damaged state file: start fresh rather than refuse the graph

    def feature_labels(self, name: str, loaded: Loaded) -> list[str]:
        g = loaded.graph
        refs = [(layer, f) for layer, _, f in g.features.tolist()]
        fallback = {} if self.labels.db is not None else dict(self.state(name).labels)
        out = self.labels.labels(refs, fallback)
        meta = g.meta.get("feature_labels") or {}
        for i, (layer, f) in enumerate(refs):
            if not out[i]:
                m = meta.get(f"{layer}:{f}", "")
                out[i] = m.get("label", "") if isinstance(m, dict) else str(m)
        return out

    def thresholds(self, request: Request, name: str) -> tuple[float, float]:
        st = self.state(name)
        try:
            node = float(request.query_params.get("node", st.node_threshold))
            edge = float(request.query_params.get("edge", st.edge_threshold))
        except ValueError:
            raise HTTPException(400, "node and edge thresholds must be numbers") from None
        if not (0 < node <= 1 and 0 < edge <= 1) or math.isnan(node) or math.isnan(edge):
            raise HTTPException(400, "node and edge thresholds must be in (0, 1]")
        return node, edge


async def body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The request's JSON body validated as `model`, or a 400/422 that says what is wrong."""
    limit = request.scope.get("state", {}).get("max_body", 1 << 20)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body is over the {limit}-byte limit")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        data = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPException(400, f"the body is not JSON ({e})") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "body"
        raise HTTPException(422, f"{where}: {first['msg']} ({len(e.errors())} problem(s) in the request)") from None


def make_app(directory, *, features=None, model: str | None = None, transcoders: str | None = None,
             device: str = "cpu", host: str = "127.0.0.1", port: int | None = None, token: str | None = None,
             max_body: int = 1 << 20) -> Starlette:
    """The viewer app for the graphs in `directory` (feature database, model and transcoders optional)."""
    v = Viewer(directory, features, ModelHost(model, transcoders, device), token or new_token())
    index_html = (STATIC / "index.html").read_text()

    async def index(request: Request) -> Response:
        page = index_html.replace("__CLTRACE_TOKEN__", html.escape(v.token, quote=True))
        return HTMLResponse(page, headers={"cache-control": "no-store"})

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def info(request: Request) -> Response:
        return JSONResponse({"version": VERSION, "model": v.host.model_spec if v.host.available else None,
                             "features": str(v.labels.db.path) if v.labels.db is not None else None,
                             "directory": str(v.store.root)})

    def graphs(request: Request) -> Response:
        out = []
        for name in v.store.names():
            try:
                out.append(v.store.summary(name))
            except Exception:  # a file being written: list it without details
                out.append({"name": name, "prompt": "", "n_tokens": 0})
        return JSONResponse({"graphs": out})

    def view(request: Request) -> Response:
        name, loaded = v.loaded(request)
        node, edge = v.thresholds(request, name)
        diff = None
        if request.query_params.get("diff"):
            try:
                a, b = (int(x) for x in request.query_params["diff"].split(","))
            except ValueError:
                raise HTTPException(400, "diff must be two logit indices, e.g. diff=0,1") from None
            diff = (a, b)
        with loaded.lock:
            sp = loaded.pruner.prune(node, edge)
        try:
            data = view_payload(loaded, sp, v.feature_labels(name, loaded), node_threshold=node,
                                edge_threshold=edge, diff=diff)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        data["name"] = name
        return JSONResponse(data)

    def get_state(request: Request) -> Response:
        name, _ = v.loaded(request)
        return JSONResponse(v.state(name).model_dump())

    async def put_state(request: Request) -> Response:
        name, loaded = v.loaded(request)
        st = await body(request, ViewState)
        unknown = [n for n in st.pinned if n not in loaded.index]
        if unknown:
            raise HTTPException(422, f"pinned: {len(unknown)} node(s) not in this graph, e.g. {unknown[0]!r}")
        st.labels = v.state(name).labels  # labels change only through PUT .../label
        v.store.write_state(name, st.model_dump())
        return JSONResponse({"saved": True})

    def node(request: Request) -> Response:
        name, loaded = v.loaded(request)
        i = loaded.index.get(request.path_params["node_id"])
        if i is None:
            raise HTTPException(404, f"no node {request.path_params['node_id']!r} in graph {name!r}")
        g = loaded.graph
        out: dict = {"id": loaded.ids[i], "dashboard": None}
        if i < g.n_features:
            layer, pos, f = g.features[i].tolist()
            act = float(g.activations[i])
            out.update(layer=layer, pos=pos, feature=f, activation=act, token=g.tokens[pos],
                       label=v.feature_labels(name, loaded)[i], has_db=v.labels.db is not None)
            try:
                card = v.labels.card(layer, f)
            except CltraceError as e:
                out["dashboard_error"] = str(e)
                card = None
            if card is not None:
                out["dashboard"] = card_json(card, act)
        return JSONResponse(out)

    async def label(request: Request) -> Response:
        name, loaded = v.loaded(request)
        edit = await body(request, LabelEdit)
        i = loaded.index.get(edit.node)
        if i is None or i >= loaded.graph.n_features:
            raise HTTPException(422, f"node: {edit.node!r} is not a feature of graph {name!r}")
        layer, _, f = loaded.graph.features[i].tolist()
        text = " ".join(edit.label.split())  # one line
        if v.labels.set_label(layer, f, text):
            where = "database"
        else:
            st = v.state(name)
            if text:
                st.labels[f"{layer}:{f}"] = text
            else:
                st.labels.pop(f"{layer}:{f}", None)
            v.store.write_state(name, st.model_dump())
            where = "graph state"
        return JSONResponse({"node": edit.node, "label": v.feature_labels(name, loaded)[i], "saved_to": where})

    async def scores_(request: Request) -> Response:
        name, loaded = v.loaded(request)
        req = await body(request, Pinned)
        out = subgraph_scores(loaded, req.pinned)
        out.update(subgraph_nodes(loaded, req.pinned, v.feature_labels(name, loaded)))
        return JSONResponse(out)

    async def suggest(request: Request) -> Response:
        _, loaded = v.loaded(request)
        req = await body(request, Pinned)
        tc = v.host.transcoder_if_loaded()

        def decoder(layer: int, f: int):
            return tc.decoder_vectors(layer, torch.tensor([f]))[0, 0].detach().float().cpu() if tc is not None else None

        def contexts(layer: int, f: int):
            card = v.labels.card(layer, f) if v.labels.db is not None else None
            return {e.context_id for e in card.top} if card is not None else None

        return JSONResponse({"suggestions": suggest_supernodes(loaded, req.pinned, decoder=decoder,
                                                               contexts=contexts, exclude=req.exclude)})

    def export(request: Request) -> Response:
        name, loaded = v.loaded(request)
        node_t, edge_t = v.thresholds(request, name)
        sub = request.query_params.get("subgraph", "0") == "1"
        data = export_json(v, name, loaded, node_t, edge_t, sub)
        fname = f"{name}{'-subgraph' if sub else ''}.json"
        return Response(json.dumps(data), media_type="application/json",
                        headers={"content-disposition": f'attachment; filename="{fname}"'})

    async def trace(request: Request) -> Response:
        req = await body(request, TraceRequest)
        if not v.host.available:
            raise HTTPException(409, "this server has no model: start it with `cltrace serve DIR --model M "
                                     "--transcoders T` to trace from the page")
        name = v.store.free_name(req.name or req.prompt[:40])

        def run(progress):
            graph = trace_graph(v.host, req.prompt, max_features=req.max_features,
                                node_threshold=req.node_threshold, edge_threshold=req.edge_threshold,
                                progress=progress)
            progress("saving", 0.95)
            v.store.save_graph(graph, name)
            v.store.write_state(name, ViewState(node_threshold=req.node_threshold,
                                                edge_threshold=req.edge_threshold).model_dump())
            return {"name": name, "n_nodes": graph.n_nodes}

        return submit(v, "trace", run)

    async def steer_(request: Request) -> Response:
        name, loaded = v.loaded(request)
        req = await body(request, SteerRequest)
        if not v.host.available:
            raise HTTPException(409, "this server has no model: start it with --model and --transcoders to steer")
        g = loaded.graph
        ivs, seen = [], set()
        for item in req.items:
            for nid in item.nodes:
                i = loaded.index.get(nid)
                if i is None:
                    raise HTTPException(422, f"items: no node {nid!r} in graph {name!r}")
                if i >= g.n_features:
                    continue  # errors, tokens and logits cannot be steered
                layer, pos, f = g.features[i].tolist()
                key = (layer, None if item.positions == "all" else pos, f)
                if key not in seen:
                    seen.add(key)
                    ivs.append(Intervention(layer=layer, pos=key[1], feature=f, value=item.value, op=item.op))
        if not ivs:
            raise HTTPException(422, "items: choose at least one feature node (errors and tokens cannot be steered)")
        return submit(v, "steer", lambda progress: steer(v.host, g, ivs, mode=req.mode, n_tokens=req.n_tokens,
                                                        progress=progress))

    weights_view = WeightsView(v.host, v.labels)

    def feature_weights(request: Request) -> Response:
        p = request.path_params
        return JSONResponse(weights_view.answer(p["layer"], p["feature"], request.query_params))

    def qk(request: Request) -> Response:
        """The QK side file's entries whose target or source is this node ({"edges": []} without a side file)."""
        name = request.path_params["name"]
        path = qk_side_path(v.store.path_of(name))
        node_id = request.path_params["node_id"]
        if not path.is_file():
            note = f"no {path.name}: run `cltrace trace ... --qk N` or `cltrace qk`"
            return JSONResponse({"edges": [], "note": note})
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise HTTPException(500, f"{path.name} is not readable JSON ({e})") from None
        edges = [e for e in data.get("edges", []) if node_id in (e.get("target"), e.get("source"))]
        return JSONResponse({"edges": edges})

    def job(request: Request) -> Response:
        j = v.jobs.get(request.path_params["job_id"])
        if j is None:
            raise HTTPException(404, f"no job {request.path_params['job_id']!r}")
        return JSONResponse(j.to_dict())

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    async def user_error(request: Request, exc: CltraceError) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=400)

    routes = [
        Route("/", index), Route("/healthz", healthz), Route("/api/info", info), Route("/api/graphs", graphs),
        Route("/api/graphs/{name}/view", view), Route("/api/graphs/{name}/state", get_state, methods=["GET"]),
        Route("/api/graphs/{name}/state", put_state, methods=["PUT"]),
        Route("/api/graphs/{name}/node/{node_id}", node), Route("/api/graphs/{name}/label", label, methods=["PUT"]),
        Route("/api/graphs/{name}/scores", scores_, methods=["POST"]),
        Route("/api/graphs/{name}/suggest", suggest, methods=["POST"]),
        Route("/api/graphs/{name}/export.json", export),
        Route("/api/graphs/{name}/steer", steer_, methods=["POST"]),
        Route("/api/trace", trace, methods=["POST"]), Route("/api/jobs/{job_id}", job),
        Route("/api/features/{layer:int}/{feature:int}/weights", feature_weights),
        Route("/api/graphs/{name}/qk/{node_id}", qk),
        Mount("/static", app=StaticFiles(directory=str(STATIC)), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, CltraceError: user_error})
    app.state.viewer = v
    app.add_middleware(GZipMiddleware, minimum_size=1000, compresslevel=1)  # level 9 took 190 ms on a 1 MB view
    hosts = host_names(host)
    return Guard(app, token=v.token, hosts=hosts, max_body=max_body)


def submit(v: Viewer, kind: str, fn) -> Response:
    try:
        job = v.jobs.submit(kind, fn)
    except CltraceError as e:
        raise HTTPException(429, str(e)) from None
    return JSONResponse(job.to_dict(), status_code=202)


def export_json(v: Viewer, name: str, loaded: Loaded, node_t: float, edge_t: float, subgraph: bool) -> dict:
    """circuit-tracer / Neuronpedia graph JSON (attribution/export.py), with the person's labels and qParams."""
    g = loaded.graph
    st = v.state(name)
    with loaded.lock:
        sp = loaded.pruner.prune(node_t, edge_t)
    pr = sp.to_prune_result(g)
    pinned = [n for n in st.pinned if n in loaded.index]
    if subgraph:
        # every node and edge, so that each pinned node is written whatever pruning hid; filtered below
        pr.node_mask = torch.ones(g.n_nodes, dtype=torch.bool)
        pr.edge_mask = g.edges != 0
    data = graph_json(g, name, pr, scan=g.meta.get("scan") or None, node_threshold=node_t, edge_threshold=edge_t)
    labels = v.feature_labels(name, loaded)
    for n in data["nodes"]:
        i = loaded.index[n["node_id"]]
        if i < g.n_features and labels[i]:
            n["clerp"] = labels[i]
    if subgraph:
        chosen = set(pinned)
        data["nodes"] = [n for n in data["nodes"] if n["node_id"] in chosen]
        data["links"] = [e for e in data["links"] if e["source"] in chosen and e["target"] in chosen]
    sg_nodes = pinned + [s.id for s in st.supernodes]
    sg_pos = " ".join(f"{round(st.layout[k][0] * 1000)} {round(st.layout[k][1] * 1000)}"
                      for k in sg_nodes if k in st.layout)
    data["qParams"] = {"pinnedIds": pinned, "supernodes": [[s.name, *s.members] for s in st.supernodes],
                       "linkType": st.link_type, "clickedId": st.clicked, "sg_pos": sg_pos,
                       "pruningThreshold": node_t,
                       "clerps": [[loaded.ids[i], labels[i]] for i in range(g.n_features) if labels[i]
                                  and loaded.ids[i] in set(pinned)]}
    data["metadata"]["pruning_settings"] = {"node_threshold": node_t, "edge_threshold": edge_t}
    return data


def serve(directory=".", *, features=None, model: str | None = None, transcoders: str | None = None,
          device: str = "cpu", host: str = "127.0.0.1", port: int = 8765, open_browser: bool = False,
          log=print) -> None:
    """Run the viewer until interrupted; prints the URL first."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"WARNING: serving on {host}: anyone who can reach this address can read your graphs (the page's token "
            "guards changes and model runs, not reading). Use the default 127.0.0.1 unless you mean it.")
    app = make_app(directory, features=features, model=model, transcoders=transcoders, device=device, host=host)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    names = app.app.state.viewer.store.names() if hasattr(app, "app") else []
    log(f"cltrace viewer: {url}  ({len(names)} graph(s) in {Path(directory).resolve()}; Ctrl-C stops)")
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.run()
    finally:
        print("cltrace viewer stopped", file=sys.stderr)
