"""Local API routes for open-book accounting (split previews, distributions and their
verification, policies) and for a constellation's signed archive and ValueFlows view.

The JSON they return is built in node/accounting_views.py and node/archive.py; the routes
parse requests and sign the distribution records a member proposes or ratifies.
"""

from __future__ import annotations

from aiohttp import web

from valuemesh.node.accounting_views import (
    agreements_view,
    distribution_json,
    distributions_view,
    hex32,
    policies_view,
    revenue_arg,
    revenues_view,
    split_view,
    valueflows_view,
    verify_view,
    who,
)
from valuemesh.node.archive import archive_line, export_archive
from valuemesh.node.engine import Engine
from valuemesh.node.facade import NodeFacade, json_ok, read_json_object
from valuemesh.protocol.accounting import current_policy, ratifiers, try_policy
from valuemesh.protocol.accounting.inputs import DISTRIBUTION_NS
from valuemesh.protocol.errors import LocalError, NotFoundError, ValuemeshError

# The export route writes its lines in pieces of about this size, waiting while the client is behind.
STREAM_BYTES = 256 * 1024


def add_accounting_routes(routes: web.RouteTableDef, node: NodeFacade) -> None:
    """Add the accounting and archive routes to the daemon's API (called by make_app)."""

    ok, body = json_ok, read_json_object

    def engine(request: web.Request) -> Engine:
        return node.engine_for(request.match_info["cid"])

    base = "/v1/constellations/{cid}/accounting"

    @routes.get(f"{base}/agreements")
    async def agreements(request: web.Request) -> web.Response:
        """Agreements with their terms, parties and signatures."""
        return ok({"agreements": agreements_view(engine(request).ledger.reader)})

    @routes.get(f"{base}/revenues")
    async def revenues(request: web.Request) -> web.Response:
        """Final revenue records and the distribution that split each."""
        return ok({"revenues": revenues_view(engine(request).ledger.reader)})

    @routes.get(f"{base}/policies")
    async def policies(request: web.Request) -> web.Response:
        """The adopted split policy and every proposal with votes and outcome."""
        return ok(policies_view(engine(request).ledger.reader))

    @routes.post(f"{base}/split")
    async def split(request: web.Request) -> web.Response:
        """Preview a revenue's split under the adopted, a proposed or a given policy (adopts nothing)."""
        doc = await body(request)
        return ok(split_view(engine(request).ledger.reader, doc))

    @routes.get(f"{base}/distributions")
    async def distributions(request: web.Request) -> web.Response:
        """Proposed and final distributions with their lines and signatures."""
        return ok({"distributions": distributions_view(engine(request).ledger.reader)})

    @routes.post(f"{base}/distributions")
    async def propose(request: web.Request) -> web.Response:
        """Propose the split every node computes now for a revenue."""
        doc = await body(request)
        eng = engine(request)
        state = eng.ledger.reader
        rid = revenue_arg(state, doc.get("revenue"))
        if state.read(DISTRIBUTION_NS, f"done/{rid.hex()}") is not None:
            raise LocalError("This revenue already has a final distribution.")
        policy, _ = current_policy(state)
        dist = try_policy(state, rid, policy)
        res = await node.submit(eng, "distribution", {"op": "propose", "revenue": rid, "hash": dist.hash,
                                                      "policy": dist.policy_hash, "root": dist.inputs_root})
        return ok({**res, "revenue": rid.hex(), "distribution": distribution_json(state, dist),
                   "ratifiers": [who(state, k) for k in ratifiers(state, policy, dist)]}, 202)

    @routes.post(f"{base}/distributions/{{did}}/ratify")
    async def ratify(request: web.Request) -> web.Response:
        """Ratify a proposed distribution (optionally pinned to the hash reviewed)."""
        doc = await body(request)
        eng = engine(request)
        did = hex32(request.match_info["did"], "A distribution id")
        d = eng.ledger.reader.read(DISTRIBUTION_NS, f"d/{did.hex()}")
        if not isinstance(d, dict):
            raise NotFoundError("There is no final distribution proposal with that id.")
        if doc.get("hash") is not None and hex32(doc["hash"], "The hash") != d["hash"]:
            raise LocalError("The distribution's hash is not the one you reviewed; look at it again.")
        res = await node.submit(eng, "distribution", {"op": "ratify", "distribution": did, "hash": d["hash"]})
        return ok({**res, "distribution": did.hex(), "hash": d["hash"].hex()}, 202)

    @routes.post(f"{base}/verify")
    async def verify(request: web.Request) -> web.Response:
        """Re-verify distributions from the inputs and policy they carry."""
        doc = await body(request)
        state = engine(request).ledger.reader
        wanted = doc.get("distributions")
        if wanted is None:
            ids = [bytes.fromhex(k[2:]) for k, _ in state.scan(DISTRIBUTION_NS, "d/")]
        elif isinstance(wanted, list) and len(wanted) <= 1000:
            ids = [hex32(x, "A distribution id") for x in wanted]
            for did in ids:
                if state.read(DISTRIBUTION_NS, f"d/{did.hex()}") is None:
                    raise NotFoundError(f"There is no final distribution {did.hex()[:16]}… in this constellation.")
        else:
            raise LocalError("Give the distributions to verify as a list of ids.")
        if not ids:
            raise LocalError("There is no distribution to verify yet.")
        return ok(verify_view(state, ids))

    @routes.get("/v1/constellations/{cid}/export")
    async def export(request: web.Request) -> web.StreamResponse:
        """The signed archive as JSONL, streamed: every block and final record in consensus order."""
        eng = engine(request)
        assert node.store is not None
        items = export_archive(node.store, eng, node.registry)
        head = await anext(items)  # what a node can know is wrong answers 400 before anything is sent
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        buf, size = [archive_line(head)], 0
        try:
            async for it in items:
                buf.append(archive_line(it))
                size += len(buf[-1])
                if size >= STREAM_BYTES:
                    await resp.write("".join(buf).encode())  # waits while the client is behind
                    buf, size = [], 0
        except ValuemeshError as exc:
            # Too late for a status: a last line says what went wrong, and the archive has no end.
            buf.append(archive_line({"kind": "error", "error": exc.message}))
        finally:
            await items.aclose()
        await resp.write("".join(buf).encode())
        await resp.write_eof()
        return resp

    @routes.get("/v1/constellations/{cid}/valueflows")
    async def valueflows(request: web.Request) -> web.Response:
        """A ValueFlows JSON-LD view of the final ledger."""
        eng = engine(request)
        return ok(valueflows_view(eng.ledger.reader, eng.cid))
