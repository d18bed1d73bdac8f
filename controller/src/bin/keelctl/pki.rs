//! `keelctl pki`: the cluster CA and its certificates (docs/security.md, "Certificates").
//!
//! Every command works on a PKI directory: `--pki-dir`, or `DIR/pki` of the cluster directory
//! (`--dir`, `$KEEL_DIR`, `~/.keel`) as `keelctl up` lays it out. `revoke` and `publish` hand
//! the CRL to the controller (`PUT /v1/pki/crl`) with the cluster's admin credentials.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use keel_api::CrlInfo;
use keel_proto::pki::{self, CertSummary, IssueOptions};
use keel_proto::Role;

use crate::{Cli, Format};

/// An admin certificate closer than this to its end makes keelctl warn.
pub const ADMIN_WARNING_DAYS: i64 = 14;

#[derive(Subcommand)]
pub enum PkiCmd {
    /// Create a cluster CA (ca.pem, ca.key), valid --days (default 3650, 10 years).
    #[command(after_help = "Example: keelctl pki init --pki-dir pki")]
    Init {
        /// PKI directory (default: DIR/pki of the cluster directory).
        #[arg(long = "pki-dir")]
        pki_dir: Option<PathBuf>,
        /// Days the CA is valid.
        #[arg(long, default_value_t = pki::CA_DAYS)]
        days: u32,
    },
    /// Issue a certificate for a daemon or an operator: writes <role>-<id>.pem and .key.
    #[command(
        after_help = "Example: keelctl pki issue --pki-dir pki --role storage --id s4 --host 10.0.0.14"
    )]
    Issue {
        /// PKI directory (default: DIR/pki of the cluster directory).
        #[arg(long = "pki-dir")]
        pki_dir: Option<PathBuf>,
        /// storage, node, controller or admin.
        #[arg(long)]
        role: Role,
        /// The holder's id: the storage server's, the node's, or an operator's name (the
        /// certificate names it keel://<role>/<id>).
        #[arg(long)]
        id: String,
        /// Extra DNS names or IP addresses the holder is reached at.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Days the certificate is valid (default: 365 for daemons, 90 for admin).
        #[arg(long)]
        days: Option<u32>,
    },
    /// Renew a certificate: a new key and certificate with the same role, id and hosts; the
    /// files are replaced atomically and running daemons pick them up within seconds.
    #[command(after_help = "Example: keelctl pki renew --name storage-s1")]
    Renew {
        /// PKI directory (default: DIR/pki of the cluster directory).
        #[arg(long = "pki-dir")]
        pki_dir: Option<PathBuf>,
        /// The certificate's name, <role>-<id> (e.g. storage-s1, admin-keelctl).
        #[arg(long)]
        name: String,
        /// Days the new certificate is valid (default: 365 for daemons, 90 for admin).
        #[arg(long)]
        days: Option<u32>,
    },
    /// Revoke certificates: adds them to the CA's revocation list, writes a new CRL (crl.pem)
    /// and hands it to the controller, which distributes it.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["name", "serial"])))]
    #[command(after_help = "Example: keelctl pki revoke --name node-n2")]
    Revoke {
        /// PKI directory (default: DIR/pki of the cluster directory).
        #[arg(long = "pki-dir")]
        pki_dir: Option<PathBuf>,
        /// Every unexpired certificate issued as <role>-<id> (e.g. node-n2).
        #[arg(long)]
        name: Option<String>,
        /// One certificate, by serial (hexadecimal, as `keelctl pki list` shows it).
        #[arg(long)]
        serial: Option<String>,
        /// Only write the CRL; do not hand it to the controller.
        #[arg(long)]
        no_publish: bool,
    },
    /// Hand the CRL (crl.pem) to the controller again (e.g. it was unreachable at `revoke`).
    #[command(after_help = "Example: keelctl pki publish")]
    Publish {
        /// PKI directory (default: DIR/pki of the cluster directory).
        #[arg(long = "pki-dir")]
        pki_dir: Option<PathBuf>,
    },
    /// List the certificates issued, with their expiry and whether they are revoked.
    #[command(after_help = "Example: keelctl pki list")]
    List {
        /// PKI directory (default: DIR/pki of the cluster directory).
        #[arg(long = "pki-dir")]
        pki_dir: Option<PathBuf>,
    },
}

fn pki_dir(cli: &Cli, given: &Option<PathBuf>) -> PathBuf {
    given.clone().unwrap_or_else(|| {
        cli.dir
            .clone()
            .unwrap_or_else(crate::default_dir)
            .join("pki")
    })
}

/// `YYYY-MM-DD HH:MM:SS UTC` of a Unix time.
pub fn date(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// `--days N` as a validity (a bad N is invalid input: exit code 5).
fn days(d: u32) -> anyhow::Result<IssueOptions> {
    IssueOptions::days(d).map_err(|e| crate::InvalidInput(e.to_string()).into())
}

fn validity(d: Option<u32>, role: Role) -> anyhow::Result<IssueOptions> {
    match d {
        Some(d) => days(d),
        None => Ok(IssueOptions::for_role(role)),
    }
}

pub async fn run(cli: &Cli, cmd: &PkiCmd) -> anyhow::Result<()> {
    match cmd {
        PkiCmd::Init { pki_dir: d, days } => {
            let dir = pki_dir(cli, d);
            pki::init_ca_with(&dir, self::days(*days)?)
                .with_context(|| format!("creating a CA in {}", dir.display()))?;
            let s = pki::summarize_file(&dir.join("ca.pem"))?;
            println!(
                "created CA in {} (valid until {})",
                dir.display(),
                date(s.not_after)
            );
        }
        PkiCmd::Issue {
            pki_dir: d,
            role,
            id,
            hosts,
            days,
        } => {
            let dir = pki_dir(cli, d);
            let p = pki::issue_with(&dir, *role, id, hosts, validity(*days, *role)?).with_context(
                || {
                    format!(
                        "issuing a {role} certificate (run `keelctl pki init --pki-dir {}` first)",
                        dir.display()
                    )
                },
            )?;
            println!("{}", p.cert.display());
        }
        PkiCmd::Renew {
            pki_dir: d,
            name,
            days,
        } => {
            let dir = pki_dir(cli, d);
            let old = pki::summarize_file(&dir.join(format!("{name}.pem")))
                .with_context(|| format!("reading the certificate {name} in {}", dir.display()))?;
            if let Some(d) = days {
                self::days(*d)?;
            }
            let new = pki::renew(&dir, name, *days)
                .with_context(|| format!("renewing {name} in {}", dir.display()))?;
            if cli.output == Format::Json {
                println!(
                    "{}",
                    serde_json::json!({
                        "name": name,
                        "old_serial": old.serial,
                        "serial": new.serial,
                        "not_after": new.not_after,
                        "cert": dir.join(format!("{name}.pem")),
                    })
                );
            } else {
                println!(
                    "renewed {name}: serial {} (was {}), valid until {}; a running daemon picks it up within seconds, without a restart",
                    new.serial,
                    old.serial,
                    date(new.not_after)
                );
                println!("the old certificate stays valid until it expires; revoke it with `keelctl pki revoke --serial {}` if its key may be compromised", old.serial);
            }
        }
        PkiCmd::Revoke {
            pki_dir: d,
            name,
            serial,
            no_publish,
        } => {
            let dir = pki_dir(cli, d);
            revoke(cli, &dir, name.as_deref(), serial.as_deref(), *no_publish).await?;
        }
        PkiCmd::Publish { pki_dir: d } => {
            let dir = pki_dir(cli, d);
            let p = dir.join("crl.pem");
            let pem = std::fs::read(&p).with_context(|| {
                format!("reading {} (`keelctl pki revoke` makes it)", p.display())
            })?;
            publish(cli, pem).await?;
        }
        PkiCmd::List { pki_dir: d } => list(cli, &pki_dir(cli, d))?,
    }
    Ok(())
}

/// Serials to revoke for `name`: the current file's and every unexpired one issued under it.
fn serials_of(dir: &Path, name: &str) -> anyhow::Result<Vec<(String, String)>> {
    let now = pki::now_unix();
    let mut out: Vec<(String, String)> = Vec::new();
    let file = dir.join(format!("{name}.pem"));
    if file.exists() {
        let s = pki::summarize_file(&file)?;
        out.push((s.serial, name.to_string()));
    }
    for e in pki::issued(dir)? {
        if e.name == name && e.not_after > now && !out.iter().any(|(s, _)| *s == e.serial) {
            out.push((e.serial, e.name));
        }
    }
    if out.is_empty() {
        bail!(
            "no certificate named {name} in {} (see `keelctl pki list`)",
            dir.display()
        );
    }
    Ok(out)
}

async fn revoke(
    cli: &Cli,
    dir: &Path,
    name: Option<&str>,
    serial: Option<&str>,
    no_publish: bool,
) -> anyhow::Result<()> {
    let serials = match (name, serial) {
        (Some(n), _) => serials_of(dir, n)?,
        (None, Some(s)) => {
            let serial = pki::parse_serial(s).map_err(|e| crate::InvalidInput(e.to_string()))?;
            let hex = pki::serial_hex(&serial);
            let who = pki::issued(dir)?
                .into_iter()
                .find(|e| e.serial == hex)
                .map_or_else(|| "unknown".to_string(), |e| e.name);
            vec![(hex, who)]
        }
        (None, None) => bail!("give --name or --serial"),
    };
    let r = pki::revoke(dir, &serials)
        .with_context(|| format!("revoking in {} (the CA's key must be there)", dir.display()))?;
    for (s, n) in &r.added {
        println!("revoked {n} serial {s}");
    }
    for s in &r.already {
        println!("serial {s} was revoked already");
    }
    println!(
        "CRL number {} ({} revoked certificate{}) written to {}",
        r.crl_number,
        r.listed,
        if r.listed == 1 { "" } else { "s" },
        r.crl_path.display()
    );
    if no_publish {
        println!("not handed to the controller (--no-publish): `keelctl pki publish` does it");
        return Ok(());
    }
    publish(cli, r.crl_pem.into_bytes()).await
}

async fn publish(cli: &Cli, pem: Vec<u8>) -> anyhow::Result<()> {
    let api = crate::client(cli)
        .context("the CRL was not handed to the controller; `keelctl pki publish` retries")?;
    match api
        .put_bytes::<CrlInfo>("/v1/pki/crl", pem, "application/x-pem-file")
        .await
    {
        Ok(info) => {
            println!(
                "the controller at {} took CRL number {}: it refuses the revoked certificates now; storage servers and node managers apply it within seconds (their next heartbeat)",
                api.url(),
                info.number
            );
            Ok(())
        }
        Err(e) => {
            println!("the controller at {} did NOT take the CRL: {e}", api.url());
            Err(anyhow::Error::new(e)
                .context("handing the CRL to the controller (`keelctl pki publish` retries)"))
        }
    }
}

fn list(cli: &Cli, dir: &Path) -> anyhow::Result<()> {
    let now = pki::now_unix();
    let revoked = pki::RevocationState::load(dir)?.revoked;
    // Current certificate of each name in the directory.
    let mut current: BTreeMap<String, CertSummary> = BTreeMap::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for e in entries.flatten() {
        let p = e.path();
        let Some(name) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".pem"))
        else {
            continue;
        };
        if name == "crl" || name.starts_with('.') {
            continue;
        }
        if let Ok(s) = pki::summarize_file(&p) {
            current.insert(name.to_string(), s);
        }
    }
    let mut rows: Vec<(String, String, i64, String)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let status = |serial: &str, not_after: i64, is_current: bool| -> String {
        if revoked.contains_key(serial) {
            "revoked".into()
        } else if not_after <= now {
            "expired".into()
        } else if !is_current {
            "replaced".into()
        } else if not_after - now < 30 * 86_400 {
            format!("expires in {} days", (not_after - now) / 86_400)
        } else {
            "valid".into()
        }
    };
    for (name, s) in &current {
        seen.insert(s.serial.clone());
        rows.push((
            name.clone(),
            s.serial.clone(),
            s.not_after,
            status(&s.serial, s.not_after, true),
        ));
    }
    for e in pki::issued(dir)? {
        if seen.insert(e.serial.clone()) {
            let st = status(&e.serial, e.not_after, false);
            rows.push((e.name, e.serial, e.not_after, st));
        }
    }
    if cli.output == Format::Json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(n, s, a, st)| {
                serde_json::json!({"name": n, "serial": s, "not_after": a, "status": st})
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(());
    }
    println!("{:<24} {:<34} {:<24} STATUS", "NAME", "SERIAL", "NOT AFTER");
    for (n, s, a, st) in rows {
        println!("{n:<24} {s:<34} {:<24} {st}", date(a));
    }
    Ok(())
}

/// Warns on stderr when the admin certificate keelctl uses expires within
/// [`ADMIN_WARNING_DAYS`] (or has expired).
pub fn warn_admin_expiry(cert: &Path) {
    let Ok(s) = pki::summarize_file(cert) else {
        return;
    };
    let left = s.not_after - pki::now_unix();
    let name = cert
        .file_stem()
        .and_then(|n| n.to_str())
        .unwrap_or("admin-keelctl");
    if left <= 0 {
        eprintln!(
            "warning: the admin certificate {} EXPIRED on {}: renew it with `keelctl pki renew --name {name}`",
            cert.display(),
            date(s.not_after)
        );
    } else if left < ADMIN_WARNING_DAYS * 86_400 {
        eprintln!(
            "warning: the admin certificate {} expires in {} days ({}): renew it with `keelctl pki renew --name {name}`",
            cert.display(),
            left / 86_400,
            date(s.not_after)
        );
    }
}

#[cfg(test)]
mod unit_tests {
    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(super::date(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::date(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(super::date(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(super::date(-1), "1969-12-31 23:59:59 UTC");
    }
}
