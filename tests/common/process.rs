//! Running the pgtide binary: in the foreground (exit status and output checked) or in the
//! background (`PgtideChild`, its pipes drained all along).

use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use super::args::Args;
use super::servers::{exec, scalar_i64};

/// The pgtide binary with an environment free of the operator's PGTIDE_* settings.
pub fn pgtide_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgtide"));
    cmd.args(args)
        .env_remove("PGTIDE_SOURCE_PGURI")
        .env_remove("PGTIDE_TARGET_PGURI")
        .env_remove("PGTIDE_DIR")
        .env_remove("PGPASSWORD")
        .env_remove("FAILPOINTS")
        .env("NO_COLOR", "1");
    cmd
}

/// A pgtide running in the background whose stdout and stderr are read as it writes them, by
/// one thread each, into buffers: a chatty pgtide never blocks on a full pipe (64 kB) however
/// long the test takes to look at its output. Derefs to its `Child` (kill, id, try_wait, wait).
pub struct PgtideChild {
    child: Child,
    stdout: Drain,
    stderr: Drain,
}

/// A pipe read to its end by a thread; the bytes so far are in `buf`.
struct Drain {
    buf: Arc<Mutex<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drain {
    fn start(pipe: Option<impl Read + Send + 'static>) -> Self {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let thread = pipe.map(|mut pipe| {
            let buf = Arc::clone(&buf);
            std::thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    buf.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            })
        });
        Drain { buf, thread }
    }

    /// Everything once the pipe is closed (the child exited, and any child of its own that
    /// inherited the pipe too).
    fn finish(mut self) -> Vec<u8> {
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
        std::mem::take(&mut *self.buf.lock().unwrap())
    }

    fn so_far(&self) -> Vec<u8> {
        self.buf.lock().unwrap().clone()
    }
}

impl PgtideChild {
    /// Waits for the exit and returns the whole output, like `Child::wait_with_output`.
    pub fn wait_with_output(mut self) -> std::io::Result<Output> {
        let status = self.child.wait()?;
        let stdout = std::mem::replace(&mut self.stdout, Drain::start(None::<std::io::Empty>));
        let stderr = std::mem::replace(&mut self.stderr, Drain::start(None::<std::io::Empty>));
        Ok(Output {
            status,
            stdout: stdout.finish(),
            stderr: stderr.finish(),
        })
    }

    /// stdout then stderr as written so far (the child may still run).
    pub fn output_so_far(&self) -> String {
        format!(
            "{}{}",
            String::from_utf8_lossy(&self.stdout.so_far()),
            String::from_utf8_lossy(&self.stderr.so_far())
        )
    }
}

/// A test that fails (panics) while its pgtide runs must not leave it behind, holding its
/// slot and origin and retrying for ever: the child is killed when its handle goes.
impl Drop for PgtideChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl std::ops::Deref for PgtideChild {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl std::ops::DerefMut for PgtideChild {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

/// Starts pgtide in the background with extra environment (failpoints), its output read into
/// buffers as it comes (see `PgtideChild`).
pub fn spawn_pgtide(args: &[&str], env: &[(&str, &str)]) -> PgtideChild {
    let mut cmd = pgtide_command(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start pgtide");
    let stdout = Drain::start(child.stdout.take());
    let stderr = Drain::start(child.stderr.take());
    PgtideChild {
        child,
        stdout,
        stderr,
    }
}

pub fn pgtide(args: &[&str]) -> Output {
    pgtide_command(args).output().expect("cannot run pgtide")
}

pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs pgtide and fails the test with its output when it does not exit 0.
pub fn pgtide_ok(args: &[&str]) -> String {
    let out = pgtide(args);
    let all = text(&out);
    assert!(out.status.success(), "pgtide {args:?} failed:\n{all}");
    all
}

/// Runs pgtide expecting failure; returns the output for the message checks.
pub fn pgtide_fails(args: &[&str]) -> String {
    let out = pgtide(args);
    let all = text(&out);
    assert!(
        !out.status.success(),
        "pgtide {args:?} should have failed:\n{all}"
    );
    all
}

/// Runs pgtide, fails the test on a non-zero exit, returns stdout alone.
pub fn pgtide_ok_stdout(args: &[&str]) -> String {
    let out = pgtide(args);
    assert!(
        out.status.success(),
        "pgtide {args:?} failed:\n{}",
        text(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// verify must say identical and exit 0.
pub fn assert_identical(source: &str, target: &str) {
    let out = pgtide_ok(&Args::verify(source, target));
    assert!(out.contains("source and target are identical"), "{out}");
}

/// Waits for a pgtide child to exit (killing it after `secs`) and returns its output (read all
/// along, see `PgtideChild`).
pub fn wait_exit(child: PgtideChild, secs: u64) -> Output {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let mut child = child;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("pgtide did not finish in {secs} s:\n{}", text(&out));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Writes on the source (a change after the slot's snapshot, in the table `tick` the test
/// created with a primary key) and waits until apply has committed something: the clone is
/// done and apply runs.
pub async fn wait_applied(src: &str, dst: &str, slot: &str, child: &mut PgtideChild) {
    exec(src, "INSERT INTO tick VALUES (1) ON CONFLICT DO NOTHING").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let applied = format!(
        "SELECT count(*) FROM pg_replication_origin_status
         WHERE external_id = 'pgtide_{slot}' AND remote_lsn > '0/0'"
    );
    while scalar_i64(dst, &applied).await == 0 {
        if std::time::Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            child.kill().ok();
            child.wait().ok();
            panic!("apply never started:\n{}", child.output_so_far());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A filters file outside the work dir.
pub fn filters_file(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "pgtide-test-{name}-filters-{}.ini",
        std::process::id()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

/// Waits for clone --follow to reach an endpos set at the source's current position, and
/// asserts it succeeded.
pub fn finish_at_current_position(child: PgtideChild, src: &str, d: &str) -> String {
    set_endpos_now(d, src);
    let out = wait_exit(child, 300);
    let all = text(&out);
    assert!(out.status.success(), "clone --follow failed:\n{all}");
    all
}

/// `pgtide sentinel set endpos --current`: the end of a follow at the source's position now.
pub fn set_endpos_now(dir: &str, source: &str) {
    pgtide_ok(&[
        "sentinel",
        "set",
        "endpos",
        "--current",
        "--dir",
        dir,
        "--source",
        source,
    ]);
}

/// Polls `pgtide status --json` (with `args`: --dir and maybe the servers) until `ready` says
/// so, and returns that status; panics with the last one and the child's output when `secs`
/// pass or the child exits first.
pub async fn wait_for_status(
    args: &[&str],
    secs: u64,
    child: &mut PgtideChild,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let status_args = [&["status", "--json"][..], args].concat();
    loop {
        // Until the child has created its work dir, status says there is none: not ready yet.
        let out = pgtide(&status_args);
        let last = if out.status.success() {
            let json: serde_json::Value =
                serde_json::from_str(&String::from_utf8_lossy(&out.stdout))
                    .unwrap_or_else(|e| panic!("status --json is not JSON: {e}"));
            if ready(&json) {
                return json;
            }
            json.to_string()
        } else {
            text(&out)
        };
        if std::time::Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            child.kill().ok();
            panic!("never ready: {last}\n{}", child.output_so_far());
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// Whether a status verdict (at `pointer`: "/verdict", or "/total/verdict" for a whole server)
/// says apply has caught up.
pub fn says_ready(json: &serde_json::Value, pointer: &str) -> bool {
    json.pointer(pointer)
        .and_then(|v| v.as_str())
        .is_some_and(|v| v.starts_with("ready to cut over"))
}

/// pgbench (the server binaries' own) against database `db` of the cluster listening on
/// 127.0.0.1:`port`, as postgres; its password from the environment, never argv.
pub fn pgbench(port: &str, db: &str, args: &[&str]) -> std::process::Child {
    std::process::Command::new(
        std::path::Path::new(&std::env::var("PGTIDE_PG_BIN").expect("PGTIDE_PG_BIN"))
            .join("pgbench"),
    )
    .args(["-h", "127.0.0.1", "-p", port, "-U", "postgres"])
    .args(args)
    .arg(db)
    .env("PGPASSWORD", super::servers::password())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()
}

/// The source cluster's port, for pgbench.
pub fn source_port() -> String {
    std::env::var("PGTIDE_SOURCE_PORT").expect("PGTIDE_SOURCE_PORT is not set: run scripts/test.sh")
}

/// Polls `pgtide sentinel get --dir DIR` until endpos is set (a cutover or rollback pinned
/// it), for `secs` at most.
pub async fn wait_for_endpos(dir: &str, secs: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let sentinel = pgtide_ok_stdout(&["sentinel", "get", "--dir", dir]);
        let sentinel: serde_json::Value = serde_json::from_str(&sentinel).unwrap();
        if sentinel["endpos"].is_string() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "endpos never pinned in {dir}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `clone --follow` from `src` to `dst` in `dir` on `slot`, returned once status says it is
/// ready to cut over.
pub async fn clone_follow_until_ready(src: &str, dst: &str, dir: &str, slot: &str) -> PgtideChild {
    let mut child = spawn_pgtide(&super::clone_follow_args(src, dst, dir, slot), &[]);
    wait_for_status(
        &["--dir", dir, "--source", src, "--target", dst],
        120,
        &mut child,
        |json| says_ready(json, "/verdict"),
    )
    .await;
    child
}

/// Runs pgtide `args` with a sleep at the failpoint after endpos is pinned, and SIGKILLs it
/// there (fenced, endpos recorded in `dir`): the interrupted cutover or rollback a rerun must
/// finish.
pub async fn kill_after_endpos(args: &[&str], dir: &str) {
    let failpoint = format!("{}=sleep(20000)", pgtide::failpoints::CUTOVER_AFTER_ENDPOS);
    let mut killed = spawn_pgtide(args, &[("FAILPOINTS", failpoint.as_str())]);
    wait_for_endpos(dir, 60).await;
    killed.kill().unwrap();
    killed.wait().unwrap();
}
