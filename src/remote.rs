//! Reaching other nodes: the system's OpenSSH client (BatchMode, one multiplexed master
//! connection per node so a job start does not pay a full handshake) and rsync over it.

use crate::inventory::{GpuInfo, Node};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// How to reach a remote node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshTarget {
    /// `[user@]host`.
    pub dest: String,
    pub port: Option<u16>,
    pub identity: Option<PathBuf>,
    /// Directory for the master sockets and known_hosts (inside the spool's private dir).
    pub control_dir: PathBuf,
}

impl SshTarget {
    /// The target of `node`, if it is remote.
    pub fn of(node: &Node, control_dir: &Path) -> Option<SshTarget> {
        node.ssh_destination.as_ref().map(|dest| SshTarget {
            dest: dest.clone(),
            port: node.ssh_port,
            identity: node.ssh_identity.clone(),
            control_dir: control_dir.to_path_buf(),
        })
    }

    /// The ssh options shared by every connection to this node.
    pub fn options(&self) -> Vec<String> {
        let mut o: Vec<String> = vec![
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=accept-new".into(),
            "-o".into(),
            format!(
                "UserKnownHostsFile={}",
                self.control_dir.join("known_hosts").display()
            ),
            "-o".into(),
            "ControlMaster=auto".into(),
            "-o".into(),
            format!("ControlPath={}/cm-%C", self.control_dir.display()),
            "-o".into(),
            "ControlPersist=600".into(),
            "-o".into(),
            "ConnectTimeout=10".into(),
            "-o".into(),
            "ServerAliveInterval=5".into(),
            "-o".into(),
            "ServerAliveCountMax=3".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
        ];
        if let Some(p) = self.port {
            o.push("-p".into());
            o.push(p.to_string());
        }
        if let Some(id) = &self.identity {
            o.push("-i".into());
            o.push(id.display().to_string());
        }
        o
    }

    /// `ssh OPTIONS DEST -- REMOTE_COMMAND`.
    pub fn command(&self, remote_command: &str) -> Command {
        let _ = std::fs::create_dir_all(&self.control_dir);
        let mut c = Command::new("ssh");
        c.args(self.options())
            .arg(&self.dest)
            .arg("--")
            .arg(remote_command);
        c
    }

    /// `rsync -a` of a local directory's contents to `remote_dir` on this node.
    pub fn rsync_to(&self, local_dir: &Path, remote_dir: &str) -> Command {
        let _ = std::fs::create_dir_all(&self.control_dir);
        let ssh = std::iter::once("ssh".to_string())
            .chain(self.options().into_iter().map(|o| shell_quote(&o)))
            .collect::<Vec<_>>()
            .join(" ");
        let mut c = Command::new("rsync");
        c.arg("-a")
            .arg("--delete")
            .arg("-e")
            .arg(ssh)
            .arg(format!("{}/", local_dir.display()))
            .arg(format!("{}:{}/", self.dest, remote_dir));
        c
    }

    /// Runs a short command on the node; `Ok(stdout)` when it exits 0.
    pub fn run(&self, remote_command: &str, timeout: Duration) -> Result<String, String> {
        let mut cmd = self.command(remote_command);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().map_err(|e| format!("ssh: {e}"))?;
        let out = wait_with_timeout(child, timeout)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "ssh {} exited with {}: {}",
                self.dest,
                out.status
                    .code()
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "a signal".into()),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Whether the node answers (used for the `nodes` file and placement).
    pub fn reachable(&self) -> bool {
        self.run("true", Duration::from_secs(15)).is_ok()
    }

    /// The node's GPUs from `nvidia-smi` (none when it has no driver).
    pub fn probe_gpus(&self) -> Result<Vec<GpuInfo>, String> {
        let out = self.run(
            "nvidia-smi --query-gpu=index,name,uuid,memory.total --format=csv,noheader,nounits 2>/dev/null || true",
            Duration::from_secs(20),
        )?;
        Ok(parse_nvidia_smi(&out))
    }

    /// The node's CPU count (`nproc`: those this login may use).
    pub fn probe_cpus(&self) -> Result<crate::resources::Milli, String> {
        let out = self.run("nproc", Duration::from_secs(20))?;
        parse_nproc(&out).ok_or_else(|| format!("nproc printed {:?}", out.trim()))
    }
}

/// `nproc`'s output: a count of at least 1.
fn parse_nproc(text: &str) -> Option<crate::resources::Milli> {
    let n: u64 = text.trim().parse().ok()?;
    (n > 0).then(|| crate::resources::Milli::from_units(n))
}

fn wait_with_timeout(
    mut child: std::process::Child,
    timeout: Duration,
) -> Result<std::process::Output, String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().map_err(|e| e.to_string()),
            Ok(None) if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("ssh timed out after {timeout:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Parses `nvidia-smi --query-gpu=index,name,uuid,memory.total --format=csv,noheader,nounits`.
pub fn parse_nvidia_smi(text: &str) -> Vec<GpuInfo> {
    text.lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split(',').map(str::trim).collect();
            if cols.len() < 4 {
                return None;
            }
            let index: u32 = cols[0].parse().ok()?;
            let memory_mib: Option<u64> = cols[3].parse().ok();
            Some(GpuInfo {
                index,
                kind: crate::inventory::canonical_gpu_name(cols[1], memory_mib),
                uuid: Some(cols[2].to_string()).filter(|u| !u.is_empty()),
                memory_mib,
            })
        })
        .collect()
}

/// Single-quotes a string for POSIX sh.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The remote side of one rank of one phase: saves the script it reads on stdin in a
/// private directory, runs it with bash in a session (and so a process group) of its own,
/// records that group's id for cancels, waits, kills what the job left behind, and exits
/// with the job's code. What it left behind is its process group, and, once the rank is
/// over (after `run`, or a failed `setup`), every process of the rank that left the group
/// (`setsid`, a daemon): see [`sweep_command`].
///
/// `user` is the job's submitter when the head runs jobs as their submitters (a daemon run
/// as root). Where the node is reached as root, the rank then runs as that user too (see
/// [`switch_user`]); where it is reached as anyone else, it runs as that ssh user, the only
/// account the head can act as there.
pub fn rank_wrapper(
    remote_dir: &str,
    phase: &str,
    user: Option<&str>,
    tag: &str,
    rank: u32,
) -> String {
    let d = shell_quote(remote_dir);
    let switch = user.map(|u| switch_user(u, phase)).unwrap_or_default();
    let rank_over = match phase {
        "setup" => "[ $rc != 0 ]",
        _ => "true",
    };
    format!(
        "{} d={d}; cat > \"$d/{phase}.sh\" || exit 255; set --; {switch}\
         setsid \"$@\" bash --noprofile --norc \"$d/{phase}.sh\" </dev/null & p=$!; \
         echo $p > \"$d/{phase}.pid\"; wait $p; rc=$?; kill -KILL -- -$p 2>/dev/null; \
         if {rank_over}; then {}; fi; exit $rc",
        private_dir(remote_dir),
        sweep_command(tag, rank)
    )
}

/// Shell commands that SIGKILL, until none is left, every process on the node whose
/// environment holds the job's tag (`SKYSPOOL_JOB_TAG`, which every process of the job
/// inherits, daemonized ones included) and this rank's `SKYPILOT_NODE_RANK` (or
/// `SKYPILOT_SETUP_NODE_RANK`): another rank of the job on the same machine keeps its own.
/// The remote counterpart of the head's subreaper; like it, it misses only a process that
/// rewrote its environment. Run as the ssh user, it sees only that user's processes.
pub fn sweep_command(tag: &str, rank: u32) -> String {
    let t = shell_quote(&format!("{}={tag}", crate::executor::TAG_VAR));
    format!(
        "for _ in 1 2 3 4 5 6 7 8 9 10; do \
         l=$(grep -lzxF -e {t} /proc/[0-9]*/environ 2>/dev/null | \
         xargs -r grep -lzxE 'SKYPILOT_(SETUP_)?NODE_RANK={rank}' 2>/dev/null | \
         sed 's|^/proc/||; s|/environ$||'); [ -n \"$l\" ] || break; \
         kill -KILL $l 2>/dev/null; sleep 0.05; done"
    )
}

/// The PATH a rank run as its submitter starts with (its `~/.bashrc` may extend it): the
/// ssh login's own would be root's.
const USER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Shell commands for [`rank_wrapper`] that, when the ssh login is root and not `user`
/// already, set the positional parameters to the command prefix that runs the rank as
/// `user` (by name: uids may differ between nodes): `setpriv` to the user, their primary
/// group and supplementary groups, and `env -i` with their own HOME, USER, LOGNAME, SHELL
/// from the node's passwd (the job's other variables are exported by its script). The
/// private directory stays root's (mode 0711: the user can reach their script and workdir
/// but not replace the pid file a cancel signals); the script becomes the user's (0600, it
/// may hold secrets). A user the node does not know fails the rank (exit 255) with a reason.
fn switch_user(user: &str, phase: &str) -> String {
    let u = shell_quote(user);
    format!(
        "u={u}; if [ \"$(id -u)\" = 0 ] && [ \"$(id -un)\" != \"$u\" ]; then \
         pw=$(getent passwd \"$u\") && g=$(id -g \"$u\") || \
         {{ echo \"skyspool: user $u does not exist on $(hostname)\" >&2; exit 255; }}; \
         h=${{pw#*:*:*:*:*:}}; h=${{h%%:*}}; s=${{pw##*:}}; \
         chmod 711 \"$d\" && chown \"$u\" \"$d/{phase}.sh\" || exit 255; \
         set -- setpriv --reuid=\"$u\" --regid=\"$g\" --init-groups env -i HOME=\"$h\" \
         USER=\"$u\" LOGNAME=\"$u\" SHELL=\"${{s:-/bin/sh}}\" PATH={USER_PATH}; fi; "
    )
}

/// Shell commands that make `dir` (mode 0700, umask 077 from then on) and exit 255 unless it
/// is a real directory owned by the ssh user: a name in a shared `/tmp` that someone else
/// made first (a directory, or a link to one) is refused, never written into.
pub fn private_dir(dir: &str) -> String {
    let d = shell_quote(dir);
    format!(
        "umask 077; mkdir -p {d} && [ -d {d} ] && [ ! -h {d} ] && [ -O {d} ] || \
         {{ echo skyspool: {d} is not a private directory of $(id -un) >&2; exit 255; }};"
    )
}

/// Signals the process group of a rank started by [`rank_wrapper`].
pub fn signal_command(remote_dir: &str, phase: &str, signal: &str) -> String {
    let d = shell_quote(remote_dir);
    format!(
        "p=$(cat {d}/{phase}.pid 2>/dev/null) && [ -n \"$p\" ] && kill -{signal} -- -$p 2>/dev/null; true"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nvidia_smi_rows() {
        let g = parse_nvidia_smi(
            "0, NVIDIA H100 80GB HBM3, GPU-aaa, 81559\n1, NVIDIA H100 80GB HBM3, GPU-bbb, 81559\n",
        );
        assert_eq!(g.len(), 2);
        assert_eq!(g[1].index, 1);
        assert_eq!(g[1].kind, "H100");
        assert_eq!(g[0].uuid.as_deref(), Some("GPU-aaa"));
        assert!(parse_nvidia_smi("").is_empty());
        assert!(parse_nvidia_smi("NVIDIA-SMI has failed").is_empty());
    }

    #[test]
    fn parses_nproc() {
        use crate::resources::Milli;
        assert_eq!(parse_nproc("16\n"), Some(Milli::from_units(16)));
        assert_eq!(parse_nproc(" 2 "), Some(Milli::from_units(2)));
        assert_eq!(parse_nproc("0\n"), None);
        assert_eq!(parse_nproc("bash: nproc: command not found\n"), None);
        assert_eq!(parse_nproc(""), None);
    }

    #[test]
    fn quotes_for_sh() {
        assert_eq!(shell_quote("abc/d.e"), "abc/d.e");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    /// Runs [`private_dir`] for `dir` in `sh`; its exit code and stderr.
    fn make_private(dir: &std::path::Path) -> (i32, String) {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("{} echo made", private_dir(&dir.to_string_lossy())))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code().unwrap_or(-1), err)
    }

    #[test]
    fn private_dir_is_made_0700_and_refused_when_not_ours() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("skyspool-x-r1");
        assert_eq!(make_private(&d), (0, String::new()));
        let mode = std::fs::metadata(&d).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
        assert_eq!(make_private(&d).0, 0, "an existing one of ours is reused");
        // A link someone planted at the name, even to a directory of ours, is refused.
        let planted = tmp.path().join("skyspool-y-r1");
        symlink(&d, &planted).unwrap();
        let (code, err) = make_private(&planted);
        assert_eq!(code, 255);
        assert!(err.contains("is not a private directory"), "{err}");
        // A directory made first by another user is refused.
        if crate::root_or_skip("private_dir_is_made_0700_and_refused_when_not_ours") {
            let theirs = tmp.path().join("skyspool-z-r1");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            assert_eq!(make_private(&theirs).0, 255);
        }
    }

    /// Runs [`rank_wrapper`] for `dir` in `sh` (as the ssh login would), with `script` on
    /// its stdin; its exit code, stdout and stderr.
    fn run_wrapper(
        dir: &std::path::Path,
        user: Option<&str>,
        script: &str,
    ) -> (i32, String, String) {
        let out = crate::output_with_stdin(
            Command::new("sh").arg("-c").arg(rank_wrapper(
                &dir.to_string_lossy(),
                "run",
                user,
                "t-1",
                1,
            )),
            script.as_bytes(),
        );
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Reached as root, a rank runs as its submitter: their uid, groups, HOME and a PATH of
    /// their own, not root's environment; the pid file a cancel signals stays root's, in a
    /// directory the user cannot write. A submitter the node does not know fails the rank
    /// with a reason. Without a user (a daemon not run as root), the rank runs as the login.
    #[test]
    fn a_rank_reached_as_root_runs_as_its_submitter() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if !crate::root_or_skip("a_rank_reached_as_root_runs_as_its_submitter") {
            return;
        }
        let user = "skyspool-alice";
        let Some(alice) = nix::unistd::User::from_name(user).ok().flatten() else {
            assert!(
                std::env::var_os("SKYSPOOL_TEST_STRICT").is_none_or(|v| v != "1"),
                "SKYSPOOL_TEST_STRICT=1 forbids skipping: no user {user} (.ci/run makes it)"
            );
            eprintln!("SKIPPED (not a pass): no user {user}");
            return;
        };
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = tmp.path().join("skyspool-t-r1");
        let script = "id -u; id -g; echo \"$HOME|$USER|$LOGNAME|$PATH|${SECRET-unset}\"\n";
        let (code, out, err) = run_wrapper(&d, Some(user), script);
        assert_eq!(code, 0, "{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], alice.uid.to_string(), "{out}");
        assert_eq!(lines[1], alice.gid.to_string(), "{out}");
        assert_eq!(
            lines[2],
            format!("{}|{user}|{user}|{USER_PATH}|unset", alice.dir.display()),
            "{out}"
        );
        let dir = std::fs::metadata(&d).unwrap();
        assert_eq!((dir.uid(), dir.mode() & 0o777), (0, 0o711));
        let pid = std::fs::metadata(d.join("run.pid")).unwrap();
        assert_eq!(pid.uid(), 0, "the pid file a cancel reads stays root's");
        let sh = std::fs::metadata(d.join("run.sh")).unwrap();
        assert_eq!((sh.uid(), sh.mode() & 0o777), (alice.uid.as_raw(), 0o600));

        let (code, _, err) = run_wrapper(
            &tmp.path().join("skyspool-u-r1"),
            Some("skyspool-no-such-user"),
            "echo ran\n",
        );
        assert_eq!(code, 255);
        assert!(
            err.contains("user skyspool-no-such-user does not exist on"),
            "{err}"
        );

        let (code, out, err) = run_wrapper(&tmp.path().join("skyspool-v-r1"), None, "id -u\n");
        assert_eq!((code, out.trim()), (0, "0"), "{err}");
    }

    #[test]
    fn wrapper_names_its_files() {
        let w = rank_wrapper("/tmp/skyspool-x-r1", "run", None, "x", 1);
        assert!(w.contains("/tmp/skyspool-x-r1"));
        assert!(w.contains("run.pid"));
        assert!(signal_command("/tmp/d", "run", "TERM").contains("kill -TERM -- -$p"));
    }
}
