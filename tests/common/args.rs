//! pgtide command lines that many tests spell out: built once here.

/// A pgtide command line built from its usual parts, e.g.
/// `Args::cutover(&src, &dst, d).args(&["--timeout", "150s"])`; derefs to `[&str]`, so it
/// goes wherever a `&[&str]` does (`pgtide_ok(&args)`, `spawn_pgtide(&args, ...)`).
#[derive(Clone, Debug)]
pub struct Args<'a>(Vec<&'a str>);

impl<'a> Args<'a> {
    /// Any words, as given.
    pub fn new(words: &[&'a str]) -> Self {
        Args(words.to_vec())
    }

    /// `clone --source S --target T --dir D`.
    pub fn clone(src: &'a str, dst: &'a str, dir: &'a str) -> Self {
        Self::new(&["clone", "--source", src, "--target", dst, "--dir", dir])
    }

    /// `clone --follow --source S --target T --dir D --slot-name SLOT`.
    pub fn clone_follow(src: &'a str, dst: &'a str, dir: &'a str, slot: &'a str) -> Self {
        Self::new(&[
            "clone",
            "--follow",
            "--source",
            src,
            "--target",
            dst,
            "--dir",
            dir,
            "--slot-name",
            slot,
        ])
    }

    /// `cutover --source S --target T --dir D`.
    pub fn cutover(src: &'a str, dst: &'a str, dir: &'a str) -> Self {
        Self::new(&["cutover", "--source", src, "--target", dst, "--dir", dir])
    }

    /// `cleanup --source S --target T --dir D`.
    pub fn cleanup(src: &'a str, dst: &'a str, dir: &'a str) -> Self {
        Self::new(&["cleanup", "--source", src, "--target", dst, "--dir", dir])
    }

    /// `verify --source S --target T`.
    pub fn verify(src: &'a str, dst: &'a str) -> Self {
        Self::new(&["verify", "--source", src, "--target", dst])
    }

    /// One more word.
    pub fn arg(mut self, word: &'a str) -> Self {
        self.0.push(word);
        self
    }

    /// More words.
    pub fn args(mut self, words: &[&'a str]) -> Self {
        self.0.extend_from_slice(words);
        self
    }

    pub fn into_vec(self) -> Vec<&'a str> {
        self.0
    }
}

impl<'a> std::ops::Deref for Args<'a> {
    type Target = [&'a str];
    fn deref(&self) -> &[&'a str] {
        &self.0
    }
}

/// `clone --follow --source S --target T --dir D --slot-name SLOT`, the start of most follow
/// tests (`Args::clone_follow` as a vector, to extend).
pub fn clone_follow_args<'a>(
    src: &'a str,
    dst: &'a str,
    dir: &'a str,
    slot: &'a str,
) -> Vec<&'a str> {
    Args::clone_follow(src, dst, dir, slot).into_vec()
}
