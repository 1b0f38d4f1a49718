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

def unnest_runs(cur, sql, source_rows):
    """pgtide's path: one statement per run, a binary text[] parameter per column."""
    for s in range(0, N, RUN):
        chunk = source_rows[s:s + RUN]
        cur.execute(sql, [list(column) for column in zip(*chunk)], binary=True)

def copy_runs(cur, copy_sql, blocks, after=()):
    """One COPY per run, each followed by the statements in `after`."""
    for block in blocks:
        with cur.copy(copy_sql) as cp:
            cp.write(block)
        for statement in after:
            cur.execute(statement)

def bin_block(chunk):
    out = [b"PGCOPY\n\xff\r\n\x00", struct.pack("!ii", 0, 0)]
    for k, v in chunk:
        out.append(struct.pack("!hiiii", 2, 4, int(k), 4, int(v)))
    out.append(struct.pack("!h", -1))
    return b"".join(out)

text_blocks = ["".join(f"{k}\t{v}\n" for k, v in rows[s:s + RUN]) for s in range(0, N, RUN)]
bin_blocks = [bin_block(rows[s:s + RUN]) for s in range(0, N, RUN)]
wide_rows = [(k, v, "note " + k * 3, "2026-11-26 10:00:%02d.%06d+00" % (int(k) % 60, int(k) % 999999)) for k, v in rows]
wide_blocks = ["".join("\t".join(r) + "\n" for r in wide_rows[s:s + RUN]) for s in range(0, N, RUN)]

def staged_update(stage, columns, copy_options, set_sql, analyze=False):
    """COPY each run into a temp table, then one UPDATE ... FROM it."""
    def run(cur):
        cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS {stage} ({columns})")
        after = ([f"ANALYZE {stage}"] if analyze else []) + [
            f"UPDATE pgbench_accounts AS t SET {set_sql.format(r='r')} FROM {stage} AS r WHERE " +
            ("t.aid = r.c1::int" if "c1" in columns else "t.aid = r.aid"),
            f"TRUNCATE {stage}"]
        copy_runs(cur, f"COPY {stage} FROM STDIN{copy_options}",
                  text_blocks if not copy_options else bin_blocks, after)
    return run

UPDATE_UNNEST = ("UPDATE pgbench_accounts AS t SET abalance = r.c2::int "
                 "FROM unnest(%b::text[], %b::text[]) AS r(c1, c2) WHERE t.aid = r.c1::int")
INSERT_UNNEST = ("INSERT INTO hist (aid, delta) SELECT r.c1::int, r.c2::int "
                 "FROM unnest(%b::text[], %b::text[]) AS r(c1, c2)")
INSERT_WIDE_UNNEST = ("INSERT INTO histw (aid, delta, note, at) SELECT r.c1::int, r.c2::int, r.c3::text, "
                      "r.c4::timestamptz FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[]) AS r(c1, c2, c3, c4)")

with conn.cursor() as cur:
    cur.execute("CREATE TABLE IF NOT EXISTS histw (id bigserial PRIMARY KEY, aid int, delta int, note text, at timestamptz)")
    cur.execute("CREATE TABLE IF NOT EXISTS hist (aid int, delta int, mtime timestamptz DEFAULT now())")
if "--inserts" not in sys.argv:
    timed("UPDATE, unnest text[] params (pgtide's updates)", lambda cur: unnest_runs(cur, UPDATE_UNNEST, rows))
    timed("UPDATE, COPY text into temp table + UPDATE FROM",
          staged_update("stage_t", "c1 text, c2 text", "", "abalance = {r}.c2::int"))
    timed("UPDATE, COPY binary into typed temp table + UPDATE FROM",
          staged_update("stage_b", "aid int, abalance int", " (FORMAT binary)", "abalance = {r}.abalance"))
    timed("UPDATE, same + ANALYZE of the temp table per run",
          staged_update("stage_c", "aid int, abalance int", " (FORMAT binary)", "abalance = {r}.abalance", analyze=True))
timed("INSERT, unnest text[] params (pgtide below 32 rows)", lambda cur: unnest_runs(cur, INSERT_UNNEST, rows))
timed("INSERT, COPY binary straight into the table",
      lambda cur: copy_runs(cur, "COPY hist (aid, delta) FROM STDIN (FORMAT binary)", bin_blocks))
timed("INSERT, COPY text straight into the table",
      lambda cur: copy_runs(cur, "COPY hist (aid, delta) FROM STDIN", text_blocks))
timed("INSERT 4 cols + bigserial PK, unnest text[] params", lambda cur: unnest_runs(cur, INSERT_WIDE_UNNEST, wide_rows))
timed("INSERT 4 cols + bigserial PK, COPY text",
      lambda cur: copy_runs(cur, "COPY histw (aid, delta, note, at) FROM STDIN", wide_blocks))
