"""Run by scripts/bench-copy.sh: 500,000 row updates of pgbench_accounts (and 500,000 inserts
into history-like tables) written in runs of 5,000 rows, (A) as pgtide's apply does for updates
(UPDATE ... FROM unnest($1::text[], $2::text[]) with binary text[] parameters) and (B) through a
temp staging table loaded with COPY (text, and binary with typed columns), then UPDATE ... FROM;
inserts by unnest against COPY straight into the table. Each variant runs in a transaction that
is rolled back; best of 3 wall times."""
import struct, sys, time, random
import psycopg

uri = sys.argv[-1]
RUN = 5000
N = 500_000
rows = [(str(i), str(random.randint(-5000, 5000))) for i in range(1, N + 1)]
conn = psycopg.connect(uri, autocommit=True)

def timed(label, body):
    best = None
    for _ in range(3):
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            t0 = time.perf_counter()
            body(cur)
            t = time.perf_counter() - t0
            cur.execute("ROLLBACK")
        best = t if best is None else min(best, t)
    print(f"{label:58s} {best:6.2f} s  ({N / best:,.0f} rows/s)")

def unnest_update(cur):
    for s in range(0, N, RUN):
        chunk = rows[s:s + RUN]
        cur.execute("UPDATE pgbench_accounts AS t SET abalance = r.c2::int FROM unnest(%b::text[], %b::text[]) AS r(c1, c2) WHERE t.aid = r.c1::int",
                    [[k for k, _ in chunk], [v for _, v in chunk]], binary=True)

text_blocks = ["".join(f"{k}\t{v}\n" for k, v in rows[s:s + RUN]) for s in range(0, N, RUN)]
def copy_text_update(cur):
    cur.execute("CREATE TEMP TABLE IF NOT EXISTS stage_t (c1 text, c2 text)")
    for block in text_blocks:
        with cur.copy("COPY stage_t FROM STDIN") as cp:
            cp.write(block)
        cur.execute("UPDATE pgbench_accounts AS t SET abalance = r.c2::int FROM stage_t AS r WHERE t.aid = r.c1::int")
        cur.execute("TRUNCATE stage_t")

def bin_block(chunk):
    out = [b"PGCOPY\n\xff\r\n\x00", struct.pack("!ii", 0, 0)]
    for k, v in chunk:
        out.append(struct.pack("!hiiii", 2, 4, int(k), 4, int(v)))
    out.append(struct.pack("!h", -1))
    return b"".join(out)
bin_blocks = [bin_block(rows[s:s + RUN]) for s in range(0, N, RUN)]
def copy_binary_update(cur):
    cur.execute("CREATE TEMP TABLE IF NOT EXISTS stage_b (aid int, abalance int)")
    for block in bin_blocks:
        with cur.copy("COPY stage_b FROM STDIN (FORMAT binary)") as cp:
            cp.write(block)
        cur.execute("UPDATE pgbench_accounts AS t SET abalance = r.abalance FROM stage_b AS r WHERE t.aid = r.aid")
        cur.execute("TRUNCATE stage_b")

def copy_binary_update_analyzed(cur):
    cur.execute("CREATE TEMP TABLE IF NOT EXISTS stage_c (aid int, abalance int)")
    for block in bin_blocks:
        with cur.copy("COPY stage_c FROM STDIN (FORMAT binary)") as cp:
            cp.write(block)
        cur.execute("ANALYZE stage_c")
        cur.execute("UPDATE pgbench_accounts AS t SET abalance = r.abalance FROM stage_c AS r WHERE t.aid = r.aid")
        cur.execute("TRUNCATE stage_c")

def unnest_insert(cur):
    for s in range(0, N, RUN):
        chunk = rows[s:s + RUN]
        cur.execute("INSERT INTO hist (aid, delta) SELECT r.c1::int, r.c2::int FROM unnest(%b::text[], %b::text[]) AS r(c1, c2)",
                    [[k for k, _ in chunk], [v for _, v in chunk]], binary=True)

def copy_binary_insert(cur):
    for block in bin_blocks:
        with cur.copy("COPY hist (aid, delta) FROM STDIN (FORMAT binary)") as cp:
            cp.write(block)

def copy_text_insert(cur):
    for block in text_blocks:
        with cur.copy("COPY hist (aid, delta) FROM STDIN") as cp:
            cp.write(block)

def copy_text_insert_wide(cur):
    for block in wide_blocks:
        with cur.copy("COPY histw (aid, delta, note, at) FROM STDIN") as cp:
            cp.write(block)

def unnest_insert_wide(cur):
    for s in range(0, N, RUN):
        chunk = wide_rows[s:s + RUN]
        cur.execute("INSERT INTO histw (aid, delta, note, at) SELECT r.c1::int, r.c2::int, r.c3::text, r.c4::timestamptz FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[]) AS r(c1, c2, c3, c4)",
                    [[r[0] for r in chunk], [r[1] for r in chunk], [r[2] for r in chunk], [r[3] for r in chunk]], binary=True)

wide_rows = [(k, v, "note " + k * 3, "2026-11-26 10:00:%02d.%06d+00" % (int(k) % 60, int(k) % 999999)) for k, v in rows]
wide_blocks = ["".join("\t".join(r) + "\n" for r in wide_rows[s:s + RUN]) for s in range(0, N, RUN)]

with conn.cursor() as cur:
    cur.execute("CREATE TABLE IF NOT EXISTS histw (id bigserial PRIMARY KEY, aid int, delta int, note text, at timestamptz)")
    cur.execute("CREATE TABLE IF NOT EXISTS hist (aid int, delta int, mtime timestamptz DEFAULT now())")
if "--inserts" not in sys.argv:
    timed("UPDATE, unnest text[] params (pgtide's updates)", unnest_update)
    timed("UPDATE, COPY text into temp table + UPDATE FROM", copy_text_update)
    timed("UPDATE, COPY binary into typed temp table + UPDATE FROM", copy_binary_update)
    timed("UPDATE, same + ANALYZE of the temp table per run", copy_binary_update_analyzed)
timed("INSERT, unnest text[] params (pgtide below 32 rows)", unnest_insert)
timed("INSERT, COPY binary straight into the table", copy_binary_insert)
timed("INSERT, COPY text straight into the table", copy_text_insert)
timed("INSERT 4 cols + bigserial PK, unnest text[] params", unnest_insert_wide)
timed("INSERT 4 cols + bigserial PK, COPY text", copy_text_insert_wide)
