"""Product recommendations for one customer, for templates as ``recommendations``.

Sources, in priority order: the cart's items, products often bought together with the cart's
(and the customer's purchased) products, recently viewed products, products popular in the
customer's categories, and products popular overall to fill the rest (all there is without a
profile). Out-of-stock, unknown and already-bought products never appear; cart items appear
only as ``cart``. A product found by several sources appears once, under the first.

Everything is one SQL statement, so a render costs one database round trip for its
recommendations however many the template shows (docs/recommendations.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import asyncpg

from sendtime.profile.v1 import profile_pb2

REASONS = {1: "cart", 2: "bought_together", 3: "recently_viewed", 4: "popular_in_category", 5: "popular"}
MAX_LIMIT = 100

# Co-purchase partners read per anchor product, best first: enough to rank, bounded for
# products bought with thousands of others.
PARTNERS_PER_ANCHOR = 50

# $1 cart skus (cart order), $2 viewed skus (newest first), $3 the profile's viewed categories,
# $4 excluded skus (already bought), $5 the limit. Each source is cut to the limit after its
# own filters: a source's later products could only show after the whole list is full.
# "eligible" is inlined wherever it is used, so each use reads by index.
_QUERY = f"""
WITH
eligible AS NOT MATERIALIZED (
    SELECT sku, category, score FROM render_catalog_products WHERE in_stock AND sku <> ALL($4::text[])
),
from_cart AS (
    SELECT e.sku, 1 AS priority, min(t.ord) AS rank
    FROM unnest($1::text[]) WITH ORDINALITY AS t(sku, ord) JOIN eligible e USING (sku)
    GROUP BY e.sku ORDER BY rank LIMIT $5
),
anchors AS (
    SELECT sku, bool_or(in_cart) AS in_cart
    FROM (SELECT unnest($1::text[]) AS sku, true AS in_cart
          UNION ALL SELECT unnest($4::text[]), false) a
    GROUP BY sku
),
bought_together AS (
    SELECT partner.sku, 2 AS priority,
           row_number() OVER (ORDER BY bool_or(a.in_cart) DESC, sum(partner.orders) DESC, partner.sku) AS rank
    FROM anchors a CROSS JOIN LATERAL (
        SELECT c.other_sku AS sku, c.orders
        FROM render_co_purchases c JOIN eligible e ON e.sku = c.other_sku
        WHERE c.sku = a.sku AND c.other_sku <> ALL($1::text[])
        ORDER BY c.orders DESC, c.other_sku LIMIT {PARTNERS_PER_ANCHOR}
    ) partner
    GROUP BY partner.sku ORDER BY rank LIMIT $5
),
recently_viewed AS (
    SELECT e.sku, 3 AS priority, min(t.ord) AS rank
    FROM unnest($2::text[]) WITH ORDINALITY AS t(sku, ord) JOIN eligible e USING (sku)
    GROUP BY e.sku ORDER BY rank LIMIT $5
),
categories AS (
    SELECT category FROM unnest($3::text[]) AS t(category) WHERE category <> ''
    UNION
    SELECT category FROM render_catalog_products
    WHERE sku = ANY($1::text[] || $2::text[]) AND category <> ''
),
popular_in_category AS (
    SELECT sku, 4 AS priority, row_number() OVER (ORDER BY score DESC, sku) AS rank
    FROM (
        SELECT top.sku, top.score
        FROM categories k CROSS JOIN LATERAL (
            SELECT e.sku, e.score FROM eligible e
            WHERE e.category = k.category AND e.score > 0 AND e.sku <> ALL($1::text[])
            ORDER BY e.score DESC, e.sku LIMIT $5
        ) top
        ORDER BY top.score DESC, top.sku LIMIT $5
    ) best
),
popular AS (
    SELECT sku, 5 AS priority, row_number() OVER (ORDER BY score DESC, sku) AS rank
    FROM (
        SELECT e.sku, e.score FROM eligible e
        WHERE e.score > 0 AND e.sku <> ALL($1::text[])
        ORDER BY e.score DESC, e.sku LIMIT $5
    ) best
),
best AS (
    SELECT DISTINCT ON (sku) sku, priority, rank
    FROM (
        SELECT * FROM from_cart UNION ALL SELECT * FROM bought_together
        UNION ALL SELECT * FROM recently_viewed UNION ALL SELECT * FROM popular_in_category
        UNION ALL SELECT * FROM popular
    ) candidates
    ORDER BY sku, priority, rank
)
SELECT p.sku, p.name, p.price, p.currency, p.category, p.image_url, p.url, b.priority
FROM best b JOIN render_catalog_products p USING (sku)
ORDER BY b.priority, b.rank
LIMIT $5
"""


class Recommender:
    """Reads the tables that ``render.catalog.CatalogStore`` keeps."""

    def __init__(self, pool: asyncpg.Pool, *, limit_default: int = 8) -> None:
        self._pool = pool
        self._limit_default = limit_default

    async def recommend(
        self, profile: profile_pb2.Profile | None, purchased_skus: Sequence[str], limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` products (default ``limit_default``, at most ``MAX_LIMIT``), best first,
        as plain values for Liquid: ``{sku, name, price: {amount, currency} | None, category,
        image_url, url, reason}``.

        Raises:
            asyncpg.PostgresError, OSError: the catalog could not be read.
        """
        limit = min(MAX_LIMIT, self._limit_default if limit is None else limit)
        if limit <= 0:
            return []
        cart: list[str] = []
        viewed: list[str] = []
        categories: list[str] = []
        if profile is not None:
            cart = list(dict.fromkeys(i.sku for i in profile.cart.items if i.sku))
            viewed = list(dict.fromkeys(v.sku for v in profile.recently_viewed if v.sku))
            categories = list(dict.fromkeys(v.category for v in profile.recently_viewed if v.category))
        rows = await self._pool.fetch(
            _QUERY, cart, viewed, categories, list(dict.fromkeys(purchased_skus)), limit
        )
        return [_recommendation(r) for r in rows]


def _recommendation(row: asyncpg.Record) -> dict[str, Any]:
    price: Decimal | None = row["price"]
    return {
        "sku": row["sku"],
        "name": row["name"],
        # A float, like the profile's money in templates, so Liquid's math filters work.
        "price": None if price is None else {"amount": float(price), "currency": row["currency"]},
        "category": row["category"],
        "image_url": row["image_url"],
        "url": row["url"],
        "reason": REASONS[row["priority"]],
    }
