//! The differential fuzzer's generator: from a seed, a random schema over the type catalogue,
//! random source settings and random DML in random-size transactions. Everything is SQL text,
//! so a failing seed is a reproducible case (the same seed gives the same SQL).

use std::fmt::Write as _;

/// splitmix64: small, seedable, and the same on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5eed_f00d_dead_beef)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// 0 ≤ n < bound.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound.max(1)
    }
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }
    /// true with probability pct %.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Generator features switched off until the fix for a bug they find lands (name, symptom).
/// Empty: every bug issue 10 listed and every one this fuzzer found so far is fixed.
/// `PGTIDE_FUZZ_KNOWN_BUGS=on` switches them all back on; `PGTIDE_FUZZ_ENABLE=name,name` some.
pub const KNOWN_BUGS: &[(&str, &str)] = &[];

/// Every feature the generator can switch off, with what it covers.
pub const FEATURES: &[(&str, &str)] = &[
    (
        "stream_in_progress",
        "logical_decoding_work_mem = 64kB on the source database: larger transactions arrive streamed before their commit (14+), savepoints rolled back included",
    ),
    (
        "session_settings",
        "non-default IntervalStyle / DateStyle / bytea_output / extra_float_digits / TimeZone on the source database (walsender inherits them)",
    ),
    (
        "char_in_full",
        "char(n) columns in REPLICA IDENTITY FULL tables",
    ),
    (
        "full_text_cast",
        "boolean and inet columns in REPLICA IDENTITY FULL tables (their ::text cast is not their output form)",
    ),
    (
        "flipflop_full_partitions",
        "flip-flop updates (A→B→A in one transaction) on FULL identity partitioned tables",
    ),
    (
        "identity_always_not_key",
        "GENERATED ALWAYS identity columns outside the key",
    ),
    (
        "full_partitions",
        "partitioned tables whose partitions are REPLICA IDENTITY FULL",
    ),
    (
        "full_toast_self_assign",
        "self-assignment updates on FULL identity tables with TOASTed values",
    ),
    (
        "full_toast",
        "TOASTed (large) columns in REPLICA IDENTITY FULL tables",
    ),
    (
        "truncate_during_copy",
        "TRUNCATE while the copy runs (of a table not copied yet: MVCC-unsafe, the copy sees it empty)",
    ),
    (
        "full_duplicate_rows",
        "identical rows in REPLICA IDENTITY FULL tables (an UPDATE or DELETE that touches several)",
    ),
    (
        "idle_timeout",
        "idle_in_transaction_session_timeout on the source database shorter than the copy",
    ),
];

pub struct Features {
    off: Vec<&'static str>,
}

impl Features {
    pub fn from_env() -> Self {
        let all_on = std::env::var("PGTIDE_FUZZ_KNOWN_BUGS").is_ok_and(|v| v == "on");
        let enable = std::env::var("PGTIDE_FUZZ_ENABLE").unwrap_or_default();
        let off = KNOWN_BUGS
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| !all_on && !enable.split(',').any(|e| e.trim() == *name))
            .collect();
        Features { off }
    }
    pub fn on(&self, name: &str) -> bool {
        assert!(
            FEATURES.iter().any(|(n, _)| *n == name),
            "unknown feature {name}"
        );
        !self.off.contains(&name)
    }
    pub fn describe(&self) -> String {
        if self.off.is_empty() {
            "all generator features on".into()
        } else {
            format!("switched off (KNOWN_BUGS): {}", self.off.join(", "))
        }
    }
}

/// A type of the catalogue: its SQL name, whether it has an equality operator (REPLICA
/// IDENTITY FULL needs one on the subscriber), and a generator of literals.
pub struct Ty {
    pub sql: &'static str,
    pub eq: bool,
    values: &'static [&'static str],
}

impl Ty {
    /// A value as an SQL expression (sometimes NULL).
    pub fn value(&self, rng: &mut Rng) -> String {
        if rng.chance(8) {
            return "NULL".into();
        }
        format!("{}::{}", quote(rng.pick::<&str>(self.values)), self.sql)
    }
    pub fn is_char_n(&self) -> bool {
        self.sql.starts_with("char(")
    }
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

const STRINGS: &[&str] = &[
    "",
    " ",
    "plain",
    "a,b",
    "quote\"d",
    "it's",
    "back\\slash",
    "new\nline\ttab",
    "ünïcødé 😀",
    "NULL",
    "{}",
    "(,)",
    "trailing  ",
];

pub const CATALOGUE: &[Ty] = &[
    Ty {
        sql: "smallint",
        eq: true,
        values: &["0", "-32768", "32767", "7"],
    },
    Ty {
        sql: "integer",
        eq: true,
        values: &["0", "-2147483648", "2147483647", "42"],
    },
    Ty {
        sql: "bigint",
        eq: true,
        values: &["-9223372036854775808", "9223372036854775807", "1"],
    },
    Ty {
        sql: "numeric",
        eq: true,
        values: &[
            "NaN",
            "Infinity",
            "-Infinity",
            "0",
            "-0.000000000000000000001",
            "123456789012345678901234567890.123456789",
            "3.140",
        ],
    },
    Ty {
        sql: "numeric(10,3)",
        eq: true,
        values: &["1.2345", "-9999999.999", "0.000"],
    },
    Ty {
        sql: "real",
        eq: true,
        values: &[
            "NaN",
            "Infinity",
            "-0",
            "3.4028235e38",
            "1.17549435e-38",
            "0.1",
            "1e-45",
        ],
    },
    Ty {
        sql: "double precision",
        eq: true,
        values: &[
            "NaN",
            "-Infinity",
            "-0",
            "1.7976931348623157e308",
            "5e-324",
            "0.30000000000000004",
            "0.1",
        ],
    },
    Ty {
        sql: "boolean",
        eq: true,
        values: &["true", "false"],
    },
    Ty {
        sql: "text",
        eq: true,
        values: STRINGS,
    },
    Ty {
        sql: "varchar(12)",
        eq: true,
        values: &["", "short", "twelve chars", "ü ", "a'b"],
    },
    Ty {
        sql: "char(5)",
        eq: true,
        values: &["", "a", "ab   ", "abcde", " x", "ü"],
    },
    Ty {
        sql: "\"char\"",
        eq: true,
        values: &["a", "Z", " "],
    },
    Ty {
        sql: "name",
        eq: true,
        values: &["foo", "Mixed Case", "ünï"],
    },
    Ty {
        sql: "bytea",
        eq: true,
        values: &["\\x", "\\x00ff", "\\xdeadbeef005c27", "\\x5c5c"],
    },
    Ty {
        sql: "date",
        eq: true,
        values: &[
            "2024-02-29",
            "infinity",
            "-infinity",
            "0001-01-01 BC",
            "1999-12-31",
            "5874897-12-31",
        ],
    },
    Ty {
        sql: "time",
        eq: true,
        values: &["00:00", "23:59:59.999999", "24:00:00", "12:34:56.5"],
    },
    Ty {
        sql: "timetz",
        eq: true,
        values: &["12:34:56+05:30", "00:00:00-15:59", "23:59:59.999999+00"],
    },
    Ty {
        sql: "timestamp",
        eq: true,
        values: &[
            "infinity",
            "-infinity",
            "2024-02-29 12:34:56.789012",
            "0001-01-01 00:00:00 BC",
            "1999-12-31 23:59:59",
            "294276-12-31 23:59:59",
        ],
    },
    Ty {
        sql: "timestamptz",
        eq: true,
        values: &[
            "infinity",
            "-infinity",
            "2024-02-29 12:34:56.789012+05:30",
            "0001-01-01 00:00:00+00 BC",
            "2024-03-31 02:30:00+01",
            "1970-01-01 00:00:00+00",
        ],
    },
    Ty {
        sql: "interval",
        eq: true,
        values: &[
            "1 year 2 mons 3 days 04:05:06.789",
            "-1 days +02:00",
            "1 mon -1 days",
            "P1Y2M3DT4H5M6S",
            "-178000000 years",
            "00:00:00.000001",
            "-00:00:00.000001",
            "0",
            "1 day -1 hours",
        ],
    },
    Ty {
        sql: "money",
        eq: true,
        values: &["12.34", "-92233720368547758.08", "0", "1000000"],
    },
    Ty {
        sql: "bit(8)",
        eq: true,
        values: &["10101010", "00000000", "11111111"],
    },
    Ty {
        sql: "varbit",
        eq: true,
        values: &["", "1", "1010101010101"],
    },
    Ty {
        sql: "uuid",
        eq: true,
        values: &[
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "00000000-0000-0000-0000-000000000000",
        ],
    },
    Ty {
        sql: "inet",
        eq: true,
        values: &["192.168.0.1/24", "::1", "2001:db8::1/64", "10.0.0.1"],
    },
    Ty {
        sql: "cidr",
        eq: true,
        values: &["10.0.0.0/8", "2001:db8::/32"],
    },
    Ty {
        sql: "macaddr",
        eq: true,
        values: &["08:00:2b:01:02:03"],
    },
    Ty {
        sql: "macaddr8",
        eq: true,
        values: &["08:00:2b:01:02:03:04:05"],
    },
    Ty {
        sql: "json",
        eq: false,
        values: &[
            "{\"a\": 1, \"a\": 2}",
            "[1, 2.50, \"x\"]",
            " {\"sp\" : true} ",
            "null",
            "\"\\u0000\"",
            "1e400",
        ],
    },
    Ty {
        sql: "jsonb",
        eq: true,
        values: &[
            "{\"a\": {\"b\": [1, 2, null]}}",
            "1.50",
            "\"ünï\"",
            "[]",
            "{\"k\": \"it's\"}",
            "null",
        ],
    },
    Ty {
        sql: "integer[]",
        eq: true,
        values: &["{1,NULL,-3}", "{{1,2},{3,4}}", "{}", "[0:1]={5,6}"],
    },
    Ty {
        sql: "text[]",
        eq: true,
        values: &[
            "{\"a,b\",\"quote\\\"d\",NULL,\"NULL\",\"back\\\\slash\"}",
            "{}",
            "{\"\"}",
        ],
    },
    Ty {
        sql: "point",
        eq: false,
        values: &["(1.5,-2)", "(NaN,Infinity)", "(0,-0)"],
    },
    Ty {
        sql: "tsvector",
        eq: true,
        values: &["a fat cat", "'quoted word':1A 'x':2"],
    },
    Ty {
        sql: "xml",
        eq: false,
        values: &["<a x=\"1\">t</a>", "text &amp; more"],
    },
    Ty {
        sql: "int4range",
        eq: true,
        values: &["[1,10)", "empty", "(,5]", "[3,)"],
    },
    Ty {
        sql: "numrange",
        eq: true,
        values: &["[1.5,2.5]", "(,)"],
    },
    Ty {
        sql: "tstzrange",
        eq: true,
        values: &["[2020-01-01 00:00+00,infinity)", "empty"],
    },
    Ty {
        sql: "daterange",
        eq: true,
        values: &["[2020-01-01,2020-02-01)", "[2020-01-01,2020-01-02]"],
    },
    Ty {
        sql: "pg_lsn",
        eq: true,
        values: &["0/0", "FFFFFFFF/FFFFFFFF", "16/B374D848"],
    },
    Ty {
        sql: "fz.mood",
        eq: true,
        values: &["sad", "ok", "it's \"happy\""],
    },
    Ty {
        sql: "fz.posint",
        eq: true,
        values: &["1", "2147483647"],
    },
    Ty {
        sql: "fz.tdom",
        eq: true,
        values: STRINGS,
    },
    Ty {
        sql: "fz.pair",
        eq: true,
        values: &["(1,\"x y\")", "(,)", "(2,\"\")", "(3,\"q\"\"d\")"],
    },
    Ty {
        sql: "fz.floatrange",
        eq: true,
        values: &["[1.5,2.5)", "empty", "(-Infinity,0]"],
    },
    Ty {
        sql: "fz.mood[]",
        eq: true,
        values: &["{sad,ok}", "{}", "{NULL}"],
    },
    Ty {
        sql: "fz.pair[]",
        eq: true,
        values: &["{\"(1,x)\",\"(,)\"}", "{}"],
    },
];

/// The types, enums, domains and composites the catalogue refers to.
pub const PRELUDE: &str = "CREATE SCHEMA fz;
CREATE TYPE fz.mood AS ENUM ('sad', 'ok', 'it''s \"happy\"');
CREATE DOMAIN fz.posint AS integer CHECK (VALUE > 0);
CREATE DOMAIN fz.tdom AS text CHECK (VALUE <> 'forbidden');
CREATE TYPE fz.pair AS (a integer, b text);
CREATE TYPE fz.floatrange AS RANGE (subtype = float8);
CREATE TABLE public.fuzz_done (id int PRIMARY KEY);
";

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Kind {
    /// k int PRIMARY KEY
    Pk,
    /// (k2 text, k int) PRIMARY KEY
    PkComposite,
    /// id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, k int (not unique)
    IdentityAlwaysPk,
    /// k int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY
    IdentityDefaultPk,
    /// k int PRIMARY KEY plus a GENERATED ALWAYS identity column outside the key
    PkPlusIdentityAlways,
    /// k int NOT NULL with a unique index as REPLICA IDENTITY
    UniqueIndexIdentity,
    /// REPLICA IDENTITY FULL, no index
    FullNoIndex,
    /// REPLICA IDENTITY FULL with a (non-unique) index on k
    FullIndex,
    /// partitioned by range (k), PRIMARY KEY (k)
    PartitionedPk,
    /// partitioned by range (k), every partition REPLICA IDENTITY FULL
    PartitionedFull,
}

impl Kind {
    /// k is unique (inserts use ON CONFLICT DO NOTHING, key changes are guarded).
    fn unique_k(self) -> bool {
        matches!(
            self,
            Kind::Pk
                | Kind::IdentityDefaultPk
                | Kind::PkPlusIdentityAlways
                | Kind::UniqueIndexIdentity
                | Kind::PartitionedPk
        )
    }
    fn has_conflict_target(self) -> bool {
        self.unique_k() || self == Kind::PkComposite
    }
    pub fn full(self) -> bool {
        matches!(
            self,
            Kind::FullNoIndex | Kind::FullIndex | Kind::PartitionedFull
        )
    }
    fn partitioned(self) -> bool {
        matches!(self, Kind::PartitionedPk | Kind::PartitionedFull)
    }
}

pub struct Col {
    pub name: String,
    pub ty: &'static Ty,
}

pub struct Table {
    /// schema-qualified, quoted
    pub name: String,
    pub kind: Kind,
    pub cols: Vec<Col>,
    /// a column for large (TOASTed) values: (name, type: text | bytea | jsonb)
    pub big: Option<(String, &'static str)>,
    /// quoted, qualified leaf partitions
    pub partitions: Vec<String>,
    /// a FULL identity table's column of distinct values, so that no two rows are identical
    /// (only while full_duplicate_rows is off)
    pub rid: bool,
}

impl Table {
    fn insert_cols(&self) -> Vec<String> {
        let mut c = vec!["k".to_string()];
        if self.kind == Kind::PkComposite {
            c.push("k2".into());
        }
        c.extend(self.cols.iter().map(|c| c.name.clone()));
        if let Some((b, _)) = &self.big {
            c.push(b.clone());
        }
        if self.rid {
            c.push("rid".into());
        }
        c
    }
}

pub struct Case {
    pub seed: u64,
    pub features: String,
    /// ALTER DATABASE … SET statements for the source database (name substituted by the caller)
    pub settings: Vec<(String, String)>,
    pub schema: String,
    pub initial: String,
    /// DML transactions (each a complete BEGIN … COMMIT/ROLLBACK script) before the copy ends
    pub during_copy: Vec<String>,
    /// DML transactions once apply runs
    pub after_copy: Vec<String>,
    /// the copy is held open this long per table part (failpoint), so DML lands during it
    pub copy_sleep_ms: u64,
}

impl Case {
    /// A case read back from a script `script` wrote (hand-minimised, for instance); the DML
    /// runs one transaction (up to a `COMMIT;` or `ROLLBACK;` line) at a time.
    pub fn from_script(seed: u64, text: &str) -> Case {
        let mut case = Case {
            seed,
            features: "read from a script".into(),
            settings: Vec::new(),
            schema: String::new(),
            initial: String::new(),
            during_copy: Vec::new(),
            after_copy: Vec::new(),
            copy_sleep_ms: 0,
        };
        let mut section = 0;
        let mut during = String::new();
        let mut after = String::new();
        for line in text.lines() {
            if let Some(ms) = line.strip_prefix("-- copy held open ") {
                case.copy_sleep_ms = ms.split(' ').next().unwrap().parse().unwrap();
                continue;
            }
            if line.starts_with("-- schema") {
                section = 1;
            } else if line.starts_with("-- initial rows") {
                section = 2;
            } else if line.starts_with("-- DML while the copy runs") {
                section = 3;
            } else if line.starts_with("-- DML once apply runs") {
                section = 4;
            }
            if line.starts_with("--") {
                continue;
            }
            if section == 0 {
                if let Some(rest) = line.strip_prefix("ALTER DATABASE ") {
                    let (_, set) = rest.split_once(" SET ").unwrap();
                    let (k, v) = set.trim_end_matches(';').split_once(" = ").unwrap();
                    case.settings.push((k.into(), v.into()));
                }
                continue;
            }
            let target = match section {
                1 => &mut case.schema,
                2 => &mut case.initial,
                3 => &mut during,
                _ => &mut after,
            };
            target.push_str(line);
            target.push('\n');
        }
        // One batch per transaction, as the generated cases run (apply's batching depends on it).
        let split = |section: String| {
            let mut out = Vec::new();
            let mut current = String::new();
            for line in section.lines() {
                current.push_str(line);
                current.push('\n');
                if line == "COMMIT;" || line == "ROLLBACK;" {
                    out.push(std::mem::take(&mut current));
                }
            }
            if !current.trim().is_empty() {
                out.push(current);
            }
            out
        };
        case.during_copy = split(during);
        case.after_copy = split(after);
        case
    }

    pub fn script(&self, db: &str) -> String {
        let mut s = format!(
            "-- pgtide differential fuzzer, seed {} ({})\n-- copy held open {} ms per part\n",
            self.seed, self.features, self.copy_sleep_ms
        );
        for (k, v) in &self.settings {
            let _ = writeln!(s, "ALTER DATABASE {db} SET {k} = {v};");
        }
        let _ = writeln!(s, "\n-- schema\n{}", self.schema);
        let _ = writeln!(s, "-- initial rows (before the slot)\n{}", self.initial);
        let _ = writeln!(s, "-- DML while the copy runs");
        for t in &self.during_copy {
            let _ = writeln!(s, "{t}");
        }
        let _ = writeln!(s, "-- DML once apply runs");
        for t in &self.after_copy {
            let _ = writeln!(s, "{t}");
        }
        s
    }
}

fn big_value(rng: &mut Rng, ty: &str) -> String {
    let n = *rng.pick(&[1u64, 40, 300, 1000]);
    let tag = rng.below(1_000_000);
    match ty {
        "text" => format!(
            "(SELECT string_agg(md5(g::text || '{tag}'), '') FROM generate_series(1, {n}) g)"
        ),
        "bytea" => format!(
            "decode((SELECT string_agg(md5(g::text || '{tag}'), '') FROM generate_series(1, {n}) g), 'hex')"
        ),
        _ => format!(
            "(SELECT jsonb_agg(jsonb_build_object('k', g, 'v', md5(g::text || '{tag}'))) FROM generate_series(1, {n}) g)"
        ),
    }
}

pub fn generate(seed: u64, features: &Features) -> Case {
    let mut rng = Rng::new(seed);
    let mut settings = Vec::new();
    if features.on("session_settings") {
        let choices: &[(&str, &[&str])] = &[
            (
                "IntervalStyle",
                &["postgres", "postgres_verbose", "sql_standard", "iso_8601"],
            ),
            (
                "DateStyle",
                &[
                    "'ISO, MDY'",
                    "'SQL, DMY'",
                    "'German'",
                    "'Postgres, MDY'",
                    "'ISO, YMD'",
                    "'SQL, MDY'",
                ],
            ),
            ("bytea_output", &["hex", "escape"]),
            ("extra_float_digits", &["-15", "0", "1", "3"]),
            (
                "TimeZone",
                &[
                    "'UTC'",
                    "'America/New_York'",
                    "'Asia/Kolkata'",
                    "'Pacific/Chatham'",
                    "'Europe/Berlin'",
                ],
            ),
        ];
        for (k, vals) in choices {
            if rng.chance(70) {
                settings.push((k.to_string(), rng.pick(vals).to_string()));
            }
        }
    }
    if rng.chance(50) {
        let sp = *rng.pick(&["'fz, public'", "''", "pg_catalog", "'\"$user\"'"]);
        settings.push(("search_path".into(), sp.into()));
    }
    let copy_sleep_ms = *rng.pick(&[0u64, 200, 500]);
    if features.on("idle_timeout") && rng.chance(30) {
        settings.push(("idle_in_transaction_session_timeout".into(), "'1s'".into()));
    }
    if features.on("stream_in_progress") && rng.chance(40) {
        settings.push(("logical_decoding_work_mem".into(), "'64kB'".into()));
    }

    let kinds = [
        Kind::Pk,
        Kind::PkComposite,
        Kind::IdentityAlwaysPk,
        Kind::IdentityDefaultPk,
        Kind::PkPlusIdentityAlways,
        Kind::UniqueIndexIdentity,
        Kind::FullNoIndex,
        Kind::FullIndex,
        Kind::PartitionedPk,
        Kind::PartitionedFull,
    ];
    let ntables = rng.range(2, 4);
    let mut tables = Vec::new();
    let mut schema = String::from(PRELUDE);
    for i in 0..ntables {
        let mut kind = *rng.pick(&kinds);
        if kind == Kind::PkPlusIdentityAlways && !features.on("identity_always_not_key") {
            kind = Kind::Pk;
        }
        if kind == Kind::PartitionedFull && !features.on("full_partitions") {
            kind = Kind::PartitionedPk;
        }
        let schema_name = if rng.chance(30) { "fz" } else { "public" };
        let base = if rng.chance(25) {
            format!("Odd T{i}")
        } else {
            format!("t{i}")
        };
        let name = format!("{schema_name}.\"{base}\"");
        let ncols = rng.range(1, 4);
        let mut cols = Vec::new();
        for c in 0..ncols {
            let ty = loop {
                let ty = rng.pick(CATALOGUE);
                if kind.full() && !ty.eq {
                    continue;
                }
                if kind.full() && ty.is_char_n() && !features.on("char_in_full") {
                    continue;
                }
                if kind.full()
                    && matches!(ty.sql, "boolean" | "inet")
                    && !features.on("full_text_cast")
                {
                    continue;
                }
                break ty;
            };
            let cname = if rng.chance(15) {
                format!("\"Col {c}\"")
            } else if rng.chance(10) {
                "\"select\"".to_string()
            } else {
                format!("c{c}")
            };
            if cols.iter().any(|x: &Col| x.name == cname) {
                continue;
            }
            cols.push(Col { name: cname, ty });
        }
        let big = rng
            .chance(50)
            .then(|| ("big".to_string(), *rng.pick(&["text", "bytea", "jsonb"])))
            .filter(|_| !kind.full() || features.on("full_toast"));
        let mut ddl = format!("CREATE TABLE {name} (\n");
        match kind {
            Kind::Pk | Kind::PartitionedPk => ddl.push_str("  k int NOT NULL,\n"),
            Kind::PkComposite => ddl.push_str("  k int NOT NULL,\n  k2 text NOT NULL,\n"),
            Kind::IdentityAlwaysPk => {
                ddl.push_str("  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n  k int,\n")
            }
            Kind::IdentityDefaultPk => {
                ddl.push_str("  k int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,\n")
            }
            Kind::PkPlusIdentityAlways => ddl.push_str(
                "  k int PRIMARY KEY,\n  seqno bigint GENERATED ALWAYS AS IDENTITY (START 100),\n",
            ),
            Kind::UniqueIndexIdentity => ddl.push_str("  k int NOT NULL,\n"),
            Kind::FullNoIndex | Kind::FullIndex | Kind::PartitionedFull => {
                ddl.push_str("  k int,\n")
            }
        }
        for c in &cols {
            let _ = writeln!(ddl, "  {} {},", c.name, c.ty.sql);
        }
        if let Some((b, t)) = &big {
            let _ = writeln!(ddl, "  {b} {t},");
        }
        let rid = kind.full() && !features.on("full_duplicate_rows");
        if rid {
            ddl.push_str("  rid bigint,\n");
        }
        if rng.chance(40) {
            ddl.push_str("  g bigint GENERATED ALWAYS AS (k::bigint * 3 + 1) STORED,\n");
        }
        if let Some(c) = cols.iter().find(|c| c.ty.sql == "text")
            && rng.chance(50)
        {
            let _ = writeln!(
                ddl,
                "  gt text GENERATED ALWAYS AS (upper({}) || '!') STORED,",
                c.name
            );
        }
        match kind {
            Kind::Pk | Kind::PartitionedPk => ddl.push_str("  PRIMARY KEY (k)\n"),
            Kind::PkComposite => ddl.push_str("  PRIMARY KEY (k2, k)\n"),
            _ => {
                ddl.truncate(ddl.trim_end_matches([',', '\n']).len());
                ddl.push('\n');
            }
        }
        ddl.push(')');
        let mut partitions = Vec::new();
        if kind.partitioned() {
            ddl.push_str(" PARTITION BY RANGE (k);\n");
            let bounds = ["FROM (MINVALUE) TO (10)", "FROM (10) TO (20)", "DEFAULT"];
            for (p, b) in bounds.iter().enumerate() {
                let pname = format!("{schema_name}.\"{base}_p{p}\"");
                let _ = writeln!(
                    ddl,
                    "CREATE TABLE {pname} PARTITION OF {name} {}{b};",
                    if *b == "DEFAULT" { "" } else { "FOR VALUES " }
                );
                if kind == Kind::PartitionedFull {
                    let _ = writeln!(ddl, "ALTER TABLE {pname} REPLICA IDENTITY FULL;");
                }
                partitions.push(pname);
            }
            if kind == Kind::PartitionedFull {
                let _ = writeln!(ddl, "ALTER TABLE {name} REPLICA IDENTITY FULL;");
            }
        } else {
            ddl.push_str(";\n");
        }
        match kind {
            Kind::UniqueIndexIdentity => {
                let _ = writeln!(
                    ddl,
                    "CREATE UNIQUE INDEX \"{base}_k\" ON {name} (k);\nALTER TABLE {name} REPLICA IDENTITY USING INDEX \"{base}_k\";"
                );
            }
            Kind::FullIndex => {
                let _ = writeln!(
                    ddl,
                    "CREATE INDEX ON {name} (k);\nALTER TABLE {name} REPLICA IDENTITY FULL;"
                );
            }
            Kind::FullNoIndex => {
                let _ = writeln!(ddl, "ALTER TABLE {name} REPLICA IDENTITY FULL;");
            }
            _ => {}
        }
        schema.push_str(&ddl);
        tables.push(Table {
            name,
            kind,
            cols,
            big,
            partitions,
            rid,
        });
    }

    let mut initial = String::new();
    for t in &tables {
        for _ in 0..rng.range(3, 12) {
            initial.push_str(&insert(&mut rng, t, None));
            initial.push('\n');
        }
    }
    let mut g = DmlGen {
        rng,
        features,
        savepoint: 0,
        truncate: features.on("truncate_during_copy"),
    };
    let during_copy = (0..g.rng.range(2, 8))
        .map(|_| g.transaction(&tables))
        .collect();
    g.truncate = true;
    let after_copy = (0..g.rng.range(4, 16))
        .map(|_| g.transaction(&tables))
        .collect();
    Case {
        seed,
        features: features.describe(),
        settings,
        schema,
        initial,
        during_copy,
        after_copy,
        copy_sleep_ms,
    }
}

fn key_value(rng: &mut Rng) -> i64 {
    rng.range(0, 30)
}

fn insert(rng: &mut Rng, t: &Table, k: Option<i64>) -> String {
    let cols = t.insert_cols();
    let rows = if k.is_some() { 1 } else { rng.range(1, 3) };
    let mut values = Vec::new();
    let mut first_row = String::new();
    for r in 0..rows {
        let mut v = Vec::new();
        let kv = k.unwrap_or_else(|| key_value(rng));
        v.push(
            if t.kind == Kind::IdentityDefaultPk && k.is_none() && rng.chance(20) {
                "DEFAULT".to_string()
            } else {
                kv.to_string()
            },
        );
        if t.kind == Kind::PkComposite {
            v.push(quote(rng.pick::<&str>(&["a", "b ", "ü"])));
        }
        for c in &t.cols {
            v.push(c.ty.value(rng));
        }
        if let Some((_, bt)) = &t.big {
            v.push(if rng.chance(15) {
                "NULL".into()
            } else {
                big_value(rng, bt)
            });
        }
        if t.rid {
            v.push((rng.next_u64() >> 12).to_string());
        }
        let row = format!("({})", v.join(", "));
        if r == 0 {
            first_row = row.clone();
        }
        values.push(row);
    }
    // A FULL identity table sometimes gets exact duplicate rows.
    if t.kind.full() && !t.rid && rng.chance(20) {
        values.push(first_row);
    }
    format!(
        "INSERT INTO {} ({}) VALUES {}{};",
        t.name,
        cols.join(", "),
        values.join(", "),
        if t.kind.has_conflict_target() {
            " ON CONFLICT DO NOTHING"
        } else {
            ""
        }
    )
}

struct DmlGen<'a> {
    rng: Rng,
    features: &'a Features,
    savepoint: u32,
    truncate: bool,
}

impl DmlGen<'_> {
    fn transaction(&mut self, tables: &[Table]) -> String {
        let mut out = String::from("BEGIN;\n");
        let n = *self.rng.pick(&[1i64, 1, 2, 3, 5, 8, 15]);
        let mut open_savepoint: Option<String> = None;
        for _ in 0..n {
            if open_savepoint.is_none() && self.rng.chance(10) {
                self.savepoint += 1;
                let sp = format!("s{}", self.savepoint);
                let _ = writeln!(out, "SAVEPOINT {sp};");
                open_savepoint = Some(sp);
            }
            let t = self.rng.pick(tables);
            out.push_str(&self.statement(t));
            out.push('\n');
            if let Some(sp) = &open_savepoint
                && self.rng.chance(30)
            {
                if self.rng.chance(50) {
                    let _ = writeln!(out, "ROLLBACK TO SAVEPOINT {sp};");
                } else {
                    let _ = writeln!(out, "RELEASE SAVEPOINT {sp};");
                }
                open_savepoint = None;
            }
        }
        out.push_str(if self.rng.chance(10) {
            "ROLLBACK;"
        } else {
            "COMMIT;"
        });
        out
    }

    fn set_clause(&mut self, t: &Table) -> Option<(String, String)> {
        let n = t.cols.len() + usize::from(t.big.is_some());
        if n == 0 {
            return None;
        }
        let i = self.rng.below(n as u64) as usize;
        Some(if i < t.cols.len() {
            let c = &t.cols[i];
            (c.name.clone(), c.ty.value(&mut self.rng))
        } else {
            let (b, bt) = t.big.as_ref().unwrap();
            (b.clone(), big_value(&mut self.rng, bt))
        })
    }

    fn statement(&mut self, t: &Table) -> String {
        let rng = &mut self.rng;
        let k = key_value(rng);
        let name = &t.name;
        match rng.below(100) {
            0..=21 => insert(rng, t, None),
            22..=41 => match self.set_clause(t) {
                Some((c, v)) => {
                    let range = self.rng.range(0, 3);
                    format!(
                        "UPDATE {name} SET {c} = {v} WHERE k BETWEEN {k} AND {};",
                        k + range
                    )
                }
                None => format!("UPDATE {name} SET k = k WHERE k = {k};"),
            },
            42..=51 => {
                // flip-flop: A → B → A on one row in one transaction
                if t.kind == Kind::PartitionedFull && !self.features.on("flipflop_full_partitions")
                {
                    return format!("DELETE FROM {name} WHERE k = {k};");
                }
                match self.set_clause(t) {
                    Some((c, a)) => {
                        let b = self.value_of(t, &c);
                        format!(
                            "UPDATE {name} SET {c} = {a} WHERE k = {k};\nUPDATE {name} SET {c} = {b} WHERE k = {k};\nUPDATE {name} SET {c} = {a} WHERE k = {k};"
                        )
                    }
                    None => format!(
                        "UPDATE {name} SET k = {m} WHERE k = {k};\nUPDATE {name} SET k = {k} WHERE k = {m};",
                        m = k + 1000
                    ),
                }
            }
            52..=61 => {
                // key change (across partitions too)
                let m = key_value(&mut self.rng);
                if t.kind.unique_k() || t.kind == Kind::PkComposite {
                    format!(
                        "UPDATE {name} SET k = {m} WHERE k = {k} AND NOT EXISTS (SELECT 1 FROM {name} WHERE k = {m});"
                    )
                } else {
                    format!("UPDATE {name} SET k = {m} WHERE k = {k};")
                }
            }
            62..=71 => format!(
                "DELETE FROM {name} WHERE k BETWEEN {k} AND {};",
                k + self.rng.range(0, 2)
            ),
            72..=79 => {
                // delete + re-insert of the same key
                format!(
                    "DELETE FROM {name} WHERE k = {k};\n{}",
                    insert(&mut self.rng, t, Some(k))
                )
            }
            80..=89 => {
                // self-assignment (of the TOASTed column, of an ordinary one, of the key)
                let toast_full = t.kind.full() && t.big.is_some();
                if toast_full && !self.features.on("full_toast_self_assign") {
                    return format!("DELETE FROM {name} WHERE k = {k};");
                }
                let mut choices = vec!["k".to_string()];
                choices.extend(t.cols.iter().map(|c| c.name.clone()));
                if let Some((b, _)) = &t.big {
                    choices.push(b.clone());
                    choices.push(b.clone());
                }
                let col = self.rng.pick(&choices).clone();
                format!("UPDATE {name} SET {col} = {col} WHERE k = {k};")
            }
            90..=95 => {
                // update every row
                match self.set_clause(t) {
                    Some((c, v)) => format!("UPDATE {name} SET {c} = {v};"),
                    None => format!("UPDATE {name} SET k = k + 0;"),
                }
            }
            _ if !self.truncate => format!("DELETE FROM {name} WHERE k = {k};"),
            _ => {
                if t.kind.partitioned() && self.rng.chance(50) {
                    format!("TRUNCATE {};", self.rng.pick(&t.partitions))
                } else {
                    format!("TRUNCATE {name};")
                }
            }
        }
    }

    /// A new value for column `c` of `t`.
    fn value_of(&mut self, t: &Table, c: &str) -> String {
        match t.cols.iter().find(|x| x.name == c) {
            Some(col) => col.ty.value(&mut self.rng),
            None => {
                let (_, bt) = t.big.as_ref().unwrap();
                big_value(&mut self.rng, bt)
            }
        }
    }
}
