-- Sample schema for `make demo`: a small shop whose users, customers and cards hold PII.
-- Run as the superuser on a fresh cluster: the tables belong to `app`; `analyst` is a second
-- login that the demo policy lets read but not see PII (to show a denial).
CREATE ROLE analyst LOGIN PASSWORD 'analyst';
SET ROLE app;
CREATE SCHEMA billing;
CREATE TABLE public.users (id int PRIMARY KEY, name text, email text, phone text, ssn text,
                           manager_id int, created_at timestamptz DEFAULT now());
COMMENT ON COLUMN public.users.ssn IS 'national id pgguard:pii';
CREATE TABLE public.customers (customer_id int PRIMARY KEY, name text, address text, email text,
                               created_at timestamptz DEFAULT now());
CREATE TABLE public.orders (id serial PRIMARY KEY, user_id int, customer_id int, total numeric,
                            status text, data jsonb, created_at timestamptz DEFAULT now());
CREATE TABLE public.products (id int PRIMARY KEY, name text, price numeric);
CREATE TABLE billing.cards (id int PRIMARY KEY, user_id int, pan text, cvv text, expiry date,
                            brand text);
CREATE VIEW public.user_contacts AS SELECT id, name, email, phone FROM public.users;
CREATE VIEW public.order_summary AS
    SELECT user_id, count(*) AS n, sum(total) AS total FROM public.orders GROUP BY user_id;
CREATE FUNCTION public.get_user_email(uid int) RETURNS text STABLE LANGUAGE sql
    AS $$ SELECT email FROM public.users WHERE id = uid $$;

INSERT INTO public.users (id, name, email, phone, ssn, manager_id)
SELECT i, 'user ' || i, 'user' || i || '@example.com', '555-' || lpad(i::text, 4, '0'),
       lpad((i * 7919 % 1000000000)::text, 9, '0'), NULLIF(i / 10, 0)
FROM generate_series(1, 200) AS i;
INSERT INTO public.customers
SELECT i, 'Customer ' || i, i || ' Main Street', 'billing' || i || '@customer.example'
FROM generate_series(1, 50) AS i;
INSERT INTO public.products SELECT i, 'product ' || i, (i % 40) + 0.99 FROM generate_series(1, 40) AS i;
INSERT INTO public.orders (user_id, customer_id, total, status, data)
SELECT 1 + i % 200, 1 + i % 50, round((random() * 200)::numeric, 2),
       (ARRAY['new', 'paid', 'shipped'])[1 + i % 3], jsonb_build_object('items', i % 5 + 1)
FROM generate_series(1, 5000) AS i;
INSERT INTO billing.cards
SELECT i, i, '4111' || lpad(i::text, 12, '0'), lpad((i % 1000)::text, 3, '0'),
       DATE '2030-01-01', 'visa'
FROM generate_series(1, 200) AS i;
GRANT USAGE ON SCHEMA billing TO analyst;
GRANT SELECT ON ALL TABLES IN SCHEMA public, billing TO analyst;
RESET ROLE;
