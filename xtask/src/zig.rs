//! zig as the C compiler of musl targets: it ships musl's headers for every architecture, where a
//! distribution's cross gcc has glibc's (C compiled against glibc headers and linked against musl
//! asks for `open64` and friends, which musl does not have).
//!
//! zig comes from PyPI (`ziglang`), installed by `cargo xtask setup` into a cache folder of ours,
//! pinned so that the same commit always compiles its C with the same compiler.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util;

/// The pinned `ziglang` release on PyPI.
pub const VERSION: &str = "0.17.1";

/// Where setup installs zig: `$XDG_CACHE_HOME/muscle/ziglang-VERSION` (default `~/.cache`), or
/// `$MUSCLE_ZIG_HOME` when set.
pub fn home() -> PathBuf {
    if let Some(dir) = std::env::var_os("MUSCLE_ZIG_HOME") {
        return PathBuf::from(dir);
    }
    util::cache_home().join(format!("ziglang-{VERSION}"))
}

/// The zig executable, if setup installed it.
pub fn binary() -> Option<PathBuf> {
    let zig = home().join("ziglang").join("zig");
    zig.is_file().then_some(zig)
}

/// Installs zig with pip (`--target`, so no virtualenv and no system site-packages are touched).
pub fn install() -> Result<PathBuf> {
    let home = home();
    eprintln!(
        "setup: python3 -m pip install --target {} ziglang=={VERSION}",
        home.display()
    );
    util::run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--root-user-action=ignore",
            ])
            .args(["--upgrade", "--no-deps", "--target"])
            .arg(&home)
            .arg(format!("ziglang=={VERSION}")),
    )
    .context("installing zig (the C compiler of the musl targets) from PyPI")?;
    binary().with_context(|| {
        format!(
            "pip installed ziglang=={VERSION}, but {} has no ziglang/zig",
            home.display()
        )
    })
}

/// The `(cc, ar)` programs for a zig target (e.g. `aarch64-linux-musl`), as small wrappers that
/// cc-rs can call: cc-rs passes `--target=<rust triple>`, which zig does not take, so the wrapper
/// drops it and names zig's own target.
pub fn wrappers(zig_target: &str) -> Result<(PathBuf, PathBuf)> {
    let Some(zig) = binary() else {
        bail!(
            "zig {VERSION} is not installed in {} (the C compiler for {zig_target}); \
             run `cargo xtask setup`",
            home().display()
        );
    };
    let dir = home().join("wrappers");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cache = home().join("cache");
    let cc = write_script(
        &dir.join(format!("{zig_target}-cc")),
        &format!(
            "# cc-rs passes --target=<rust triple>; zig takes only its own triple.\n\
             for a; do shift; case \"$a\" in --target=*) ;; *) set -- \"$@\" \"$a\" ;; esac; done\n\
             ZIG_GLOBAL_CACHE_DIR={cache} exec {zig} cc -target {zig_target} \"$@\"\n",
            cache = sh_quote(&cache),
            zig = sh_quote(&zig),
        ),
    )?;
    let ar = write_script(
        &dir.join("ar"),
        &format!(
            "ZIG_GLOBAL_CACHE_DIR={cache} exec {zig} ar \"$@\"\n",
            cache = sh_quote(&cache),
            zig = sh_quote(&zig),
        ),
    )?;
    Ok((cc, ar))
}

/// Writes an executable `#!/bin/sh` script, leaving it alone when it already says `body`.
fn write_script(path: &Path, body: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let text = format!("#!/bin/sh\n# Written by `cargo xtask`; rewritten when it differs.\n{body}");
    if std::fs::read_to_string(path).ok().as_deref() != Some(text.as_str()) {
        // A name of this process's own: two first releases at once must not share a half-written file.
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        std::fs::write(&tmp, &text).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(path.to_owned())
}

fn sh_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}
