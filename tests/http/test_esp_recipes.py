"""The recipes of docs/esp-integration.md, as the email platforms would run them.

Each block marked ``sendtime-recipe=NAME`` in the page is read here, its merge fields are filled
in as the platform fills them (URL-encoded with the filter the recipe names), and exactly that
request goes, with the platform's default headers and timeout, through the Ingress's path rules
(the prod overlay's, deploy/base/ingress.yaml) to the in-process services. The platform's
template side is rendered against the answer: Braze and Customer.io with python-liquid (Braze's
``connected_content`` and ``abort_message`` tags emulated as Braze documents them), Iterable's
two Handlebars forms used by the page by hand. So a wrong path, header, field or filter in the
page fails here.
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import shlex
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp
import pytest
from liquid import Environment
from liquid.ast import Node
from liquid.context import RenderContext
from liquid.stream import TokenStream
from liquid.tag import Tag
from liquid.token import TOKEN_EXPRESSION, TOKEN_TAG, Token
from multidict import CIMultiDict
from yarl import URL

from ingest.server import IngestApp
from profile_service.server import ProfileApp
from render import profiles as render_profiles
from render.server import RenderApp
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.auth.api_keys import KEY_PATTERN
from tests.conftest import repo_root, running_render_app, wait_for_profile
from tests.deploy.manifests import named
from tests.factories import cart_item_added, event, identify

DOC = repo_root() / "docs" / "esp-integration.md"
BLOCK = re.compile(r"^```(?P<lang>\w+) sendtime-recipe=(?P<name>[\w-]+)\n(?P<body>.*?)^```$", re.M | re.S)
DOC_TEMPLATE_ID = "abandoned-cart"

# The platforms' timeouts (docs/esp-integration.md says where each comes from).
BRAZE_TIMEOUT_S = 2.0
ITERABLE_TIMEOUT_S = 10.0
CUSTOMERIO_TIMEOUT_S = 4.0  # not documented for the webhook action: see the page's "Not confirmed"

# This module's render service's deadline for a caller that sends none (HTTP), and its cap on a
# profile lookup: longer than any platform's timeout, so that a platform's timeout decides.
PATIENT_DEADLINE_S = 30.0

# Braze's documented bounds of :cache_max_age, in seconds.
BRAZE_CACHE_MIN_S, BRAZE_CACHE_MAX_S = 300, 14_400


def recipe_blocks() -> dict[str, tuple[str, str]]:
    """The page's recipe blocks: name → (language, text)."""
    found: dict[str, tuple[str, str]] = {}
    for match in BLOCK.finditer(DOC.read_text()):
        assert match["name"] not in found, f"two blocks named {match['name']}"
        found[match["name"]] = (match["lang"], match["body"].removesuffix("\n"))
    return found


def recipe(name: str) -> str:
    return recipe_blocks()[name][1]


@dataclass(frozen=True)
class HttpRecipe:
    """A request as the page writes it: ``METHOD URL``, header lines, a blank line, a body."""

    method: str
    url: str
    headers: list[tuple[str, str]]
    body: str

    @classmethod
    def parse(cls, text: str) -> HttpRecipe:
        head, _, body = text.partition("\n\n")
        request_line, *header_lines = head.strip().splitlines()
        method, url = request_line.split(" ", 1)
        headers = [(n.strip(), v.strip()) for n, v in (line.split(":", 1) for line in header_lines)]
        return cls(method, url.strip(), headers, body.strip())


# --- the Ingress: one base URL, a path rule per route ----------------------------------------------


@dataclass(frozen=True)
class Ingress:
    """The Ingress's host and path rules, and where each service listens in this test run."""

    host: str
    rules: list[tuple[str, str, str]]  # (path, pathType, service)
    ports: Mapping[str, int]

    @classmethod
    def load(cls, ports: Mapping[str, int]) -> Ingress:
        spec = named("prod", "Ingress", "sendtime")["spec"]
        (rule,) = spec["rules"]
        paths = [(p["path"], p["pathType"], p["backend"]["service"]["name"]) for p in rule["http"]["paths"]]
        return cls(rule["host"], paths, ports)

    def backend(self, url: str) -> URL:
        """Where the Ingress sends ``url`` (kept percent-encoded as sent): the in-process service."""
        sent = URL(url, encoded=True)
        assert sent.scheme == "https" and sent.host == self.host, f"{url} is not the Ingress's base URL"
        path = sent.raw_path
        exact = [s for p, kind, s in self.rules if kind == "Exact" and p == path]
        prefixes = sorted(
            (
                (p, s)
                for p, kind, s in self.rules
                if kind == "Prefix" and (path == p or path.startswith(p + "/"))
            ),
            key=lambda found: len(found[0]),
        )
        service = exact[0] if exact else prefixes[-1][1]
        query = f"?{sent.raw_query_string}" if sent.raw_query_string else ""
        return URL(f"http://127.0.0.1:{self.ports[service]}{path}{query}", encoded=True)


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: Any
    url: str


async def send(
    ingress: Ingress,
    method: str,
    url: str,
    headers: list[tuple[str, str]],
    body: str,
    timeout_s: float,
) -> Answer:
    """Send the request as the platform would, within its timeout."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http,
        http.request(
            method,
            ingress.backend(url),
            headers=CIMultiDict(headers),
            data=body.encode() if body else None,
        ) as answer,
    ):
        raw = await answer.read()
        parsed = json.loads(raw) if raw else None
        return Answer(answer.status, CIMultiDict(answer.headers), parsed, url)


# --- Braze's side: Liquid with connected_content and abort_message ---------------------------------


class BrazeAbort(Exception):
    """``{% abort_message('reason') %}``: the message is not sent."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ConnectedContent:
    """The markup of a ``{% connected_content URL :option … %}`` tag, as Braze documents it."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    save: str = "connected"
    method: str = "get"
    cache_max_age: int | None = None
    retry: bool = False
    no_cache: bool = False

    @classmethod
    def parse(cls, markup: str) -> ConnectedContent:
        url, rest = _split_url(markup.strip())
        options: dict[str, Any] = {}
        position = 0
        decoder = json.JSONDecoder()
        while (found := re.compile(r"\s*:(\w+)").match(rest, position)) is not None:
            name, position = found[1], found.end()
            if name in ("retry", "no_cache"):
                options[name] = True
                continue
            if name == "headers":
                start = len(rest) - len(rest[position:].lstrip())
                options["headers"], position = decoder.raw_decode(rest, start)
                continue
            value = re.compile(r"\s+(\S+)").match(rest, position)
            assert value is not None, f"connected_content: :{name} has no value"
            position = value.end()
            if name == "save":
                options["save"] = value[1]
            elif name == "method":
                options["method"] = value[1].lower()
            elif name == "cache_max_age":
                options["cache_max_age"] = int(value[1])
            else:
                raise AssertionError(f"connected_content: :{name} is not an option these recipes use")
        assert not rest[position:].strip(), f"connected_content: cannot read {rest[position:]!r}"
        return cls(url=url, **options)


def _split_url(markup: str) -> tuple[str, str]:
    """The URL (up to the first space outside ``{{ }}``) and the options after it."""
    depth = 0
    for i, char in enumerate(markup):
        if markup.startswith("{{", i):
            depth += 1
        elif markup.startswith("}}", i) and depth:
            depth -= 1
        elif char.isspace() and not depth:
            return markup[:i], markup[i:]
    return markup, ""


@dataclass
class BrazeCall:
    """One Connected Content call as Braze made it, and its answer."""

    tag: ConnectedContent
    answer: Answer


Fetch = Callable[[ConnectedContent, str, dict[str, str]], Awaitable[Answer]]


class BrazeEnvironment(Environment):
    """Liquid as Braze runs it, for these recipes: attributes written ``${name}``, the
    ``url_encode`` filter, and the two tags."""

    def __init__(self, fetch: Fetch) -> None:
        super().__init__()
        self.fetch = fetch
        self.calls: list[BrazeCall] = []
        self.add_tag(ConnectedContentTag)
        self.add_tag(AbortMessageTag)

    async def render_message(self, source: str, attributes: Mapping[str, object]) -> str:
        braze_liquid = re.sub(r"\$\{(\w+)\}", r"\1", source)  # ${email_address}: a user attribute
        rendered: str = await self.from_string(braze_liquid).render_async(**attributes)
        return rendered


class ConnectedContentNode(Node):
    def __init__(self, token: Token, env: BrazeEnvironment, markup: str) -> None:
        super().__init__(token)
        self.env = env
        self.tag = ConnectedContent.parse(markup)

    def render_to_output(self, context: RenderContext, buffer: TextIO) -> int:
        raise NotImplementedError("connected_content renders asynchronously only")

    async def render_to_output_async(self, context: RenderContext, buffer: TextIO) -> int:
        scope = {**context.globals, **context.locals}
        url = await self.env.from_string(self.tag.url).render_async(**scope)
        headers = {
            # Braze's defaults on a GET, then the tag's headers (themselves Liquid)
            "Content-Type": "application/json",
            "Accept": "*/*",
            "User-Agent": "Braze Sender 75e404755ae1270441f07eb238f0faf25e44dfdc",
        }
        for name, value in self.tag.headers.items():
            headers[name] = await self.env.from_string(value).render_async(**scope)
        answer = await self.env.fetch(self.tag, url, headers)
        self.env.calls.append(BrazeCall(self.tag, answer))
        if 200 <= answer.status < 300 and isinstance(answer.body, dict):
            # Braze adds the status to a JSON object answered 2xx; a 404 leaves the variable empty.
            context.assign(self.tag.save, {**answer.body, "__http_status_code__": answer.status})
        return 0


class ConnectedContentTag(Tag):
    name = "connected_content"
    block = False

    def parse(self, stream: TokenStream) -> Node:
        token = stream.eat(TOKEN_TAG)
        markup = stream.current
        assert markup.kind == TOKEN_EXPRESSION, "connected_content needs a URL"
        assert isinstance(self.env, BrazeEnvironment)
        return ConnectedContentNode(token, self.env, markup.value)


class AbortMessageNode(Node):
    def __init__(self, token: Token, reason: str) -> None:
        super().__init__(token)
        self.reason = reason

    def render_to_output(self, context: RenderContext, buffer: TextIO) -> int:
        raise BrazeAbort(self.reason)


class AbortMessageTag(Tag):
    name = "abort_message"
    block = False

    def parse(self, stream: TokenStream) -> Node:
        token = stream.eat(TOKEN_TAG)
        markup = stream.current.value if stream.current.kind == TOKEN_EXPRESSION else "()"
        # Braze: a plain string, no Liquid, e.g. abort_message('Could not get enough recommendations')
        found = re.fullmatch(r"\(\s*(?:'([^']*)'|\"([^\"]*)\")?\s*\)", markup.strip())
        assert found is not None, f"abort_message{markup}: the reason must be a string literal"
        return AbortMessageNode(token, found[1] or found[2] or "")


# --- Iterable's side: the Handlebars forms the page uses -----------------------------------------


def iterable_url(template: str, user: Mapping[str, str]) -> str:
    """A feed URL with ``{{field}}`` and ``{{#urlEncode}}…{{/urlEncode}}`` filled in."""

    def merged(text: str) -> str:
        return re.sub(r"\{\{(\w+)\}\}", lambda m: user[m[1]], text)

    encoded = re.sub(
        r"\{\{#urlEncode\}\}(.*?)\{\{/urlEncode\}\}",
        lambda m: urllib.parse.quote_plus(merged(m[1])),
        template,
    )
    return merged(encoded)


def iterable_template(template: str, feed: Mapping[str, Any], user: Mapping[str, str]) -> str:
    """``[[path.to.field]]`` from the feed, ``{{field}}`` from the user, HTML-escaped as
    Handlebars escapes a merged value."""

    def lookup(path: str) -> str:
        value: Any = feed
        for part in path.split("."):
            value = value.get(part, "") if isinstance(value, dict) else ""
        return html.escape(str(value), quote=True)

    from_feed = re.sub(r"\[\[([\w.]+)\]\]", lambda m: lookup(m[1]), template)
    return re.sub(r"\{\{(\w+)\}\}", lambda m: html.escape(user[m[1]], quote=True), from_feed)


# --- the shop: a template, a customer with a cart, and the platform's key ---------------------------


@dataclass(frozen=True)
class Shop:
    ingress: Ingress
    key: str
    template_id: str
    email: str
    user_id: str
    first_name: str
    item: str

    def doc_url(self, url: str) -> str:
        """The page's URL with this run's template id (template ids are shared by the test run)."""
        return url.replace(f"/templates/{DOC_TEMPLATE_ID}:", f"/templates/{self.template_id}:")

    def with_key(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(n, self.with_key_in(v)) for n, v in headers]

    def with_key_in(self, text: str) -> str:
        return text.replace("YOUR_SENDTIME_KEY", self.key)


async def key_from_the_page(database_url: str) -> str:
    """Run the page's ``bin/sendtime keys create`` line, printing the key only."""
    (line,) = recipe("key").strip().splitlines()
    argv = shlex.split(line)
    assert argv[0] == "bin/sendtime"
    process = await asyncio.create_subprocess_exec(
        str(repo_root() / "bin" / "sendtime"),
        *argv[1:],
        "--quiet",
        env={**os.environ, "DATABASE_URL": database_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    key = out.decode().strip()
    assert KEY_PATTERN.fullmatch(key)
    return key


@pytest.fixture(scope="module")
async def patient_render_app(
    profile_app: ProfileApp, redis_url: str, database_url: str, nats_url: str, profile_reader_key: str
) -> AsyncIterator[RenderApp]:
    """A render service of this module's own, patient with the profile service: the recipes render
    from the live profile, which a loaded machine can take longer than the 1 s default deadline
    (and the 1 s cap on a lookup) to fetch. The platforms' own timeouts still bound each request."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(render_profiles, "LOOKUP_TIMEOUT_MAX_S", PATIENT_DEADLINE_S)
        async with running_render_app(
            profile_app,
            redis_url,
            database_url,
            nats_url,
            profile_reader_key,
            default_deadline_s=PATIENT_DEADLINE_S,
        ) as app:
            yield app


@pytest.fixture(scope="module")
async def shop(
    ingest_app: IngestApp,
    profile_app: ProfileApp,
    patient_render_app: RenderApp,
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    admin_key: str,
    database_url: str,
) -> Shop:
    ports: dict[str, int] = {}
    for name, app in (("ingest", ingest_app), ("profile", profile_app), ("render", patient_render_app)):
        assert app.grpc.http is not None
        ports[name] = app.grpc.http.port
    ingress = Ingress.load(ports)
    unique = uuid.uuid4().hex[:10]
    template_id = f"{DOC_TEMPLATE_ID}-{unique}"

    stored = HttpRecipe.parse(recipe("template"))
    content = json.loads(stored.body)
    assert content["templateId"] == DOC_TEMPLATE_ID
    content["templateId"] = template_id
    headers = [(n, v.replace("YOUR_TEMPLATES_KEY", admin_key)) for n, v in stored.headers]
    made = await send(ingress, stored.method, stored.url, headers, json.dumps(content), 10)
    assert made.status == 200, made.body

    email, user_id = f"ada+news{unique}@example.com", f"u-{unique}"
    sent = await ingest_stub.SendEvents(
        ingest_pb2.SendEventsRequest(
            events=[
                event(email=email, user_id=user_id, identify=identify(first_name="Ada")),
                event(user_id=user_id, cart_item_added=cart_item_added("TRAIL-42", name="Trail runner")),
            ]
        )
    )
    assert all(r.outcome == ingest_pb2.EVENT_OUTCOME_ACCEPTED for r in sent.results)
    await wait_for_profile(
        profile_stub,
        profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_EMAIL, value=email),
        lambda p: len(p.cart.items) == 1 and p.traits["first_name"] == "Ada",
    )
    key = await key_from_the_page(database_url)
    return Shop(ingress, key, template_id, email, user_id, "Ada", "Trail runner")


def max_age(answer: Answer) -> int:
    found = re.fullmatch(r"private, max-age=(\d+)", answer.headers["Cache-Control"])
    assert found is not None, answer.headers["Cache-Control"]
    return int(found[1])


# --- the tests ------------------------------------------------------------------------------------


def test_the_page_marks_every_recipe_and_names_the_ingress_host() -> None:
    blocks = recipe_blocks()
    assert set(blocks) == {
        "key",
        "template",
        "braze-render-subject",
        "braze-render-body",
        "braze-profile-body",
        "iterable-profile",
        "iterable-profile-template",
        "iterable-render",
        "iterable-render-template",
        "customerio-render",
        "customerio-profile",
        "customerio-render-template",
    }
    host = Ingress.load({}).host
    for name, (_, text) in blocks.items():
        for url in re.findall(r"https://[^\s/]+", text):
            assert url == f"https://{host}", f"{name}: {url} is not the Ingress's host"


def braze_environment(shop: Shop) -> BrazeEnvironment:
    async def fetch(tag: ConnectedContent, url: str, headers: dict[str, str]) -> Answer:
        return await send(
            shop.ingress, tag.method.upper(), shop.doc_url(url), list(headers.items()), "", BRAZE_TIMEOUT_S
        )

    return BrazeEnvironment(fetch)


def braze_attributes(shop: Shop, email: str) -> dict[str, str]:
    return {"email_address": email, "user_id": shop.user_id, "first_name": shop.first_name}


def check_braze_tag(tag: ConnectedContent, *, max_age_s: int | None = None) -> None:
    assert tag.save == "sendtime" and tag.retry and tag.method == "get"
    assert tag.headers.keys() == {"Authorization"}
    assert tag.cache_max_age is not None and BRAZE_CACHE_MIN_S <= tag.cache_max_age <= BRAZE_CACHE_MAX_S
    if max_age_s is not None:  # Braze keeps it no longer than Sendtime says it may be reused
        assert tag.cache_max_age <= max_age_s


async def test_braze_renders_subject_and_body_from_sendtime_and_aborts_a_skipped_customer(
    shop: Shop,
) -> None:
    subject_env, body_env = braze_environment(shop), braze_environment(shop)
    subject = await subject_env.render_message(
        shop.with_key_in(recipe("braze-render-subject")), braze_attributes(shop, shop.email)
    )
    body = await body_env.render_message(
        shop.with_key_in(recipe("braze-render-body")), braze_attributes(shop, shop.email)
    )
    assert subject == f"{shop.first_name}, your cart is waiting"
    assert body.strip() == f"<p>Still thinking about {shop.item}?</p>"

    (call,) = subject_env.calls
    assert call.answer.status == 200, call.answer.body
    assert "%2B" in call.answer.url and "%40" in call.answer.url  # the '+' and '@' were encoded
    assert call.answer.body["profileSource"] == "PROFILE_SOURCE_LIVE"
    assert max_age(call.answer) == 300 and call.answer.headers["ETag"].startswith('W/"')
    check_braze_tag(call.tag, max_age_s=max_age(call.answer))
    assert body_env.calls[0].answer.url == call.answer.url  # one URL: Braze's cache answers the second

    with pytest.raises(BrazeAbort) as aborted:
        await braze_environment(shop).render_message(
            shop.with_key_in(recipe("braze-render-body")), braze_attributes(shop, "nobody@example.com")
        )
    assert aborted.value.reason == "sendtime: skipped"

    # Unencoded, the '+' of the address is a space in the query string: not an email, refused.
    raw = f"https://{shop.ingress.host}/v1/templates/{shop.template_id}:render?profile=profiles/email:{shop.email}"
    answer = await send(
        shop.ingress, "GET", raw, [("Authorization", f"Bearer {shop.key}")], "", BRAZE_TIMEOUT_S
    )
    assert answer.status == 400 and answer.body["details"][0]["fieldViolations"][0]["field"] == "profile"


async def test_braze_writes_the_message_from_the_profile_and_falls_back_on_a_404(shop: Shop) -> None:
    env = braze_environment(shop)
    body = await env.render_message(
        shop.with_key_in(recipe("braze-profile-body")), braze_attributes(shop, shop.email)
    )
    assert f"<p>Hi {shop.first_name},</p>" in body and f"<p>{shop.item} × 1</p>" in body
    (call,) = env.calls
    assert call.answer.status == 200 and max_age(call.answer) == 0
    check_braze_tag(call.tag)

    unknown = braze_environment(shop)
    body = await unknown.render_message(
        shop.with_key_in(recipe("braze-profile-body")), braze_attributes(shop, "nobody@example.com")
    )
    (call,) = unknown.calls
    assert call.answer.status == 404 and call.answer.body["code"] == 5
    assert call.answer.body["details"][0]["reason"] == "PROFILE_NOT_FOUND"
    assert "<p>Hi there,</p>" in body and "×" not in body


async def test_iterable_feeds_fetch_the_profile_by_email_and_the_render_by_user_id(shop: Shop) -> None:
    user = {"email": shop.email, "userId": shop.user_id}
    feed = HttpRecipe.parse(recipe("iterable-profile"))
    url = iterable_url(feed.url, user)
    assert "%2B" in url
    answer = await send(shop.ingress, feed.method, url, shop.with_key(feed.headers), "", ITERABLE_TIMEOUT_S)
    assert answer.status == 200 and isinstance(answer.body, dict)  # a JSON feed must be an object
    assert max_age(answer) == 0
    assert iterable_template(recipe("iterable-profile-template"), answer.body, user).strip() == (
        f"<p>Hi {shop.first_name}, your {shop.email} cart is waiting.</p>"
    )
    unknown = await send(
        shop.ingress,
        feed.method,
        iterable_url(feed.url, {**user, "email": "nobody@example.com"}),
        shop.with_key(feed.headers),
        "",
        ITERABLE_TIMEOUT_S,
    )
    assert unknown.status == 404

    feed = HttpRecipe.parse(recipe("iterable-render"))
    answer = await send(
        shop.ingress,
        feed.method,
        shop.doc_url(iterable_url(feed.url, user)),
        shop.with_key(feed.headers),
        "",
        ITERABLE_TIMEOUT_S,
    )
    assert answer.status == 200 and max_age(answer) == 300
    assert iterable_template(recipe("iterable-render-template"), answer.body, user).strip() == (
        f"{shop.first_name}, your cart is waiting (RENDER_STATUS_RENDERED)"
    )
    unknown = await send(
        shop.ingress,
        feed.method,
        shop.doc_url(iterable_url(feed.url, {**user, "userId": "nobody"})),
        shop.with_key(feed.headers),
        "",
        ITERABLE_TIMEOUT_S,
    )
    assert unknown.status == 200 and unknown.body["status"] == "RENDER_STATUS_SKIPPED"


def customerio_attributes() -> list[tuple[str, str]]:
    """The page's table of journey attributes kept from the webhook's response."""
    text = DOC.read_text()
    table = text[text.index("| Attribute (journey) | Value |") :].split("\n\n", 1)[0]
    return re.findall(r"^\| `(\w+)` \| `(\{\{.*?\}\})` \|$", table, re.M)


async def test_customerio_posts_the_render_and_keeps_its_fields_on_the_journey(shop: Shop) -> None:
    liquid = Environment()
    customer = {"id": shop.user_id, "email": shop.email}
    webhook = HttpRecipe.parse(recipe("customerio-render"))
    body = await liquid.from_string(webhook.body).render_async(customer=customer)
    assert json.loads(body)["profile"] == f"profiles/user_id:{shop.user_id}"
    answer = await send(
        shop.ingress,
        webhook.method,
        shop.doc_url(webhook.url),
        shop.with_key(webhook.headers),
        body,
        CUSTOMERIO_TIMEOUT_S,
    )
    assert answer.status == 200, answer.body
    assert answer.headers["Cache-Control"] == "private, max-age=300"

    attributes = customerio_attributes()
    assert [name for name, _ in attributes] == ["sendtime_status", "sendtime_subject", "sendtime_html"]
    journey = {
        name: await liquid.from_string(value).render_async(response=answer.body) for name, value in attributes
    }
    assert journey["sendtime_html"] == f"<p>Still thinking about {shop.item}?</p>"
    subject = await liquid.from_string(recipe("customerio-render-template")).render_async(journey=journey)
    assert subject.strip() == f"{shop.first_name}, your cart is waiting"

    nobody = await liquid.from_string(webhook.body).render_async(customer={"id": "nobody", "email": ""})
    answer = await send(
        shop.ingress,
        webhook.method,
        shop.doc_url(webhook.url),
        shop.with_key(webhook.headers),
        nobody,
        CUSTOMERIO_TIMEOUT_S,
    )
    assert answer.status == 200 and answer.body["status"] == "RENDER_STATUS_SKIPPED"
    journey = {
        name: await liquid.from_string(value).render_async(response=answer.body) for name, value in attributes
    }
    subject = await liquid.from_string(recipe("customerio-render-template")).render_async(journey=journey)
    assert subject.strip() == ""


async def test_customerio_gets_the_profile_by_email_and_a_404_for_an_unknown_one(shop: Shop) -> None:
    liquid = Environment()
    webhook = HttpRecipe.parse(recipe("customerio-profile"))
    url = await liquid.from_string(webhook.url).render_async(
        customer={"id": shop.user_id, "email": shop.email}
    )
    assert "%2B" in url
    answer = await send(
        shop.ingress, webhook.method, url, shop.with_key(webhook.headers), "", CUSTOMERIO_TIMEOUT_S
    )
    assert answer.status == 200 and answer.body["profile"]["traits"]["first_name"] == shop.first_name
    assert [i["name"] for i in answer.body["profile"]["cart"]["items"]] == [shop.item]

    url = await liquid.from_string(webhook.url).render_async(
        customer={"id": "x", "email": "nobody@example.com"}
    )
    answer = await send(
        shop.ingress, webhook.method, url, shop.with_key(webhook.headers), "", CUSTOMERIO_TIMEOUT_S
    )
    assert answer.status == 404 and answer.body["details"][0]["reason"] == "PROFILE_NOT_FOUND"


async def test_the_platform_key_reads_profiles_and_renders_and_nothing_else(shop: Shop) -> None:
    base = f"https://{shop.ingress.host}"
    bearer = [("Authorization", f"Bearer {shop.key}")]
    answer = await send(shop.ingress, "GET", f"{base}/v1/templates/{shop.template_id}", bearer, "", 2)
    assert answer.status == 403 and answer.body["details"][0]["metadata"]["scope"] == "templates.read"
    answer = await send(
        shop.ingress,
        "POST",
        f"{base}/v1/events:send",
        [*bearer, ("Content-Type", "application/json")],
        "{}",
        2,
    )
    assert answer.status == 403 and answer.body["details"][0]["metadata"]["scope"] == "events.write"
