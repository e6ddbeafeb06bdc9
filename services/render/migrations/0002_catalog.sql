-- The catalog and the purchase/view statistics that recommendations read (docs/recommendations.md).
-- Built by render's catalog consumer (render/catalog.py) from product_upserted, order_completed
-- and product_viewed events. Nothing here names a customer: the statistics are aggregates, so
-- erasing a person does not have to touch these tables.

-- One row per product. The catalog columns come from the newest product_upserted by
-- occurred_at (ties: the larger event id), so an older upsert arriving late changes nothing.
-- A product seen in orders or views before any upsert has a row with only its counts
-- (occurred_at NULL, not in stock): it is unknown to the catalog and never recommended.
-- The counts sit on the same row so that "popular (in a category)" is one index scan.
CREATE TABLE render_catalog_products (
    sku         text           PRIMARY KEY,
    name        text           NOT NULL DEFAULT '',
    price       numeric(38, 9),            -- exact; NULL when unknown
    currency    text           NOT NULL DEFAULT '',
    category    text           NOT NULL DEFAULT '',
    image_url   text           NOT NULL DEFAULT '',
    url         text           NOT NULL DEFAULT '',
    in_stock    boolean        NOT NULL DEFAULT false,
    occurred_at timestamptz,               -- of the upsert the catalog columns are from
    event_id    text,                      -- that upsert's id
    updated_at  timestamptz    NOT NULL DEFAULT now(),
    purchases   bigint         NOT NULL DEFAULT 0,  -- orders that held the product
    views       bigint         NOT NULL DEFAULT 0,
    -- One purchase weighs as much as 20 views (a view-to-purchase rate of about 5 %).
    score       bigint         GENERATED ALWAYS AS (views + 20 * purchases) STORED
);
CREATE INDEX render_catalog_products_popular ON render_catalog_products (score DESC, sku) WHERE in_stock;
CREATE INDEX render_catalog_products_popular_in_category
    ON render_catalog_products (category, score DESC, sku) WHERE in_stock;

-- How many orders held both products; kept in both directions, so that the partners of a
-- product are one index range, best first. Orders with more distinct skus than the consumer's
-- cap add no pairs (bulk orders say little about what goes together).
CREATE TABLE render_co_purchases (
    sku       text   NOT NULL,
    other_sku text   NOT NULL,
    orders    bigint NOT NULL,
    PRIMARY KEY (sku, other_sku)
);
CREATE INDEX render_co_purchases_best ON render_co_purchases (sku, orders DESC, other_sku);

-- Purchases and views per category, as the events name it (a view's category, else the
-- catalog's at the time): for reports and category ranking; recommendations read the products.
CREATE TABLE render_category_popularity (
    category  text   PRIMARY KEY,
    purchases bigint NOT NULL DEFAULT 0,
    views     bigint NOT NULL DEFAULT 0
);

-- Ids of the events already counted, written in the same transaction as the counts, so a
-- redelivered event counts once. Purged once the event log cannot redeliver them any more.
CREATE TABLE render_catalog_processed_events (
    event_id     text        PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX render_catalog_processed_events_processed_at ON render_catalog_processed_events (processed_at);
