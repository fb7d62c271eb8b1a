//! `state`, `list`, `ps`, `events`, `update`, `spec`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::context::Ctx;
use crate::control::{self, Request};
use crate::state::Status;

const TIMEOUT: Duration = Duration::from_secs(30);

pub fn state(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    let state = ctx.store.load(id)?;
    println!("{}", serde_json::to_string_pretty(&state.to_runc_json())?);
    Ok(())
}

pub fn list(ctx: &Ctx, format: &str, quiet: bool) -> anyhow::Result<()> {
    if !matches!(format, "json" | "table") {
        bail!("invalid format {format:?}: want table or json");
    }
    let mut entries = Vec::new();
    for id in ctx.store.ids()? {
        match ctx.store.load(&id) {
            Ok(s) => entries.push(s.to_list_json()),
            // Gone between the listing and the read: a concurrent delete.
            Err(e) if e.downcast_ref::<crate::state::NotExist>().is_some() => {}
            Err(e) => {
                // Damaged or half-made: shown (it may hold a VM until `delete --force`).
                tracing::warn!("{e:#}");
                entries.push(damaged_entry(ctx, &id));
            }
        }
    }
    if quiet {
        for e in &entries {
            println!("{}", e["id"].as_str().unwrap_or_default());
        }
        return Ok(());
    }
    match format {
        "json" => println!("{}", serde_json::to_string(&entries)?),
        "table" => {
            let mut rows =
                vec![["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"].map(String::from)];
            let field = |e: &Value, k: &str| e[k].as_str().unwrap_or_default().to_string();
            for e in &entries {
                rows.push([
                    field(e, "id"),
                    e["pid"].to_string(),
                    field(e, "status"),
                    field(e, "bundle"),
                    field(e, "created"),
                    field(e, "owner"),
                ]);
            }
            print_columns(&rows);
        }
        other => bail!("invalid format {other:?}: want table or json"),
    }
    Ok(())
}

/// What `list` shows for a container whose state is damaged: `unknown` while its monitor
/// lives, `stopped` otherwise; the bundle from the monitor's configuration when readable.
fn damaged_entry(ctx: &Ctx, id: &str) -> Value {
    let dir = ctx.store.dir(id);
    let monitors = super::lifecycle::find_monitors(&dir);
    let (status, pid) = match monitors.first() {
        Some((pid, _)) => ("unknown", *pid),
        None => (Status::Stopped.as_str(), 0),
    };
    let bundle = crate::monitor::MonitorConfig::load(&dir)
        .map(|c| c.bundle.display().to_string())
        .unwrap_or_default();
    let created = std::fs::metadata(&dir)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| crate::logging::rfc3339(d.as_secs() as i64, d.subsec_nanos()))
        .unwrap_or_default();
    json!({
        "ociVersion": "",
        "id": id,
        "pid": pid,
        "status": status,
        "bundle": bundle,
        "rootfs": "",
        "created": created,
        "owner": "root",
    })
}

fn print_columns<const N: usize>(rows: &[[String; N]]) {
    let widths: Vec<usize> = (0..N)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("   ").trim_end());
    }
}

fn require_live(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    let state = ctx.store.load(id)?;
    match state.effective_status() {
        // runc's words.
        Status::Stopped | Status::Creating => bail!("container not running"),
        _ => Ok(()),
    }
}

pub fn ps(ctx: &Ctx, id: &str, format: &str) -> anyhow::Result<()> {
    require_live(ctx, id)?;
    let processes = control::call(&ctx.store.dir(id), &Request::Ps, TIMEOUT)?;
    let list = processes.as_array().cloned().unwrap_or_default();
    match format {
        // runc prints the PIDs; these are the guest's.
        "json" => {
            let pids: Vec<i64> = list.iter().filter_map(|p| p["pid"].as_i64()).collect();
            println!("{}", serde_json::to_string(&pids)?);
        }
        "table" => {
            let mut rows = vec![["UID", "PID", "PPID", "STAT", "CMD"].map(String::from)];
            for p in &list {
                let args: Vec<&str> = p["args"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                rows.push([
                    p["uid"].to_string(),
                    p["pid"].to_string(),
                    p["ppid"].to_string(),
                    p["state"].as_str().unwrap_or("").to_string(),
                    args.join(" "),
                ]);
            }
            print_columns(&rows);
        }
        other => bail!("invalid format {other:?}: want table or json"),
    }
    Ok(())
}

fn stats_event(ctx: &Ctx, id: &str) -> anyhow::Result<Value> {
    let stats = control::call(&ctx.store.dir(id), &Request::Stats, TIMEOUT)?;
    let pids = control::call(&ctx.store.dir(id), &Request::Ps, TIMEOUT)
        .ok()
        .and_then(|p| p.as_array().map(Vec::len))
        .unwrap_or(0);
    let usage = stats["host_rss_bytes"].as_u64().unwrap_or(0)
        + stats["monitor_rss_bytes"].as_u64().unwrap_or(0);
    Ok(json!({
        "type": "stats",
        "id": id,
        "data": {
            "memory": {"usage": {"usage": usage, "limit": stats["guest_memory_bytes"]}},
            "pids": {"current": pids},
            "runv": stats,
        }
    }))
}

pub fn events(ctx: &Ctx, id: &str, stats: bool, interval: u32) -> anyhow::Result<()> {
    require_live(ctx, id)?;
    if stats {
        println!("{}", serde_json::to_string(&stats_event(ctx, id)?)?);
        return Ok(());
    }
    let interval = Duration::from_secs(u64::from(interval.max(1)));
    loop {
        match ctx.store.load(id).map(|s| s.effective_status()) {
            Ok(Status::Stopped) | Err(_) => return Ok(()),
            _ => {}
        }
        match stats_event(ctx, id) {
            Ok(event) => println!("{}", serde_json::to_string(&event)?),
            Err(_) => return Ok(()),
        }
        std::thread::sleep(interval);
    }
}

pub fn update(ctx: &Ctx, args: &liboci_cli::Update) -> anyhow::Result<()> {
    require_live(ctx, &args.container_id)?;
    let mut asked = Vec::new();
    let flags: [(&str, bool); 12] = [
        ("blkio-weight", args.blkio_weight.is_some()),
        ("cpu-period", args.cpu_period.is_some()),
        ("cpu-quota", args.cpu_quota.is_some()),
        ("cpu-rt-period", args.cpu_rt_period.is_some()),
        ("cpu-rt-runtime", args.cpu_rt_runtime.is_some()),
        ("cpu-share", args.cpu_share.is_some()),
        ("cpuset-cpus", args.cpuset_cpus.is_some()),
        ("cpuset-mems", args.cpuset_mems.is_some()),
        ("memory", args.memory.is_some()),
        ("memory-reservation", args.memory_reservation.is_some()),
        ("memory-swap", args.memory_swap.is_some()),
        ("pids-limit", args.pids_limit.is_some()),
    ];
    asked.extend(
        flags
            .iter()
            .filter(|(_, set)| *set)
            .map(|(n, _)| n.to_string()),
    );
    if let Some(path) = &args.resources {
        let text = if path == Path::new("-") {
            std::io::read_to_string(std::io::stdin())?
        } else {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        };
        let resources: Value =
            serde_json::from_str(&text).context("--resources is not valid JSON")?;
        if let Some(obj) = resources.as_object() {
            asked.extend(
                obj.iter()
                    .filter(|(_, v)| !v.is_null() && v.as_object().is_none_or(|o| !o.is_empty()))
                    .map(|(k, _)| k.clone()),
            );
        }
    }
    if asked.is_empty() {
        return Ok(());
    }
    bail!(
        "runv cannot change {} of a running container: a VM's CPUs and memory are fixed when it boots",
        asked.join(", ")
    )
}

pub fn spec(bundle: Option<&Path>) -> anyhow::Result<()> {
    let dir = bundle.unwrap_or(Path::new("."));
    let path = dir.join("config.json");
    if path.exists() {
        bail!("File {} exists. Remove it first", path.display());
    }
    let spec = oci_spec::runtime::Spec::default();
    let mut json = serde_json::to_value(&spec)?;
    json["process"]["terminal"] = true.into();
    json["process"]["args"] = json!(["sh"]);
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}
