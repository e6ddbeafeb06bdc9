"""TemplateService on real PostgreSQL: the store (immutable versions, concurrent updates, publish,
paging, the send-time cache and its published-pointer TTL) and the gRPC service over a real
server (every call, every error code, PostgreSQL down → UNAVAILABLE)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2
from google.rpc import code_pb2, error_details_pb2

import devstack
from render.context import deep_merge, struct_to_dict
from render.template_servicer import TemplateServicer
from render.template_store import TemplateAlreadyExists, TemplateNotFound, TemplateStore, VersionNotFound
from render.templates import TemplateCompiler, render_part
from sendtime.profile.v1 import profile_pb2
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from sendtime_common.errors import field_violations, status_of
from sendtime_common.migrate import migrate
from sendtime_common.paging import InvalidPageToken, encode_page_token

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "render" / "migrations"

CART = render_pb2.Template(
    subject="{{ profile.traits.first_name }}, you left something behind",
    html="{% for item in profile.cart.items %}<li>{{ item.name }}</li>{% endfor %}",
    text="Use {{ vars.code }}",
    required_data=["profile.cart.items"],
)


def content(subject: str, **fields: Any) -> render_pb2.Template:
    return render_pb2.Template(subject=subject, **fields)


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    built = struct_pb2.Struct()
    built.update(values)
    return built


async def open_pool(url: str) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=8)
    assert pool is not None
    await migrate(pool, MIGRATIONS, table="render_schema_migrations")
    return pool


@pytest.fixture(scope="module")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await open_pool(database_url)
    yield pool
    await pool.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingPool:
    """The pool, counting the queries made through it (to see what the cache answered)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool, self.queries, self.down = pool, 0, False
        self.flowing = asyncio.Event()  # cleared: queries stall (a PostgreSQL that does not answer)
        self.flowing.set()

    async def fetchrow(self, *args: Any) -> Any:
        self.queries += 1
        if self.down:
            raise ConnectionRefusedError("PostgreSQL is down")
        await self.flowing.wait()
        return await self.pool.fetchrow(*args)


# --- The store ---------------------------------------------------------------------------------


async def test_versions_are_numbered_and_never_change(pool: asyncpg.Pool, unique: str) -> None:
    store = TemplateStore(pool)
    tid = f"t-{unique}"
    first = await store.create(tid, "Cart", content("v1"), publish=False)
    assert (first.name, first.version, first.published_version) == (f"templates/{tid}", 1, 0)
    second = await store.update(tid, content=content("v2"), display_name=None)
    assert (second.version, second.content.subject, second.display_name) == (2, "v2", "Cart")
    assert (await store.get(tid, 1)).content.subject == "v1"
    assert (await store.get(tid)).version == 2
    with pytest.raises(asyncpg.PostgresError, match="immutable"):
        await pool.execute("UPDATE render_template_versions SET content = '' WHERE template_id = $1", tid)
    with pytest.raises(TemplateAlreadyExists):
        await store.create(tid, "", content("again"), publish=False)
    with pytest.raises(VersionNotFound):
        await store.get(tid, 3)
    with pytest.raises(TemplateNotFound):
        await store.get(f"none-{unique}")


async def test_a_display_name_update_makes_no_version(pool: asyncpg.Pool, unique: str) -> None:
    store = TemplateStore(pool)
    tid = f"t-{unique}"
    await store.create(tid, "Old", content("v1"), publish=True)
    renamed = await store.update(tid, content=None, display_name="New")
    assert (renamed.version, renamed.display_name, renamed.published_version) == (1, "New", 1)
    both = await store.update(tid, content=content("v2"), display_name="Newer", publish=True)
    assert (both.version, both.display_name, both.published_version) == (2, "Newer", 2)
    with pytest.raises(TemplateNotFound):
        await store.update(f"none-{unique}", content=content("x"), display_name=None)


async def test_concurrent_updates_get_distinct_versions(pool: asyncpg.Pool, unique: str) -> None:
    store = TemplateStore(pool)
    tid = f"t-{unique}"
    await store.create(tid, "", content("v1"), publish=False)
    updates = await asyncio.gather(
        *(store.update(tid, content=content(f"u{i}"), display_name=None) for i in range(8))
    )
    assert sorted(u.version for u in updates) == list(range(2, 10))
    for update in updates:  # each version holds the content of the update that made it
        assert (await store.get(tid, update.version)).content.subject == update.content.subject


async def test_publish_needs_a_stored_version_and_can_roll_back(pool: asyncpg.Pool, unique: str) -> None:
    store = TemplateStore(pool)
    tid = f"t-{unique}"
    await store.create(tid, "", content("v1"), publish=False)
    await store.update(tid, content=content("v2"), display_name=None)
    assert (await store.publish(tid, 2)).published_version == 2
    rolled_back = await store.publish(tid, 1)
    assert (rolled_back.version, rolled_back.published_version, rolled_back.content.subject) == (1, 1, "v1")
    assert (await store.get(tid)).version == 2  # the latest stays the latest
    with pytest.raises(VersionNotFound):
        await store.publish(tid, 3)
    with pytest.raises(TemplateNotFound):
        await store.publish(f"none-{unique}", 1)


async def test_list_pages_by_name(pool: asyncpg.Pool, unique: str) -> None:
    store = TemplateStore(pool)
    ours = [f"l-{unique}-{i}" for i in (3, 1, 4, 2, 5)]
    for tid in ours:
        await store.create(tid, "", content(f"{tid} v1"), publish=False)
    await store.update(ours[0], content=content("latest"), display_name=None)
    seen: list[render_pb2.StoredTemplate] = []
    token, pages = "", 0
    while True:
        page, token = await store.list(page_size=2, page_token=token)
        assert len(page) <= 2
        seen.extend(page)
        pages += 1
        if not token:
            break
    names = [t.name for t in seen]
    assert names == sorted(set(names))  # by name, each once (other tests' templates included)
    mine = {t.name: t for t in seen if unique in t.name}
    assert list(mine) == [f"templates/l-{unique}-{i}" for i in (1, 2, 3, 4, 5)]
    assert (mine[f"templates/{ours[0]}"].version, mine[f"templates/{ours[0]}"].content.subject) == (
        2,
        "latest",
    )
    assert pages >= 3


async def test_list_rejects_tokens_of_other_listings(pool: asyncpg.Pool) -> None:
    store = TemplateStore(pool)
    dead_letter_token = encode_page_token(["2026-01-01T00:00:00+00:00", 7], {"state": 0, "source": 0})
    with pytest.raises(InvalidPageToken, match="other filters"):
        await store.list(page_size=2, page_token=dead_letter_token)
    with pytest.raises(InvalidPageToken):
        await store.list(page_size=2, page_token="not-a-token")


async def test_get_for_render_caches_versions_and_the_published_pointer_briefly(
    pool: asyncpg.Pool, unique: str
) -> None:
    writer = TemplateStore(pool)  # another replica
    counting, clock = CountingPool(pool), Clock()
    reader = TemplateStore(counting, published_ttl_s=2.0, clock=clock)  # type: ignore[arg-type]
    tid = f"t-{unique}"
    await writer.create(tid, "Cart", content("v1"), publish=True)

    assert (await reader.get_for_render(tid, 0)).content.subject == "v1"  # type: ignore[union-attr]
    assert (await reader.get_for_render(tid, 1)).version == 1  # type: ignore[union-attr]
    assert counting.queries == 1  # both from one query

    await writer.update(tid, content=content("v2"), display_name=None, publish=True)
    stale = await reader.get_for_render(tid, 0)
    assert stale is not None and (stale.version, stale.content.subject) == (1, "v1")  # within the TTL
    clock.now += 2.1
    fresh = await reader.get_for_render(tid, 0)
    assert fresh is not None and (fresh.version, fresh.published_version) == (2, 2)
    assert counting.queries == 2

    fresh.content.subject = "mutated by a caller"
    assert (await reader.get_for_render(tid, 2)).content.subject == "v2"  # type: ignore[union-attr]
    assert (await reader.get_for_render(tid, 1)).content.subject == "v1"  # type: ignore[union-attr]
    assert counting.queries == 2  # versions come from the cache, whatever their age

    await reader.publish(tid, 1)  # this replica's own publish is seen at once
    assert (await reader.get_for_render(tid, 0)).version == 1  # type: ignore[union-attr]


async def test_get_for_render_answers_none_when_there_is_nothing_to_send(
    pool: asyncpg.Pool, unique: str
) -> None:
    counting, clock = CountingPool(pool), Clock()
    store = TemplateStore(counting, clock=clock)  # type: ignore[arg-type]
    tid = f"t-{unique}"
    assert await store.get_for_render(tid, 0) is None
    assert await store.get_for_render(tid, 1) is None
    assert counting.queries == 1  # "no such template" is cached too

    clock.now += 10
    await TemplateStore(pool).create(tid, "", content("draft"), publish=False)
    assert await store.get_for_render(tid, 0) is None  # nothing published
    assert (await store.get_for_render(tid, 1)).content.subject == "draft"  # type: ignore[union-attr]
    assert await store.get_for_render(tid, 7) is None


async def test_sends_keep_the_last_published_version_while_postgres_is_down(
    pool: asyncpg.Pool, unique: str
) -> None:
    counting, clock = CountingPool(pool), Clock()
    store = TemplateStore(counting, published_ttl_s=2.0, clock=clock)  # type: ignore[arg-type]
    tid = f"t-{unique}"
    await TemplateStore(pool).create(tid, "", content("v1"), publish=True)
    assert (await store.get_for_render(tid, 0)).version == 1  # type: ignore[union-attr]
    counting.down, clock.now = True, clock.now + 5
    assert (await store.get_for_render(tid, 0)).version == 1  # type: ignore[union-attr]
    assert (await store.get_for_render(tid, 0)).version == 1  # type: ignore[union-attr]
    assert counting.queries == 2  # asked once more, then not again within the TTL
    with pytest.raises(OSError):
        await store.get_for_render(f"other-{unique}", 0)  # nothing seen before: the error shows


async def test_sends_go_on_with_the_last_published_version_while_postgres_stalls(
    pool: asyncpg.Pool, unique: str
) -> None:
    """Found by the fault matrix (docs/reliability.md): every render waited for an expired
    pointer's read while PostgreSQL stalled, past its deadline. One read goes out; each send
    waits for it at most REFRESH_WAIT_S, then uses the pointer last seen."""
    counting, clock = CountingPool(pool), Clock()
    store = TemplateStore(counting, published_ttl_s=2.0, clock=clock)  # type: ignore[arg-type]
    tid = f"t-{unique}"
    await TemplateStore(pool).create(tid, "", content("v1"), publish=True)
    assert (await store.get_for_render(tid, 0)).version == 1  # type: ignore[union-attr]
    await TemplateStore(pool).update(tid, content=content("v2"), display_name=None, publish=True)

    counting.flowing.clear()
    clock.now += 5
    sends = [asyncio.ensure_future(store.get_for_render(tid, 0)) for _ in range(20)]
    done, _ = await asyncio.wait(sends, timeout=30)  # each bounded by REFRESH_WAIT_S, not by PostgreSQL
    assert done == set(sends)
    assert {s.result().version for s in sends} == {1}  # type: ignore[union-attr]
    assert counting.queries == 2  # one read of the pointer for all of them, still stalled
    assert (await store.get_for_render(tid, 0)).version == 1  # type: ignore[union-attr]
    assert counting.queries == 2  # a send after the wait does not start another

    counting.flowing.set()
    deadline = asyncio.get_running_loop().time() + 30
    while (await store.get_for_render(tid, 0)).version != 2:  # type: ignore[union-attr]
        assert asyncio.get_running_loop().time() < deadline, "the stalled read never landed"
        await asyncio.sleep(0.01)
    assert counting.queries == 2  # the read that stalled brought v2 and its content


async def test_the_version_cache_is_bounded(pool: asyncpg.Pool, unique: str) -> None:
    counting = CountingPool(pool)
    store = TemplateStore(counting, cache_size=1)  # type: ignore[arg-type]
    tid = f"t-{unique}"
    await store.create(tid, "", content("v1"), publish=False)
    await store.update(tid, content=content("v2"), display_name=None)
    await store.get_for_render(tid, 1)
    await store.get_for_render(tid, 2)
    before = counting.queries
    await store.get_for_render(tid, 2)
    assert counting.queries == before
    await store.get_for_render(tid, 1)  # evicted by version 2
    assert counting.queries == before + 1


# --- The gRPC service --------------------------------------------------------------------------


class SamplePreviewer:
    """Renders with the template code sends use, against sample data only; records its calls."""

    def __init__(self, compiler: TemplateCompiler) -> None:
        self.compiler = compiler
        self.calls: list[dict[str, Any]] = []

    async def preview(
        self,
        content: render_pb2.Template,
        customer: profile_pb2.Identifier | None,
        sample_data: dict[str, Any] | None,
        variables: dict[str, Any],
        template_version: int,
        time_left_s: float,
    ) -> render_pb2.RenderResponse:
        self.calls.append({"customer": customer, "version": template_version, "time_left_s": time_left_s})
        context = deep_merge(
            deep_merge(struct_to_dict(content.fallback), sample_data or {}), {"vars": variables}
        )
        for path in content.required_data:
            value: Any = context
            for key in path.split("."):
                value = value.get(key) if isinstance(value, dict) else None
            if not value:
                return render_pb2.RenderResponse(
                    status=render_pb2.RENDER_STATUS_SKIPPED,
                    skip_reason=render_pb2.SKIP_REASON_REQUIRED_DATA_MISSING,
                    skip_detail=f"{path} is missing or empty",
                    template_version=template_version,
                )
        compiled = self.compiler.compile(content.subject, content.html, content.text)
        return render_pb2.RenderResponse(
            subject=render_part(compiled.subject, "subject", context).strip(),
            html=render_part(compiled.html, "html", context),
            text=render_part(compiled.text, "text", context),
            status=render_pb2.RENDER_STATUS_RENDERED,
            template_version=template_version,
        )


@asynccontextmanager
async def template_service(
    store: TemplateStore, previewer: SamplePreviewer
) -> AsyncIterator[render_pb2_grpc.TemplateServiceAsyncStub]:
    """TemplateService on a real gRPC server (port 0), and a stub for it."""
    server = grpc.aio.server()
    render_pb2_grpc.add_TemplateServiceServicer_to_server(
        TemplateServicer(store, previewer.compiler, previewer), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield render_pb2_grpc.TemplateServiceStub(channel)
    finally:
        await server.stop(grace=0)


@pytest.fixture(scope="module")
def previewer() -> SamplePreviewer:
    return SamplePreviewer(TemplateCompiler(cache_size=64))


@pytest.fixture(scope="module")
async def stub(
    pool: asyncpg.Pool, previewer: SamplePreviewer
) -> AsyncIterator[render_pb2_grpc.TemplateServiceAsyncStub]:
    async with template_service(TemplateStore(pool), previewer) as stub:
        yield stub


async def failing(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = status_of(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):  # type: ignore[arg-type]
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError(f"no ErrorInfo in {status}")


async def test_create_update_get_publish(stub: render_pb2_grpc.TemplateServiceAsyncStub, unique: str) -> None:
    tid = f"cart-{unique}"
    created = (
        await stub.CreateTemplate(
            render_pb2.CreateTemplateRequest(template_id=tid, display_name="Cart", content=CART)
        )
    ).template
    assert (created.name, created.version, created.published_version) == (f"templates/{tid}", 1, 0)
    assert created.HasField("create_time") and created.content == CART

    changed = render_pb2.Template()
    changed.CopyFrom(CART)
    changed.text = "Code: {{ vars.code }}"
    updated = (
        await stub.UpdateTemplate(
            render_pb2.UpdateTemplateRequest(name=created.name, content=changed, publish=True)
        )
    ).template
    assert (updated.version, updated.published_version, updated.content.text) == (
        2,
        2,
        "Code: {{ vars.code }}",
    )

    renamed = (
        await stub.UpdateTemplate(
            render_pb2.UpdateTemplateRequest(
                name=created.name,
                display_name="Cart, EU",
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            )
        )
    ).template
    assert (renamed.version, renamed.display_name) == (2, "Cart, EU")

    first = (await stub.GetTemplate(render_pb2.GetTemplateRequest(name=created.name, version=1))).template
    assert (first.version, first.content, first.display_name) == (1, CART, "Cart, EU")
    assert (await stub.GetTemplate(render_pb2.GetTemplateRequest(name=created.name))).template.version == 2

    published = (
        await stub.PublishTemplate(render_pb2.PublishTemplateRequest(name=created.name, version=1))
    ).template
    assert (published.version, published.published_version) == (1, 1)


async def test_list_pages(stub: render_pb2_grpc.TemplateServiceAsyncStub, unique: str) -> None:
    for i in range(3):
        await stub.CreateTemplate(
            render_pb2.CreateTemplateRequest(template_id=f"page-{unique}-{i}", content=content(f"s{i}"))
        )
    names: list[str] = []
    request = render_pb2.ListTemplatesRequest(page_size=2)
    while True:
        response = await stub.ListTemplates(request)
        names.extend(t.name for t in response.templates)
        if not response.next_page_token:
            break
        request.page_token = response.next_page_token
    assert [n for n in names if unique in n] == [f"templates/page-{unique}-{i}" for i in range(3)]

    error = await failing(stub.ListTemplates(render_pb2.ListTemplatesRequest(page_token="bogus")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in field_violations(status_of(error))] == ["page_token"]  # type: ignore[arg-type]


async def test_invalid_requests_name_their_fields(
    stub: render_pb2_grpc.TemplateServiceAsyncStub, unique: str
) -> None:
    bad = content("Hi {{ profil.traits.first_name }}", html="{% if %}", max_data_age={"seconds": -1})
    error = await failing(
        stub.CreateTemplate(render_pb2.CreateTemplateRequest(template_id="Bad_Id", content=bad))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(status_of(error))  # type: ignore[arg-type]
    assert [v.field for v in violations] == [
        "template_id",
        "content.subject",
        "content.html",
        "content.max_data_age",
    ]
    assert violations[1].description.startswith(
        "line 1, column 7: unknown variable 'profil.traits.first_name'"
    )
    assert violations[2].description == "line 1, column 4: missing expression"

    requests: list[Any] = [
        stub.UpdateTemplate(
            render_pb2.UpdateTemplateRequest(
                name="templates/x", update_mask=field_mask_pb2.FieldMask(paths=["display_name"]), publish=True
            )
        ),
        stub.UpdateTemplate(
            render_pb2.UpdateTemplateRequest(
                name="templates/x", content=CART, update_mask=field_mask_pb2.FieldMask(paths=["content.html"])
            )
        ),
        stub.GetTemplate(render_pb2.GetTemplateRequest(name="cart")),
        stub.GetTemplate(render_pb2.GetTemplateRequest(name="templates/x", version=-1)),
        stub.PublishTemplate(render_pb2.PublishTemplateRequest(name="templates/x")),
        stub.ListTemplates(render_pb2.ListTemplatesRequest(page_size=-1)),
        stub.PreviewTemplate(render_pb2.PreviewTemplateRequest(name="templates/x", content=CART)),
        stub.PreviewTemplate(render_pb2.PreviewTemplateRequest()),
        stub.PreviewTemplate(
            render_pb2.PreviewTemplateRequest(
                content=CART,
                customer=profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_EMAIL, value="nope"),
            )
        ),
    ]
    fields = []
    for request in requests:
        error = await failing(request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        fields.append([v.field for v in field_violations(status_of(error))])  # type: ignore[arg-type]
    assert fields == [
        ["publish"],
        ["update_mask.paths[0]"],
        ["name"],
        ["version"],
        ["version"],
        ["page_size"],
        ["content"],
        ["name"],
        ["customer.value"],
    ]


async def test_error_codes(stub: render_pb2_grpc.TemplateServiceAsyncStub, unique: str) -> None:
    name = f"templates/e-{unique}"
    await stub.CreateTemplate(render_pb2.CreateTemplateRequest(template_id=f"e-{unique}", content=CART))

    exists = await failing(
        stub.CreateTemplate(render_pb2.CreateTemplateRequest(template_id=f"e-{unique}", content=CART))
    )
    assert exists.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(exists).reason == "TEMPLATE_ALREADY_EXISTS"

    missing = await failing(stub.GetTemplate(render_pb2.GetTemplateRequest(name=f"templates/none-{unique}")))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert (error_info(missing).reason, error_info(missing).metadata["name"]) == (
        "TEMPLATE_NOT_FOUND",
        f"templates/none-{unique}",
    )
    no_version = await failing(stub.GetTemplate(render_pb2.GetTemplateRequest(name=name, version=9)))
    assert (no_version.code(), error_info(no_version).reason) == (
        grpc.StatusCode.NOT_FOUND,
        "TEMPLATE_VERSION_NOT_FOUND",
    )
    # Past 32 bits (found by schemathesis: it was a 503, the database "unavailable").
    beyond = await failing(stub.GetTemplate(render_pb2.GetTemplateRequest(name=name, version=461718108206)))
    assert (beyond.code(), error_info(beyond).reason) == (
        grpc.StatusCode.NOT_FOUND,
        "TEMPLATE_VERSION_NOT_FOUND",
    )
    update_missing = await failing(
        stub.UpdateTemplate(render_pb2.UpdateTemplateRequest(name=f"templates/none-{unique}", content=CART))
    )
    assert update_missing.code() == grpc.StatusCode.NOT_FOUND

    unpublishable = await failing(
        stub.PublishTemplate(render_pb2.PublishTemplateRequest(name=name, version=2))
    )
    assert unpublishable.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(unpublishable).metadata["version"] == "2"
    publish_missing = await failing(
        stub.PublishTemplate(render_pb2.PublishTemplateRequest(name=f"templates/none-{unique}", version=1))
    )
    assert publish_missing.code() == grpc.StatusCode.NOT_FOUND


async def test_preview_a_stored_version_with_sample_data(
    stub: render_pb2_grpc.TemplateServiceAsyncStub, previewer: SamplePreviewer, unique: str
) -> None:
    name = f"templates/p-{unique}"
    await stub.CreateTemplate(render_pb2.CreateTemplateRequest(template_id=f"p-{unique}", content=CART))
    sample = struct({"profile": {"traits": {"first_name": "Ada"}, "cart": {"items": [{"name": "Lamp <b>"}]}}})
    result = (
        await stub.PreviewTemplate(
            render_pb2.PreviewTemplateRequest(
                name=name, sample_data=sample, variables=struct({"code": "C10"})
            )
        )
    ).result
    assert (result.status, result.template_version) == (render_pb2.RENDER_STATUS_RENDERED, 1)
    assert (result.subject, result.html, result.text) == (
        "Ada, you left something behind",
        "<li>Lamp &lt;b&gt;</li>",
        "Use C10",
    )

    empty_cart = struct({"profile": {"cart": {"items": []}}})
    skipped = (
        await stub.PreviewTemplate(render_pb2.PreviewTemplateRequest(name=name, sample_data=empty_cart))
    ).result
    assert (skipped.status, skipped.skip_detail) == (
        render_pb2.RENDER_STATUS_SKIPPED,
        "profile.cart.items is missing or empty",
    )

    customer = profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_EMAIL, value=" Ada@Example.com ")
    await stub.PreviewTemplate(
        render_pb2.PreviewTemplateRequest(name=name, version=1, customer=customer), timeout=3
    )
    last = previewer.calls[-1]
    assert last["customer"].value == "ada@example.com" and last["version"] == 1  # normalized, as Render does
    assert 0 < last["time_left_s"] <= 3.1  # the caller's deadline


async def test_preview_unsaved_content(stub: render_pb2_grpc.TemplateServiceAsyncStub) -> None:
    draft = content(
        "Hi {{ profile.traits.first_name }}",
        fallback=struct({"profile": {"traits": {"first_name": "there"}}}),
    )
    result = (await stub.PreviewTemplate(render_pb2.PreviewTemplateRequest(content=draft))).result
    assert (result.subject, result.template_version) == ("Hi there", 0)

    invalid = await failing(
        stub.PreviewTemplate(render_pb2.PreviewTemplateRequest(content=content("{{ x }}")))
    )
    assert [v.field for v in field_violations(status_of(invalid))] == ["content.subject"]  # type: ignore[arg-type]

    breaks = content("{{ vars.n | divided_by: 0 }}")
    failed = await failing(stub.PreviewTemplate(render_pb2.PreviewTemplateRequest(content=breaks)))
    assert failed.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in field_violations(status_of(failed))] == ["content.subject"]  # type: ignore[arg-type]


async def test_postgres_down_is_unavailable_with_retry_info(
    private_postgres: tuple[str, Path], previewer: SamplePreviewer, unique: str
) -> None:
    url, workdir = private_postgres
    pool = await open_pool(url)
    try:
        async with template_service(TemplateStore(pool), previewer) as stub:
            await stub.CreateTemplate(
                render_pb2.CreateTemplateRequest(template_id=f"d-{unique}", content=CART)
            )
            devstack.stop_postgres(workdir)
            calls: list[Any] = [
                stub.GetTemplate(render_pb2.GetTemplateRequest(name=f"templates/d-{unique}")),
                stub.CreateTemplate(
                    render_pb2.CreateTemplateRequest(template_id=f"d2-{unique}", content=CART)
                ),
                stub.ListTemplates(render_pb2.ListTemplatesRequest()),
                stub.PublishTemplate(
                    render_pb2.PublishTemplateRequest(name=f"templates/d-{unique}", version=1)
                ),
            ]
            for call in calls:
                error = await asyncio.wait_for(failing(call), timeout=10)
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                status = status_of(error)
                assert status is not None and status.code == code_pb2.UNAVAILABLE
                assert {d.type_url.rsplit("/", 1)[-1] for d in status.details} == {
                    "google.rpc.ErrorInfo",
                    "google.rpc.RetryInfo",
                }
    finally:
        pool.terminate()
