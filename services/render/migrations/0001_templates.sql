-- Render's own tables (prefixed: render may share a database with other services).

-- One row per template: what changes in place (display name, which version sends use) and the
-- latest version number. Updates take this row's lock to number the next version, so two
-- concurrent updates get distinct versions.
CREATE TABLE render_templates (
    id                text        PRIMARY KEY,
    display_name      text        NOT NULL DEFAULT '',
    latest_version    bigint      NOT NULL CHECK (latest_version >= 1),
    published_version bigint,     -- NULL while none is published
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- Every version ever stored. Versions never change: sends and previews name them, and a
-- rendered message must be reproducible from (template, version).
CREATE TABLE render_template_versions (
    template_id text        NOT NULL REFERENCES render_templates (id),
    version     bigint      NOT NULL CHECK (version >= 1),
    content     bytea       NOT NULL,   -- sendtime.render.v1.Template
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (template_id, version)
);

-- Only a stored version can be published.
ALTER TABLE render_templates ADD CONSTRAINT render_templates_published_version_fkey
    FOREIGN KEY (id, published_version) REFERENCES render_template_versions (template_id, version);

-- The immutability of versions, enforced where no code path can forget it.
CREATE FUNCTION render_template_versions_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'template versions are immutable: % version %', OLD.template_id, OLD.version
        USING ERRCODE = 'integrity_constraint_violation';
END
$$;
CREATE TRIGGER render_template_versions_immutable BEFORE UPDATE ON render_template_versions
    FOR EACH ROW EXECUTE FUNCTION render_template_versions_immutable();
